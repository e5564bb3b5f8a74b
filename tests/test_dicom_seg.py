"""DICOM SEG output: series written with pydicom (not SimpleITK, so the reader and the writer of
the test do not share assumptions), converted by the product, segmented, written as a SEG and
read back with highdicom; every comparison is voxel for voxel."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pipeline.cli import main
from pipeline.dicom_seg import source_datasets, to_frames, write_dicom_seg
from pipeline.dicom_series import dicom_series_to_nifti
from pipeline.errors import InputError
from pipeline.predict import predict

ROOT = Path(__file__).resolve().parents[1]
_C, _S = np.cos(np.deg2rad(25)), np.sin(np.deg2rad(25))
#: ImageOrientationPatient (row direction, column direction) in LPS
ORIENTATIONS = {
    "axial_lps": ((1, 0, 0), (0, 1, 0)),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
    "coronal": ((1, 0, 0), (0, 0, -1)),
    "oblique": ((_C, _S * _S, -_S * _C), (0, _C, _S)),
}
SPACING = (0.9, 1.1, 1.5)  # between rows, between columns, between slices (mm)
LABELS = ["background", "body", "organ", "bone"]


def write_dicom(folder: Path, frames: np.ndarray, orientation: str | tuple, origin=(-12.0, 30.0, 55.0),
                spacing=SPACING, positions: list[float] | None = None, multiframe: bool = False,
                spacing_tag: float | None = None, advance=None, decimals: int = 6) -> list[Path]:
    """``frames`` (slices, rows, columns) int16 HU as a CT series of single-frame files (or one
    multi-frame Enhanced CT file), files named in reverse slice order so file order is not slice
    order; ``orientation``: a name in ORIENTATIONS or (row direction, column direction);
    ``positions`` puts frame k at slice position positions[k] (gaps, duplicates, jitter);
    ``advance``: the LPS direction slice positions advance along (default the slice normal; the
    table axis for a gantry-tilted CT); ``decimals``: ImagePositionPatient rounded so;
    ``spacing_tag`` writes that SpacingBetweenSlices (right or wrong)."""
    folder.mkdir(parents=True, exist_ok=True)
    pair = ORIENTATIONS[orientation] if isinstance(orientation, str) else orientation
    row_dir, col_dir = (np.asarray(v, dtype=float) for v in pair)
    normal = np.cross(row_dir, col_dir)
    advance = normal if advance is None else np.asarray(advance, dtype=float)
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    positions = list(range(len(frames))) if positions is None else positions
    files = []
    for k, (pixels, at) in enumerate(zip(frames, positions, strict=True)):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Seg", "PH001", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "CT", 3, k + 1, "test"
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.{decimals}f}" for v in np.asarray(origin) + at * spacing[2] * advance]
        ds.PixelSpacing, ds.SliceThickness = [spacing[0], spacing[1]], spacing[2]
        if spacing_tag is not None:
            ds.SpacingBetweenSlices = spacing_tag
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = np.ascontiguousarray(pixels, dtype=np.int16).tobytes()
        if multiframe:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
            ds.NumberOfFrames = len(frames)
            ds.PixelData = np.ascontiguousarray(frames, dtype=np.int16).tobytes()
            del ds.ImagePositionPatient
            ds.ImagePositionPatient = [f"{v:.6f}" for v in origin]
        f = folder / f"IM{len(frames) - k:04d}.dcm"
        ds.save_as(f, enforce_file_format=True)
        files.append(f)
        if multiframe:
            break
    return files


def phantom(shape=(12, 18, 22), seed: int = 0) -> np.ndarray:
    """(slices, rows, columns) HU: air -100, an off-centre body 0, an organ 80 and a bone 200,
    placed so that no flip or transpose maps the phantom onto itself."""
    k, r, c = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    hu = np.full(shape, -100, np.int16)
    hu[(r >= 2) & (r < 15) & (c >= 1) & (c < 19) & (k >= 1)] = 0
    hu[((k - 4) ** 2 / 9 + (r - 5) ** 2 / 9 + (c - 13) ** 2 / 16) <= 1] = 80
    hu[(k >= 6) & (k < 10) & (r >= 9) & (r < 13) & (c >= 3) & (c < 6)] = 200
    return hu + np.random.default_rng(seed).integers(-5, 6, shape).astype(np.int16)


def seg_labels_on(seg: hd.seg.Segmentation, files: list[Path]) -> list[np.ndarray]:
    """The SEG's label map on each source file (by SOP Instance UID), as highdicom reads it."""
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    return list(seg.get_pixels_by_source_instance(uids, combine_segments=True))


