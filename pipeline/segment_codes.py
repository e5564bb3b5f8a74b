"""SNOMED CT codes for the segments of a DICOM SEG, from the label names.

A DICOM SEG codes each segment with a category and a type (``pipeline.dicom_seg`` reads them from
the ``dicom_seg`` block of a bundle's ``configs/metadata.json``; an uncoded label is "Tissue").
:func:`dicom_seg_block` writes that block for ``segpipe plan`` from :data:`TABLE`: a label's name
is split into words as :func:`pipeline.laterality.name_words` does, its side word (left/right,
l/r, lt/rt) taken out and the rest looked up without spaces or case (``left_parotid``,
``Parotid_L``, ``Kidney R``, ``LeftKidney``, ``BrainStem``, ``spinal cord``), so the type is the
organ's own code and the side, for a paired organ, the laterality ``modifier`` (SCT Left / Right,
CID 244, as DICOM's Segmented Property Type Modifier). A heart chamber's side is part of its name
(left ventricle), never a modifier. Names not in the table are left out of the block (the SEG's
"Tissue" fallback) and reported by :func:`dicom_seg_block`.

Codes are named by their keyword in pydicom's code dictionary (``codes.SCT.Liver``), never typed
as numbers; each entry is one triple ``[value, scheme, meaning]``, as the block stores them:

    >>> lookup("Parotid_L")["type"], lookup("Parotid_L")["modifier"]
    (['45289007', 'SCT', 'Parotid gland'], ['7771000', 'SCT', 'Left'])
    >>> dicom_seg_block(["background", "liver", "cell"])[1]
    ['cell']
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from pipeline.laterality import SIDES, heart_chamber, name_words

ANATOMY, TISSUE, ABNORMAL = "AnatomicalStructure", "Tissue", "MorphologicallyAbnormalStructure"
SIDE_CODES = {"L": "Left", "R": "Right"}  # SCT 7771000, 24028007 (CID 244 Laterality)

#: a label name's words without spaces (side word taken out) -> (category, type, paired): keywords
#: of ``pydicom.sr.codedict.codes.SCT``; types from CID 7151 (segmentation property types) and,
#: for tissues, CID 7191; ``paired``: the organ has a left and a right one (a side is a modifier)
TABLE: dict[str, tuple[str, str, bool]] = {
    # abdomen and pelvis
    "liver": (ANATOMY, "Liver", False),
    "kidney": (ANATOMY, "Kidney", True),
    "spleen": (ANATOMY, "Spleen", False),
    "pancreas": (ANATOMY, "Pancreas", False),
    "stomach": (ANATOMY, "Stomach", False),
    "gallbladder": (ANATOMY, "Gallbladder", False),
    "esophagus": (ANATOMY, "Esophagus", False),
    "oesophagus": (ANATOMY, "Esophagus", False),
    "duodenum": (ANATOMY, "Duodenum", False),
    "smallintestine": (ANATOMY, "SmallIntestine", False),
    "smallbowel": (ANATOMY, "SmallIntestine", False),
    "bowelsmall": (ANATOMY, "SmallIntestine", False),  # TG-263
    "colon": (ANATOMY, "Colon", False),
    "rectum": (ANATOMY, "Rectum", False),
    "bladder": (ANATOMY, "Bladder", False),
    "urinarybladder": (ANATOMY, "Bladder", False),
    "prostate": (ANATOMY, "Prostate", False),
    "uterus": (ANATOMY, "Uterus", False),
    "adrenalgland": (ANATOMY, "AdrenalGland", True),
    "adrenal": (ANATOMY, "AdrenalGland", True),
    "aorta": (ANATOMY, "Aorta", False),
    "inferiorvenacava": (ANATOMY, "InferiorVenaCava", False),
    "ivc": (ANATOMY, "InferiorVenaCava", False),
    "portalvein": (ANATOMY, "PortalVein", False),
    "femur": (ANATOMY, "Femur", True),
    # thorax
    "lung": (ANATOMY, "Lung", True),
    "heart": (ANATOMY, "Heart", False),
    "trachea": (ANATOMY, "Trachea", False),
    "breast": (ANATOMY, "Breast", True),
    "pulmonaryartery": (ANATOMY, "PulmonaryArtery", False),
    "leftventricle": (ANATOMY, "LeftVentricle", False),  # heart chambers: the side is in the name
    "rightventricle": (ANATOMY, "RightVentricle", False),
    "leftatrium": (ANATOMY, "LeftAtrium", False),
    "rightatrium": (ANATOMY, "RightAtrium", False),
    # head and neck (TG-263 names too)
    "brainstem": (ANATOMY, "BrainStem", False),
    "spinalcord": (ANATOMY, "SpinalCord", False),
    "parotid": (ANATOMY, "ParotidGland", True),
    "parotidgland": (ANATOMY, "ParotidGland", True),
    "submandibular": (ANATOMY, "SubmandibularGland", True),
    "submandibulargland": (ANATOMY, "SubmandibularGland", True),
    "glndsubmand": (ANATOMY, "SubmandibularGland", True),
    "mandible": (ANATOMY, "Mandible", False),
    "bonemandible": (ANATOMY, "Mandible", False),
    "larynx": (ANATOMY, "Larynx", False),
    "pharynx": (ANATOMY, "Pharynx", False),
    "thyroid": (ANATOMY, "Thyroid", False),
    "thyroidgland": (ANATOMY, "Thyroid", False),
    "glndthyroid": (ANATOMY, "Thyroid", False),
    "opticchiasm": (ANATOMY, "OpticChiasm", False),
    "chiasm": (ANATOMY, "OpticChiasm", False),
    "eye": (ANATOMY, "Eye", True),
    "eyeball": (ANATOMY, "Eyeball", True),
    # brain
    "brain": (ANATOMY, "Brain", False),
    "cerebellum": (ANATOMY, "Cerebellum", False),
    "hippocampus": (ANATOMY, "Hippocampus", True),
    "amygdala": (ANATOMY, "Amygdala", True),
    "thalamus": (ANATOMY, "Thalamus", True),
    "putamen": (ANATOMY, "Putamen", True),
    "lateralventricle": (ANATOMY, "LateralVentricle", True),
    "temporallobe": (ANATOMY, "TemporalLobe", True),
    # tissues
    "fat": (TISSUE, "AdiposeTissue", False),
    "adiposetissue": (TISSUE, "AdiposeTissue", False),
    "muscle": (TISSUE, "MuscleTissue", False),
    "bone": (TISSUE, "BoneTissue", False),
    "skin": (TISSUE, "Skin", False),
    "softtissue": (TISSUE, "SoftTissue", False),
    "cartilage": (TISSUE, "Cartilage", False),
    # abnormal structures
    "tumour": (ABNORMAL, "Neoplasm", False),
    "tumor": (ABNORMAL, "Neoplasm", False),
    "neoplasm": (ABNORMAL, "Neoplasm", False),
    "lesion": (ABNORMAL, "Lesion", False),
    "mass": (ABNORMAL, "Mass", False),
}


def code(keyword: str) -> list[str]:
    """``[value, scheme, meaning]`` of SNOMED CT concept ``keyword`` in pydicom's code dictionary
    (AttributeError for a keyword it does not have)."""
    return list(_code(keyword))


@cache
def _code(keyword: str) -> tuple[str, str, str]:
    from pydicom.sr.codedict import codes

    c = getattr(codes.SCT, keyword)
    return str(c.value), str(c.scheme_designator), str(c.meaning)


def segment(type_keyword: str, category_keyword: str = ANATOMY, modifier_keyword: str | None = None,
            description: str | None = None) -> dict[str, Any]:
    """One segment's entry in the ``dicom_seg`` block: category, type, optional modifier (a
    laterality, or another anatomic modifier such as Anterior) and free-text description."""
    entry: dict[str, Any] = {"category": code(category_keyword), "type": code(type_keyword)}
    if modifier_keyword:
        entry["modifier"] = code(modifier_keyword)
    if description:
        entry["description"] = description
    return entry


def lookup(name: str) -> dict[str, Any] | None:
    """The ``dicom_seg`` entry of label ``name`` (:data:`TABLE`), or None when the table has no
    code for it (or it names a side of an organ that has none: ``left_liver`` stays uncoded)."""
    words = name_words(name)
    marked = [i for i, w in enumerate(words) if w in SIDES]
    side = SIDES[words[marked[0]]] if len(marked) == 1 else None
    rest = "".join(w for i, w in enumerate(words) if not (side and i == marked[0]))
    if heart_chamber(name):  # left_ventricle, Ventricle_L: the side is part of the structure's name
        found = TABLE.get(SIDE_CODES[side].lower() + rest if side else rest)
        side = None
    else:
        found = TABLE.get("".join(words))  # the whole name first
        if found:
            side = None
        elif side:
            found = TABLE.get(rest)
            if found and not found[2]:
                return None
    if not found:
        return None
    category, kind, _ = found
    return segment(kind, category, SIDE_CODES[side] if side else None)


def dicom_seg_block(label_names: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``({"segments": {name: entry}}, uncoded names)`` for a bundle's labels (label 0, the
    background, is no segment): the ``dicom_seg`` block of its ``metadata.json``, and the names
    whose segments keep the generic "Tissue" code."""
    segments, uncoded = {}, []
    for name in list(label_names)[1:]:
        entry = lookup(str(name))
        if entry is None:
            uncoded.append(str(name))
        else:
            segments[str(name)] = entry
    return {"segments": segments}, uncoded


def uncoded_warning(uncoded: Sequence[str]) -> str:
    """The planner's warning for labels without a code ("" when there are none)."""
    if not uncoded:
        return ""
    value, scheme, meaning = code("Tissue")  # pipeline.dicom_seg's GENERIC_CODE (not imported: the planner's)
    names = ", ".join(repr(n) for n in uncoded)
    return (f"no SNOMED CT code for label(s) {names} (pipeline/segment_codes.py): their DICOM SEG segments are "
            f"coded {scheme} {value} \"{meaning}\"; give their codes in configs/metadata.json's dicom_seg block")
