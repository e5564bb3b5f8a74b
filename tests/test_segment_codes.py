"""SNOMED CT codes of DICOM SEG segments (``pipeline.segment_codes``): the table against pydicom's
code dictionary, label names matched the way ``pipeline.laterality`` splits them, the shipped
bundles' ``dicom_seg`` blocks, and SEGs written from the shipped bundles (directly and through
``segpipe predict``) read back with highdicom. Series written with the helpers of test_dicom_seg."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
import torch
from pydicom.sr.codedict import codes
from test_dicom_seg import phantom, write_dicom

from pipeline.bundle import bundle_metadata
from pipeline.dicom_seg import GENERIC_CODE, source_datasets, write_dicom_seg
from pipeline.dicom_series import dicom_series_to_nifti
from pipeline.predict import predict
from pipeline.segment_codes import ABNORMAL, SIDE_CODES, TABLE, TISSUE, code, dicom_seg_block, lookup

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
ANATOMICAL_STRUCTURE = ["91723000", "SCT", "Anatomical Structure"]  # CID 7150
#: the shipped 3D bundles' labels -> SNOMED CT type, typed out (not from the table under test)
SHIPPED = {
    "phantom_ct_3d": {"liver": "10200004", "kidney": "64033007", "spleen": "78961009"},
    "headneck_ct_oar": {"brainstem": "119238007", "spinal_cord": "2748008", "left_parotid": "45289007",
                        "right_parotid": "45289007", "mandible": "91609006"},
    "hippocampus_mri_3d": {"anterior": "5366008", "posterior": "5366008"},
}
LATERALITY = {"left_parotid": "7771000", "right_parotid": "24028007"}  # SCT Left, Right (CID 244)


def _label_names(bundle: str) -> list[str]:
    return json.loads((BUNDLES / bundle / "configs" / "common.json").read_text())["label_names"]


# -- the table ----------------------------------------------------------------------------------
def test_every_code_of_the_table_is_pydicoms_and_in_its_dicom_context_group():
    """Categories from CID 7150 (segmentation property categories), organ and abnormal types from
    CID 7151 (segmentation property types), tissue types from CID 7191, sides from CID 244; the
    triples written are pydicom's (value, scheme, meaning)."""
    for key, (category, kind, _) in TABLE.items():
        assert category in codes.cid7150, (key, category)
        assert kind in (codes.cid7191 if category == TISSUE else codes.cid7151), (key, kind)
        for keyword in (category, kind):
            c = getattr(codes.SCT, keyword)
            assert code(keyword) == [c.value, "SCT", c.meaning], (key, keyword)
    assert {category for category, _, _ in TABLE.values()} == {"AnatomicalStructure", TISSUE, ABNORMAL}
    for side in SIDE_CODES.values():
        assert side in codes.cid244
    assert code("AnatomicalStructure") == ANATOMICAL_STRUCTURE


@pytest.mark.parametrize(("name", "value", "meaning", "side"), [
    ("liver", "10200004", "Liver", None),
    ("Liver", "10200004", "Liver", None),
    ("kidney", "64033007", "Kidney", None),
    ("Kidney R", "64033007", "Kidney", "24028007"),
    ("kidney_left", "64033007", "Kidney", "7771000"),
    ("LeftKidney", "64033007", "Kidney", "7771000"),
    ("spleen", "78961009", "Spleen", None),
    ("brainstem", "119238007", "Brain Stem", None),
    ("BrainStem", "119238007", "Brain Stem", None),
    ("spinal_cord", "2748008", "Spinal cord", None),
    ("SpinalCord", "2748008", "Spinal cord", None),
    ("left_parotid", "45289007", "Parotid gland", "7771000"),
    ("Parotid_L", "45289007", "Parotid gland", "7771000"),
    ("parotid rt", "45289007", "Parotid gland", "24028007"),
    ("Glnd_Submand_R", "54019009", "Submandibular gland", "24028007"),
    ("mandible", "91609006", "Mandible", None),
    ("Right-Hippocampus", "5366008", "Hippocampus", "24028007"),
    ("Left-Lateral-Ventricle", "66720007", "Lateral Ventricle", "7771000"),  # the brain's, not the heart's
    ("left_ventricle", "87878005", "Left ventricle", None),  # a heart chamber: the side is in its code
    ("Ventricle_R", "53085002", "Right ventricle", None),
])
def test_label_names_are_matched_as_the_project_splits_them(name, value, meaning, side):
    entry = lookup(name)
    assert entry is not None, name
    assert entry["type"] == [value, "SCT", meaning]
    assert entry["category"] == ANATOMICAL_STRUCTURE
    assert entry.get("modifier", [None])[0] == side


def test_tissues_and_tumours_get_their_own_categories():
    assert lookup("fat") == {"category": ["85756007", "SCT", "Tissue"], "type": ["55603005", "SCT", "Fat"]}
    assert lookup("Tumour")["category"] == ["49755003", "SCT", "Morphologically Abnormal Structure"]


@pytest.mark.parametrize("name", ["cell", "anterior", "blob", "left_liver", "Liver_Right", "LK", "left", "", "L R kidney"])
def test_names_the_table_does_not_know_keep_the_generic_code(name):
    """Unknown names, a side of an organ that has no sides, one-letter side prefixes (only a pair
    makes them sides) and two side words: no entry, so the SEG's "Tissue" fallback."""
    assert lookup(name) is None
    block, uncoded = dicom_seg_block(["background", "liver", name])
    assert uncoded == [name] and list(block["segments"]) == ["liver"]