@pytest.mark.parametrize("grid", ["converted", "canonical"])
@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_seg_frames_land_on_their_source_pixels(tmp_path: Path, orientation: str, grid: str) -> None:
    """Labels computed from the converted NIfTI's voxel values come back, from the SEG, on the
    source file whose own pixels (read by pydicom) have those values; also from a mask in the
    NIfTI reoriented to RAS (axes permuted and flipped)."""
    frames = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7) * 3 - 300  # every value unique
    files = write_dicom(tmp_path / "ct", frames, orientation)
    nii = nib.load(dicom_series_to_nifti(tmp_path / "ct", tmp_path / "ct.nii.gz"))
    if grid == "canonical":
        converted, nii = nii.affine, nib.as_closest_canonical(nii)
        assert not np.allclose(nii.affine, converted), "the grid was reoriented"
    labels = (np.asarray(nii.dataobj).astype(int) // 3 % 4).astype(np.uint8)
    sources = source_datasets(tmp_path / "ct")
    out = write_dicom_seg(labels, nii.affine, sources, tmp_path / "ct.seg.dcm", LABELS,
                          {"name": "phantom_test", "version": "1.2.3"})
    seg = hd.seg.segread(out)
    for f, got in zip(files, seg_labels_on(seg, files), strict=True):
        np.testing.assert_array_equal(got, pydicom.dcmread(f).pixel_array.astype(int) // 3 % 4, err_msg=f.name)
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == \
        {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert [s.SegmentLabel for s in seg.SegmentSequence] == LABELS[1:]
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("phantom_test", "1.2.3")
    assert seg.SegmentationType == "BINARY"
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".tmp-")]


def test_a_grid_that_is_not_the_series_grid_is_refused(tmp_path: Path) -> None:
    write_dicom(tmp_path / "ct", phantom((4, 5, 6)), "oblique")
    nii = nib.load(dicom_series_to_nifti(tmp_path / "ct", tmp_path / "ct.nii.gz"))
    sources = source_datasets(tmp_path / "ct")
    labels = np.ones(nii.shape, np.uint8)
    assert to_frames(labels, nii.affine, sources).shape == (4, 5, 6)
    shifted = nii.affine @ np.array([[1, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    for affine, word in [(shifted, "does not lie on"), (nii.affine @ np.diag([1, 1, 1.1, 1]), "does not lie on")]:
        with pytest.raises(InputError, match=word):
            write_dicom_seg(labels, affine, sources, tmp_path / "x.seg.dcm", LABELS, {})
    with pytest.raises(InputError, match="does not lie on"):
        to_frames(labels[:, :, :3], nii.affine, sources)
    assert not (tmp_path / "x.seg.dcm").exists()


def test_codes_from_the_bundle_metadata_and_a_generic_code_otherwise(tmp_path: Path) -> None:
    write_dicom(tmp_path / "ct", phantom((3, 4, 5)), "axial_lps")
    nii = nib.load(dicom_series_to_nifti(tmp_path / "ct", tmp_path / "ct.nii.gz"))
    meta = {"name": "b", "version": "0.1", "dicom_seg": {"segments": {
        "Organ": {"category": ["91723000", "SCT", "Anatomical Structure"], "type": ["10200004", "SCT", "Liver"]}}}}
    out = write_dicom_seg(np.zeros(nii.shape, np.uint8), nii.affine, source_datasets(tmp_path / "ct"),
                          tmp_path / "ct.seg.dcm", LABELS, meta)
    seg = hd.seg.segread(out)  # an empty result is still a valid SEG
    types = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for s in seg.SegmentSequence}
    assert types == {"body": "Tissue", "organ": "Liver", "bone": "Tissue"}


# ---------------------------------------------------------------- segpipe predict --format both


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """phantom_ct_3d's configs with an analytic network: a 1x1x1 convolution whose argmax is
    the HU thresholds -40 / 40 / 120 (background, body, organ, bone); resampled to 1 mm."""
    b = tmp_path_factory.mktemp("bundle")
    shutil.copytree(ROOT / "bundles" / "phantom_ct_3d" / "configs", b / "configs")
    common = json.loads((b / "configs" / "common.json").read_text())
    common.update(network_def={"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 4, "kernel_size": 1},
                  label_names=LABELS, pixdim=[1.0, 1.0, 1.0], amp=False)
    (b / "configs" / "common.json").write_text(json.dumps(common))
    meta = json.loads((b / "configs" / "metadata.json").read_text())
    meta["dicom_seg"] = {"segments": {"bone": {"category": ["91723000", "SCT", "Anatomical Structure"],
                                               "type": ["3138006", "SCT", "Bone"]}}}
    (b / "configs" / "metadata.json").write_text(json.dumps(meta))
    (b / "models").mkdir()
    # x = (HU + 160) / 400; logits 0, 10x - 3, 20x - 8, 30x - 15 cross at x = 0.3, 0.5, 0.7
    torch.save({"weight": torch.tensor([0.0, 10, 20, 30]).reshape(4, 1, 1, 1, 1),
                "bias": torch.tensor([0.0, -3, -8, -15])}, b / "models" / "model.pt")
    return b


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "report.csv", newline="") as f:
        return {r["study_id"]: r for r in csv.DictReader(f)}


def assert_seg_is_the_mask(seg_file: Path, mask_file: Path, series: Path) -> None:
    """The SEG as highdicom reads it, as a volume placed by its own geometry, equals the NIfTI
    mask at every voxel, located through world coordinates; and frame by frame on the sources."""
    seg = hd.seg.segread(seg_file)
    mask_img = nib.load(mask_file)
    mask = np.asarray(mask_img.dataobj)
    vol = seg.get_volume(combine_segments=True)  # frames stacked by position; affine in LPS
    idx = np.indices(vol.array.shape).reshape(3, -1)
    lps = vol.affine @ np.vstack([idx, np.ones(idx.shape[1])])
    ijk = np.linalg.inv(mask_img.affine) @ (lps * np.array([[-1], [-1], [1], [1]]))
    near = np.rint(ijk[:3]).astype(int)
    assert np.abs(ijk[:3] - near).max() < 1e-3, "SEG voxels are not on the mask's grid"
    inside = np.all((near >= 0) & (near < np.array(mask.shape)[:, None]), axis=0)
    got, want = vol.array.reshape(-1), np.zeros(idx.shape[1], mask.dtype)
    want[inside] = mask[tuple(near[:, inside])]
    np.testing.assert_array_equal(got, want)
    assert inside.all() or not want[~inside].any()
    assert int((got > 0).sum()) == int((mask > 0).sum()), "the SEG covers the whole mask"
    files = sorted(series.iterdir())
    assert len(seg_labels_on(seg, files)) == len(files)


def test_predict_both_writes_a_seg_equal_to_the_nifti_mask(bundle: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in"
    write_dicom(inp / "sag", phantom(), "sagittal")
    write_dicom(inp / "obl", phantom(seed=1), "oblique", origin=(40.0, -7.5, -120.0))
    write_dicom(inp / "ax", phantom(seed=2), "axial_lps", spacing_tag=1.0)  # a wrong SpacingBetweenSlices
    write_dicom(inp / "gappy", phantom((5, 6, 7)), "axial_lps", positions=[0, 1, 2, 4, 5])
    write_dicom(inp / "enhanced", phantom((4, 6, 7)), "axial_lps", multiframe=True)
    tilted = write_dicom(inp / "mixed", phantom((5, 6, 7)), "axial_lps")[2]
    ds = pydicom.dcmread(tilted)
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*ORIENTATIONS["oblique"][0], *ORIENTATIONS["oblique"][1])]
    ds.save_as(tilted)
    from test_studies import volume, write_series  # SimpleITK's writer: no FrameOfReferenceUID

    write_series(inp / "itk", volume((6, 9, 11)))
    shutil.copy(dicom_series_to_nifti(inp / "ax", tmp_path / "x.nii.gz"), inp / "nifti_study.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", str(bundle), "--input", str(inp), "--output", str(out), "--format", "both",
                 "--no-progress"]) == 1
    rows = _rows(out)
    assert rows["itk"]["status"] == "ok", rows["itk"]
    assert_seg_is_the_mask(out / "itk.seg.dcm", out / "itk.nii.gz", inp / "itk")
    assert hd.seg.segread(out / "itk.seg.dcm").FrameOfReferenceUID.startswith("1.2.826.0.1.3680043.8.498.")  # derived
    for sid in ("sag", "obl", "ax"):
        assert rows[sid]["status"] == "ok" and rows[sid]["error"] == "", rows[sid]
        assert rows[sid]["seg"] == str(out / f"{sid}.seg.dcm") and rows[sid]["output"] == str(out / f"{sid}.nii.gz")
        mask = np.asarray(nib.load(out / f"{sid}.nii.gz").dataobj)
        assert set(np.unique(mask)) == {0, 1, 2, 3}, "the analytic network finds every structure"
        assert_seg_is_the_mask(out / f"{sid}.seg.dcm", out / f"{sid}.nii.gz", inp / sid)
        # the mask is the thresholded source image (up to resampling at the edges): no flip, no transpose
        src = np.asarray(nib.load(dicom_series_to_nifti(inp / sid, tmp_path / f"{sid}.nii.gz")).dataobj)
        want = np.digitize(src, [-40, 40, 120])
        for label in (1, 2, 3):
            a, b = mask == label, want == label
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.75, (sid, label)
        seg = hd.seg.segread(out / f"{sid}.seg.dcm")
        assert seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Bone"
        assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"
    note = rows["nifti_study"]
    assert note["status"] == "ok" and "not a DICOM series" in note["error"] and note["seg"] == ""
    assert (out / "nifti_study.nii.gz").exists() and not (out / "nifti_study.seg.dcm").exists()
    assert rows["gappy"]["status"] == "failed" and "incomplete series" in rows["gappy"]["error"]
    assert rows["enhanced"]["status"] == "failed" and "multi-frame image (Enhanced CT" in rows["enhanced"]["error"]
    assert rows["mixed"]["status"] == "failed" and "mixes slice sizes or orientations" in rows["mixed"]["error"]
    for sid in ("gappy", "enhanced", "mixed"):
        assert "\n" not in rows[sid]["error"] and not list(out.glob(f"{sid}*"))
    assert not [f for f in out.iterdir() if f.name.startswith(".tmp-")]

    again = {r["study_id"]: r for r in predict(bundle, inp, out, progress=False, output_format="both")}
    assert {again[s]["status"] for s in ("sag", "obl", "ax", "itk", "nifti_study")} == {"skipped"}
    assert _rows(out)["nifti_study"]["error"] == note["error"] and _rows(out)["sag"]["seg"] == rows["sag"]["seg"]
    (out / "report.csv").unlink()  # rebuilt by a rerun: the volumes counted from the SEGs themselves
    predict(bundle, inp, out, progress=False, output_format="dicom-seg")
    rebuilt = _rows(out)
    for sid in ("sag", "obl", "ax", "itk"):
        assert rebuilt[sid]["status"] == "skipped"
        for name in LABELS[1:]:
            assert rebuilt[sid][f"voxels_{name}"] == rows[sid][f"voxels_{name}"], (sid, name)
            assert abs(float(rebuilt[sid][f"ml_{name}"]) - float(rows[sid][f"ml_{name}"])) <= 0.002, (sid, name)


def test_dicom_seg_only_keeps_the_seg_and_refuses_a_nifti_study(bundle: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in"
    write_dicom(inp / "sag", phantom((6, 9, 11)), "sagittal")
    shutil.copy(dicom_series_to_nifti(inp / "sag", tmp_path / "x.nii.gz"), inp / "nifti_study.nii.gz")
    out = tmp_path / "out"
    rows = {r["study_id"]: r for r in predict(bundle, inp, out, progress=False, output_format="dicom-seg",
                                              overrides={"save_probabilities": "float32"})}
    assert rows["sag"]["status"] == "ok" and rows["sag"]["output"] == ""
    assert rows["nifti_study"]["status"] == "failed" and "not a DICOM series" in rows["nifti_study"]["error"]
    assert sorted(f.name for f in out.glob("*.seg.dcm")) == ["sag.seg.dcm"]
    assert not (out / "sag.nii.gz").exists() and not (out / "nifti_study.nii.gz").exists()
    seg = hd.seg.segread(out / "sag.seg.dcm")  # probabilities kept: a FRACTIONAL SEG
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    probs = np.asarray(nib.load(out / "sag_probs.nii.gz").dataobj, dtype=np.float32)  # (X, Y, Z, K)
    nii = nib.load(dicom_series_to_nifti(inp / "sag", tmp_path / "sag.nii.gz"))
    want = to_frames(probs[..., 1:], nii.affine, source_datasets(inp / "sag"))
    files = [Path(ds.filename) for ds in source_datasets(inp / "sag")]
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    got = seg.get_pixels_by_source_instance(uids, dtype=np.float32)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1 / 255 + 1e-3
    again = predict(bundle, inp, out, progress=False, output_format="dicom-seg", overrides={"save_probabilities": "float32"})
    assert {r["study_id"]: r["status"] for r in again} == {"sag": "skipped", "nifti_study": "failed"}
    (out / "sag.seg.dcm").unlink()  # NIfTI masks there from an earlier run: a SEG-only run leaves them be
    predict(bundle, inp, out, progress=False)
    masks = {p.name: p.read_bytes() for p in out.glob("*.nii.gz") if not p.name.endswith("_probs.nii.gz")}
    assert set(masks) == {"sag.nii.gz", "nifti_study.nii.gz"}
    predict(bundle, inp, out, progress=False, output_format="dicom-seg")
    assert (out / "sag.seg.dcm").is_file() and not list(out.glob(".tmp-*"))
    assert {n: (out / n).read_bytes() for n in masks} == masks


# ---------------------------------------------------------------- series that are not one regular grid

_TILT = np.deg2rad(20)
#: a CT acquired with the gantry tilted 20 degrees: the slices' orientation is tilted about the
#: left-right axis, their positions advance along the table (LPS z), not along their normal
GANTRY_TILT = {"orientation": ((1, 0, 0), (0, np.cos(_TILT), np.sin(_TILT))), "advance": (0, 0, 1)}


def test_a_seg_beside_its_series_is_left_out_and_a_seg_alone_is_no_study(bundle: Path, tmp_path: Path) -> None:
    """A PACS export often puts a SEG (or RT structure set) in the CT's folder: the CT is the study
    and the SEG is left out (before: '2 DICOM series mixed in one folder'). The SEG written here is
    the same again, so the masks of both runs agree; a folder holding only a SEG is a failed study
    that says so (before: 'a multi-frame image')."""
    inp = tmp_path / "in"
    write_dicom(inp / "ct", phantom((6, 9, 11)), "axial_lps")
    rows = predict(bundle, inp, tmp_path / "out", progress=False, output_format="both")
    assert [r["status"] for r in rows] == ["ok"]
    shutil.copy(tmp_path / "out" / "ct.seg.dcm", inp / "ct" / "ct.seg.dcm")
    (inp / "segonly").mkdir()
    shutil.copy(tmp_path / "out" / "ct.seg.dcm", inp / "segonly" / "old.seg.dcm")
    rows = {r["study_id"]: r for r in predict(bundle, inp, tmp_path / "again", progress=False, output_format="both")}
    assert rows["ct"]["status"] == "ok", rows["ct"]["error"]
    first, again = (np.asarray(nib.load(d / "ct.nii.gz").dataobj) for d in (tmp_path / "out", tmp_path / "again"))
    assert np.array_equal(first, again)
    seg = hd.seg.segread(tmp_path / "again" / "ct.seg.dcm")  # it references the CT's slices, not the old SEG
    referenced = {str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    ct = [f for f in (inp / "ct").iterdir() if f.name != "ct.seg.dcm"]
    assert referenced == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in ct}
    assert rows["segonly"]["status"] == "failed"
    assert rows["segonly"]["error"].endswith("segonly: no image series, only Segmentation objects")


def _legacy_enhanced(folder: Path, files: list[Path], descending: bool) -> Path:
    """The single-frame ``files`` as one Legacy Converted Enhanced CT file (highdicom), frames in
    ascending or descending order of position (highdicom picks one; the other is made by
    reversing the frames and their per-frame positions)."""
    mf = hd.legacy.LegacyConvertedEnhancedCTImage([pydicom.dcmread(f) for f in files], series_instance_uid=hd.UID(),
                                                  series_number=4, sop_instance_uid=hd.UID(), instance_number=1)
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in mf.PerFrameFunctionalGroupsSequence]
    if (z[0] > z[-1]) != descending:
        mf.PixelData = np.ascontiguousarray(mf.pixel_array[::-1]).tobytes()
        mf.PerFrameFunctionalGroupsSequence = pydicom.Sequence(list(mf.PerFrameFunctionalGroupsSequence)[::-1])
    folder.mkdir(parents=True)
    mf.save_as(folder / "enhanced.dcm")
    return folder


def test_odd_series_are_refused_from_their_headers_before_any_inference(
        bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gantry-tilted series, multi-frame (Enhanced) objects (frames in either order) and a
    series of mixed pixel spacings each fail as their own study, in one line naming the folder and
    the problem, before the model runs (even with --format nifti, which reads no SEG sources)."""
    import pipeline.predict

    ran: list[int] = []
    run_model = pipeline.predict.run_model
    monkeypatch.setattr(pipeline.predict, "run_model", lambda *a: ran.append(1) or run_model(*a))
    inp = tmp_path / "in"
    write_dicom(inp / "ok", phantom((6, 9, 11)), "axial_lps")
    write_dicom(inp / "tilted", phantom((6, 9, 11)), GANTRY_TILT["orientation"], spacing=(0.9, 1.1, 2.5),
                advance=GANTRY_TILT["advance"])
    single = write_dicom(tmp_path / "single", phantom(), "axial_lps")
    for order in ("ascending", "descending"):
        _legacy_enhanced(inp / f"enhanced_{order}", single, order == "descending")
    write_dicom(inp / "enhanced_ct", phantom((4, 6, 7)), "axial_lps", multiframe=True)
    for f in write_dicom(inp / "mixed_spacing", phantom((6, 9, 11)), "axial_lps")[3:]:
        ds = pydicom.dcmread(f)
        ds.PixelSpacing = [0.7, 0.7]
        ds.save_as(f)
    rows = {r["study_id"]: r for r in predict(bundle, inp, tmp_path / "out", progress=False, output_format="nifti")}
    assert rows["ok"]["status"] == "ok" and len(ran) == 1, "the model ran for the good series only"
    advice = "multi-frame (Enhanced) DICOM is not supported: export classic single-frame slices, or convert with dcm2niix"
    want = {
        "tilted": "gantry-tilted series: slices advance 20 degrees off the slice normal (IM0001.dcm lies 4.28 mm",
        "enhanced_ascending": f"enhanced.dcm is a multi-frame image (Legacy Converted Enhanced CT, 12 frames in one "
                              f"file); {advice}",
        "enhanced_descending": f"enhanced.dcm is a multi-frame image (Legacy Converted Enhanced CT, 12 frames in one "
                               f"file); {advice}",
        "enhanced_ct": f"IM0004.dcm is a multi-frame image (Enhanced CT, 4 frames in one file); {advice}",
        "mixed_spacing": "mixes pixel spacings 0.9 x 1.1 and 0.7 x 0.7 mm (IM000",
    }
    for sid, problem in want.items():
        error = rows[sid]["error"]
        assert rows[sid]["status"] == "failed" and error.startswith(f"{inp / sid}: ") and problem in error, rows[sid]
        assert "\n" not in error and not list((tmp_path / "out").glob(f"{sid}*"))
    assert "dcm2niix corrects gantry tilt" in rows["tilted"]["error"]


def test_source_datasets_refuses_mixed_pixel_spacings_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SEG's sources are read with pydicom, apart from SimpleITK's header check: a PixelSpacing
    that differs there is refused there too."""
    import pipeline.dicom_seg

    files = write_dicom(tmp_path / "ct", phantom((4, 5, 6)), "sagittal")
    ds = pydicom.dcmread(files[2])
    ds.PixelSpacing = [0.7, 0.7]
    ds.save_as(files[2])
    monkeypatch.setattr(pipeline.dicom_seg, "dicom_series_files", lambda folder: sorted(map(str, files)))
    with pytest.raises(InputError, match=r"series mixes pixel spacings 0.9 x 1.1 and 0.7 x 0.7 mm \(IM0002.dcm\)") as e:
        source_datasets(tmp_path / "ct")
    assert str(e.value).startswith(f"{tmp_path / 'ct'}: ")


#: origins at which an oblique 0.625 mm series with 1-decimal positions drifts 0.1-0.18 mm in-plane
#: (found by search; before ``position_decimals`` such series were refused: 8 in 30 random origins)
ROUNDED_OFF_ORIGINS = [(-141.73, 76.05, 11.44), (-64.05, 134.15, 138.52), (67.65, -4.85, 86.21)]


@pytest.mark.parametrize("case", ["one_decimal", "near_the_tolerance", *(f"oblique_one_decimal_{i}" for i in range(3))])
def test_a_series_the_reader_accepts_is_not_refused_by_the_seg_writer(tmp_path: Path, case: str) -> None:
    """The reader and the SEG writer share one tolerance (``pipeline.dicom_series.grid_tolerance_mm``):
    0.625 mm slices with positions written to 1 decimal (0.6 and 0.7 mm gaps; axial, or oblique,
    where the rounding of three coordinates puts slices up to 0.17 mm off the grid), and 0.5 mm voxels
    whose slices lie 0.09 mm (0.18 voxels, under the 0.1 mm floor) off the uniform grid along the
    normal and in-plane get a SEG whose frames land on their source pixels; 0.12 mm is refused by
    the reader when positions are written with 6 decimals."""
    from pipeline.studies import read_header

    frames = np.arange(12 * 5 * 6, dtype=np.int16).reshape(12, 5, 6) * 3 - 300  # every value unique
    if case == "one_decimal":
        files = write_dicom(tmp_path / "ct", frames, "axial_lps", origin=(-12.0, 30.0, -100.0),
                            spacing=(0.7, 0.7, 0.625), decimals=1)
    elif case.startswith("oblique_one_decimal"):
        origin = ROUNDED_OFF_ORIGINS[int(case[-1])]
        files = write_dicom(tmp_path / "ct", frames, "oblique", origin=origin, spacing=(0.7, 0.7, 0.625), decimals=1)
        exact = write_dicom(tmp_path / "exact", frames, "oblique", origin=origin, spacing=(0.7, 0.7, 0.625))
        assert 0.1 < _inplane_drift(files) < 0.18  # beyond the 0.1 mm floor, within 1-decimal rounding
        assert _inplane_drift(exact) < 1e-5
    else:
        lean = np.array([0.0, 0.0, 1.0]) + [0.09 / 11 / 0.5, 0, 0]  # the last slice 0.09 mm off along the rows
        at = [k + (0.09 / 0.5 if k == 5 else 0) for k in range(12)]
        files = write_dicom(tmp_path / "ct", frames, "axial_lps", spacing=(0.5, 0.5, 0.5), positions=at, advance=lean)
        write_dicom(tmp_path / "beyond", frames, "axial_lps", spacing=(0.5, 0.5, 0.5),
                    positions=[k + (0.12 / 0.5 if k == 5 else 0) for k in range(12)])
        with pytest.raises(InputError, match="non-uniform slice spacing"):
            read_header(tmp_path / "beyond")
    read_header(tmp_path / "ct")
    nii = nib.load(dicom_series_to_nifti(tmp_path / "ct", tmp_path / "ct.nii.gz"))
    labels = (np.asarray(nii.dataobj).astype(int) // 3 % 4).astype(np.uint8)
    out = write_dicom_seg(labels, nii.affine, source_datasets(tmp_path / "ct"), tmp_path / "ct.seg.dcm", LABELS, {})
    for f, got in zip(files, seg_labels_on(hd.seg.segread(out), files), strict=True):
        np.testing.assert_array_equal(got, pydicom.dcmread(f).pixel_array.astype(int) // 3 % 4, err_msg=f.name)


def _inplane_drift(files: list[Path]) -> float:
    """How far (mm) any slice's position lies from the first slice's along the rows or the columns
    (0 for a series that advances along its normal)."""
    iop = np.asarray(pydicom.dcmread(files[0], stop_before_pixels=True).ImageOrientationPatient, dtype=float)
    positions = np.array([pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient for f in files], dtype=float)
    return float(np.abs((positions - positions[0]) @ iop.reshape(2, 3).T).max())