def test_the_block_leaves_out_the_background_and_is_what_dicom_seg_reads():
    block, uncoded = dicom_seg_block(["background", "liver", "Parotid_L", "cell"])
    assert uncoded == ["cell"] and set(block["segments"]) == {"liver", "Parotid_L"}
    from pipeline.dicom_seg import segment_codes

    meta = {"dicom_seg": block}
    assert [c.value for c in segment_codes(meta, "LIVER")] == ["91723000", "10200004"]
    assert [c.value for c in segment_codes(meta, "cell")] == [GENERIC_CODE[0]] * 2


# -- the shipped bundles ------------------------------------------------------------------------
@pytest.mark.parametrize("bundle", list(SHIPPED))
def test_the_shipped_bundles_code_every_label(bundle):
    meta = bundle_metadata(BUNDLES / bundle)
    segments = meta["dicom_seg"]["segments"]
    assert list(segments) == _label_names(bundle)[1:] == list(SHIPPED[bundle])
    for name, entry in segments.items():
        assert entry["category"] == ANATOMICAL_STRUCTURE, name
        assert entry["type"][:2] == [SHIPPED[bundle][name], "SCT"], name
        if name in LATERALITY:
            assert entry["modifier"][:2] == [LATERALITY[name], "SCT"], name
        elif bundle != "hippocampus_mri_3d":
            assert "modifier" not in entry, name
    if bundle != "hippocampus_mri_3d":  # the planner's table gives the same block
        assert meta["dicom_seg"] == dicom_seg_block(_label_names(bundle))[0]
    else:  # "anterior"/"posterior" name no organ: both the hippocampus, head and body/tail
        assert [segments[n]["modifier"][2] for n in ("anterior", "posterior")] == ["Anterior", "Posterior"]
    assert meta["version"] in meta["changelog"] and any("dicom_seg" in v for v in meta["changelog"].values())


def test_the_2d_cells_bundle_has_no_dicom_seg_block():
    assert "dicom_seg" not in bundle_metadata(BUNDLES / "cells_2d")


def _seg_from(bundle: str, folder: Path) -> hd.seg.Segmentation:
    """A SEG of every label of ``bundle`` (a stripe each) on a small CT series, with the bundle's
    own metadata, as ``segpipe predict`` passes it."""
    write_dicom(folder / "ct", phantom((6, 7, 8)), "axial_lps")
    nii = nib.load(dicom_series_to_nifti(folder / "ct", folder / "ct.nii.gz"))
    names = _label_names(bundle)
    labels = (np.indices(nii.shape)[0] % len(names)).astype(np.uint8)
    out = write_dicom_seg(labels, nii.affine, source_datasets(folder / "ct"), folder / "ct.seg.dcm", names,
                          bundle_metadata(BUNDLES / bundle))
    return hd.seg.segread(out)


@pytest.mark.parametrize("bundle", list(SHIPPED))
def test_a_seg_from_a_shipped_bundle_reads_back_with_its_codes(bundle, tmp_path):
    seg = _seg_from(bundle, tmp_path)
    got = {s.SegmentLabel: (s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
                            s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
                            s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator) for s in seg.SegmentSequence}
    assert got == {name: ("91723000", value, "SCT") for name, value in SHIPPED[bundle].items()}
    assert "Tissue" not in {seg.get_segment_description(n).segmented_property_type.meaning
                            for n in seg.segment_numbers}


def test_the_parotids_of_a_headneck_seg_read_back_with_their_laterality(tmp_path):
    seg = _seg_from("headneck_ct_oar", tmp_path)
    sides = {}
    for s in seg.SegmentSequence:
        modifiers = s.SegmentedPropertyTypeCodeSequence[0].get("SegmentedPropertyTypeModifierCodeSequence", [])
        sides[s.SegmentLabel] = [(m.CodeValue, m.CodingSchemeDesignator, m.CodeMeaning) for m in modifiers]
    assert sides == {"brainstem": [], "spinal_cord": [], "mandible": [],
                     "left_parotid": [("7771000", "SCT", "Left")], "right_parotid": [("24028007", "SCT", "Right")]}


def test_the_hippocampus_segments_carry_their_part_and_description(tmp_path):
    seg = _seg_from("hippocampus_mri_3d", tmp_path)
    for s in seg.SegmentSequence:
        [modifier] = s.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
        assert modifier.CodeMeaning.lower() == s.SegmentLabel.lower()  # anterior / posterior
        assert s.SegmentDescription and len(s.SegmentDescription) <= 64


def test_segpipe_predict_writes_the_shipped_phantom_codes(tmp_path):
    """phantom_ct_3d's configs and metadata as shipped, with an analytic network (a 1x1x1
    convolution thresholding HU, as test_dicom_seg's): the SEG's liver is SCT 10200004."""
    b = tmp_path / "bundle"
    shutil.copytree(BUNDLES / "phantom_ct_3d" / "configs", b / "configs")
    common = json.loads((b / "configs" / "common.json").read_text())
    common.update(network_def={"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 4, "kernel_size": 1},
                  pixdim=[1.0, 1.0, 1.0], amp=False)
    (b / "configs" / "common.json").write_text(json.dumps(common))
    (b / "models").mkdir()
    torch.save({"weight": torch.tensor([0.0, 10, 20, 30]).reshape(4, 1, 1, 1, 1),
                "bias": torch.tensor([0.0, -3, -8, -15])}, b / "models" / "model.pt")
    write_dicom(tmp_path / "in" / "ax", phantom((8, 12, 14)), "axial_lps")
    rows = predict(b, tmp_path / "in", tmp_path / "out", progress=False, output_format="dicom-seg")
    assert [r["status"] for r in rows] == ["ok"], rows
    seg = hd.seg.segread(tmp_path / "out" / "ax.seg.dcm")
    types = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    assert types == SHIPPED["phantom_ct_3d"]
    assert {s.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning for s in seg.SegmentSequence} == {
        "Anatomical Structure"}
