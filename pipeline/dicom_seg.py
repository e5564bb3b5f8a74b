"""DICOM Segmentation objects (highdicom) for studies that came in as DICOM series.

``segpipe predict --format dicom-seg|both`` writes ``<id>.seg.dcm`` beside (or instead of) the
NIfTI mask: one DICOM SEG per study that references its source series (study, series, frame of
reference and, frame by frame, the source image each SEG frame segments), one segment per label
(the bundle's label names; coded concepts from the bundle's ``metadata.json`` where given, else
a generic "Tissue" code), the bundle's name and version as the segmentation algorithm, binary
encoding, or fractional where the bundle keeps probabilities (``--set save_probabilities=true``).

Geometry. The mask is written in the grid of the NIfTI converted from the series
(``pipeline.dicom_series.dicom_series_to_nifti``: RAS affine, x = column, y = row, z = slice). Rather
than trust that layout, :func:`to_frames` derives the mapping from the two geometries: the
source frames' own ImagePositionPatient / ImageOrientationPatient / PixelSpacing give the affine
from DICOM indices (column, row, frame) to RAS millimetres; composed with the inverse of the
mask's affine it must be a signed axis permutation with integer offsets (checked at the grid's
corners and at every frame's position, per axis to ``pipeline.dicom_series.grid_tolerance_mm``: a
tenth of a voxel, at least 0.1 mm, the tolerance the series reader applies to slice positions, so
a series it accepts is not refused here for its geometry), which is then applied with transposes
and flips. A mask whose grid is not the series' grid is refused, never resampled.

    >>> sources = source_datasets(Path("export/CT_abdomen"))           # doctest: +SKIP
    >>> write_dicom_seg(labels, affine, sources, Path("out/ct.seg.dcm"),  # doctest: +SKIP
    ...                 ["background", "liver"], {"name": "phantom_ct_3d", "version": "0.2.0"})
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dicom_series import (
    ENHANCED_SOP_CLASSES,
    MULTIFRAME_ADVICE,
    dicom_series_files,
    grid_tolerance_mm,
    pixel_spacings_differ,
    position_decimals,
)
from pipeline.errors import InputError, first_line
from pipeline.fileio import atomic_path

log = logging.getLogger(__name__)

SEG_SUFFIX = ".seg.dcm"
GENERIC_CODE = ("85756007", "SCT", "Tissue")  # SNOMED CT "Tissue": category and type of an uncoded label
_FLOAT_SLACK_VOXELS = 1e-3  # on top of the shared tolerance: the NIfTI affine is stored as float32


def source_datasets(folder: Path | str) -> list[Any]:
    """The headers (pydicom, no pixel data) of the one single-frame DICOM series in ``folder``,
    in the order of their positions along the slice normal. InputError (one line naming the
    folder) for what a SEG cannot reference frame by frame: no series, several series, missing
    or duplicated slices, mixed pixel spacings, a tilted stack (``pipeline.dicom_series``), multi-frame
    (enhanced) objects, slices without position or orientation, or slices of different studies or
    frames of reference (the checks that read tags SimpleITK does not are repeated here). A series
    without any FrameOfReferenceUID (some exporters leave the required tag out) gets one derived
    from its series UID, with a warning. SpacingBetweenSlices is dropped from these copies: the
    SEG's is measured from the frames' positions."""
    import pydicom

    folder = Path(folder)
    files = dicom_series_files(folder)
    sources = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as e:  # noqa: BLE001 - pydicom raises many kinds for a broken file
            raise InputError(f"{f}: unreadable DICOM slice ({first_line(e)})") from None
        sop_class = str(getattr(ds, "SOPClassUID", ""))
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if sop_class in ENHANCED_SOP_CLASSES or frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            kind = f"{ENHANCED_SOP_CLASSES[sop_class]}, " if sop_class in ENHANCED_SOP_CLASSES else ""
            raise InputError(f"{folder}: {Path(f).name} is a multi-frame image ({kind}{frames} "
                             f"frame{'s' if frames != 1 else ''} in one file); {MULTIFRAME_ADVICE}")
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                               "StudyInstanceUID", "SOPInstanceUID") if k not in ds]
        if missing:
            raise InputError(f"{folder}: {Path(f).name} lacks {', '.join(missing)}; cannot reference it in a DICOM SEG")
        if "SpacingBetweenSlices" in ds:  # often absent or wrong (1 where slices are 2.5 mm apart); highdicom
            del ds.SpacingBetweenSlices  # would copy it into the SEG, so let it measure the frames' positions
        if sources and pixel_spacings_differ(ds.PixelSpacing, sources[0].PixelSpacing,
                                             (sources[0].Rows, sources[0].Columns)):
            spacings = " and ".join(" x ".join(f"{float(v):g}" for v in d.PixelSpacing) for d in (sources[0], ds))
            raise InputError(f"{folder}: series mixes pixel spacings {spacings} mm ({Path(f).name}); "
                             "one grid needs one spacing (two reconstructions under one series UID?)")
        sources.append(ds)
    for key in ("StudyInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(key)) for ds in sources}
        if len(values) > 1:
            raise InputError(f"{folder}: slices of one series name {len(values)} different {key}s")
    if "FrameOfReferenceUID" not in sources[0]:  # required, but some exporters leave it out
        from pydicom.uid import generate_uid

        uid = generate_uid(entropy_srcs=[str(sources[0].get("SeriesInstanceUID", folder)), "frame-of-reference"])
        log.warning("%s: the series has no FrameOfReferenceUID; its DICOM SEG uses %s, derived from the "
                    "series UID (the same for every run)", folder, uid)
        for ds in sources:
            ds.FrameOfReferenceUID = uid
    normal = np.cross(*_orientation(sources[0]))
    return sorted(sources, key=lambda ds: float(normal @ np.asarray(ds.ImagePositionPatient, dtype=float)))


def _orientation(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """(row direction, column direction) in LPS: the directions of increasing column and row index."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    return iop[:3], iop[3:]


def dicom_affine(sources: Sequence[Any]) -> np.ndarray:
    """The 4x4 affine from DICOM indices (column, row, frame) of ``sources`` (in frame order) to
    RAS millimetres, from the frames' own position, orientation and pixel spacing."""
    row_dir, col_dir = _orientation(sources[0])
    row_spacing, col_spacing = (float(v) for v in sources[0].PixelSpacing)  # between rows, between columns
    positions = np.array([ds.ImagePositionPatient for ds in sources], dtype=float)
    if len(sources) > 1:
        step = (positions[-1] - positions[0]) / (len(sources) - 1)
    else:
        step = np.cross(row_dir, col_dir) * float(getattr(sources[0], "SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * col_spacing, col_dir * row_spacing, step, positions[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def to_frames(volume: np.ndarray, affine: np.ndarray, sources: Sequence[Any], name: str = "mask") -> np.ndarray:
    """``volume`` (X, Y, Z[, C]) in the grid of ``affine`` (RAS) as source frames: an array
    (frames, rows, columns[, C]) whose ``[k]`` lies on ``sources[k]`` pixel for pixel. InputError
    naming ``name`` unless the two grids are the same up to an axis permutation and flips."""
    a_dicom = dicom_affine(sources)
    m = np.linalg.inv(np.asarray(affine, dtype=float)) @ a_dicom  # DICOM index -> volume index
    perm = np.abs(m[:3, :3]).argmax(axis=0)  # volume axis of each DICOM axis
    signs = np.sign(m[perm, [0, 1, 2]])
    p = np.zeros((3, 3))
    p[perm, [0, 1, 2]] = signs
    dicom_shape = (int(sources[0].Columns), int(sources[0].Rows), len(sources))
    offset = np.rint(m[:3, 3])
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in dicom_shape], indexing="ij")).reshape(3, -1)
    frames_at = np.linalg.inv(np.asarray(affine, dtype=float)) @ np.c_[
        np.array([ds.ImagePositionPatient for ds in sources], dtype=float) * [-1, -1, 1], np.ones(len(sources))].T
    errors = np.maximum(  # per volume axis, in voxels
        np.abs(m[:3, :3] @ corners + m[:3, 3:] - (p @ corners + offset[:, None])).max(axis=1),
        np.abs(frames_at[:3] - (p[:, 2:] * np.arange(len(sources)) + offset[:, None])).max(axis=1))
    voxel = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    decimals = position_decimals([ds.ImagePositionPatient for ds in sources])
    tolerance = np.array([grid_tolerance_mm(v, decimals) / v for v in voxel]) + _FLOAT_SLACK_VOXELS
    error = float(errors.max())
    shape = tuple(volume.shape[:3])
    if sorted(perm) != [0, 1, 2] or (errors > tolerance).any() or tuple(shape[i] for i in perm) != dicom_shape:
        raise InputError(f"{name}: grid {list(shape)} does not lie on the source series' grid "
                         f"({dicom_shape[2]} frames of {dicom_shape[1]}x{dicom_shape[0]}; off by up to {error:.3g} "
                         "voxels); refusing to write a DICOM SEG that would not overlay its images")
    arr = np.transpose(volume, (*perm, *range(3, volume.ndim)))  # arr[c, r, k] = volume[b], b[perm[j]] = a_j
    for j, i in enumerate(perm):
        if offset[i] != (shape[i] - 1 if signs[j] < 0 else 0):
            raise InputError(f"{name}: grid is shifted by {offset[i]:g} voxels from the source series' grid")
        if signs[j] < 0:
            arr = np.flip(arr, axis=j)
    return np.ascontiguousarray(np.swapaxes(arr, 0, 2))  # (c, r, k) -> (k, r, c)


def segment_codes(metadata: Mapping[str, Any], name: str) -> tuple[Any, Any]:
    """(category, type) coded concepts of label ``name`` from a bundle's metadata:

        "dicom_seg": {"segments": {"liver": {"category": ["91723000", "SCT", "Anatomical Structure"],
                                             "type": ["10200004", "SCT", "Liver"]}}}

    (value, scheme designator, meaning), keys matched ignoring case; else the generic code. An
    entry's ``"modifier"`` (e.g. ``["7771000", "SCT", "Left"]``, ``pipeline.segment_codes``) goes
    into the type's Segmented Property Type Modifier Code Sequence, as DICOM nests it."""
    from highdicom.sr import CodedConcept

    given = segment_entry(metadata, name)
    category, prop = (CodedConcept(*map(str, given.get(key) or GENERIC_CODE)) for key in ("category", "type"))
    if given.get("type") and given.get("modifier"):  # highdicom keeps a CodedConcept's extra attributes
        prop.SegmentedPropertyTypeModifierCodeSequence = [CodedConcept(*map(str, given["modifier"]))]
    return category, prop


def segment_entry(metadata: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The ``dicom_seg.segments`` entry of label ``name`` in a bundle's metadata (case ignored), or {}."""
    segments = {str(k).lower(): v for k, v in (metadata.get("dicom_seg", {}) or {}).get("segments", {}).items()}
    return dict(segments.get(name.lower(), {}))


def write_dicom_seg(labels: np.ndarray, affine: np.ndarray, sources: Sequence[Any], out_file: Path | str,
                    label_names: Sequence[str], algorithm: Mapping[str, Any],
                    probabilities: np.ndarray | None = None, colours: Sequence[Sequence[float]] | None = None) -> Path:
    """Write ``labels`` (X, Y, Z integer label map in the grid of ``affine``) as a DICOM SEG on
    ``sources`` (:func:`source_datasets`), atomically, and return its path.

    One segment per label but background (segment number = label value, label = its name); the
    algorithm is ``algorithm["name"]`` version ``algorithm["version"]`` (a bundle's metadata,
    whose ``dicom_seg`` codes are used too). With ``probabilities`` (K, X, Y, Z) the encoding is
    FRACTIONAL (probability per segment), else BINARY. ``colours``: RGB in 0..1 per label."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from pipeline import __version__

    out_file = Path(out_file)
    names = list(label_names)
    if len(names) < 2:
        raise InputError(f"{out_file.name}: a DICOM SEG needs at least one foreground label, the bundle names {names}")
    algo = hd.AlgorithmIdentificationSequence(name=str(algorithm.get("name") or "segpipe"),
                                              family=codes.cid7162.ArtificialIntelligence,
                                              version=str(algorithm.get("version") or __version__), source="segpipe")
    descriptions = []
    for number, name in enumerate(names[1:], start=1):
        category, prop = segment_codes(algorithm, name)
        colour = None
        if colours is not None:
            colour = hd.color.CIELabColor.from_rgb(*(int(round(255 * float(c))) for c in colours[number][:3]))
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=prop, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo, display_color=colour))
        if text := segment_entry(algorithm, name).get("description"):
            descriptions[-1].SegmentDescription = str(text)[:64]  # LO
    stem = out_file.name.removesuffix(SEG_SUFFIX)
    if probabilities is not None:
        stacked = np.moveaxis(np.asarray(probabilities, dtype=np.float32)[1:], 0, -1).clip(0, 1)
        pixels, seg_type = to_frames(stacked, affine, sources, stem), hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        pixels = to_frames(np.asarray(labels, dtype=np.uint8), affine, sources, stem)
        if int(pixels.max()) >= len(names):
            raise InputError(f"{stem}: label {int(pixels.max())} has no name (the bundle names {len(names)} labels)")
        seg_type = hd.seg.SegmentationTypeValues.BINARY
    try:
        seg = hd.seg.Segmentation(
            source_images=list(sources), pixel_array=pixels, segmentation_type=seg_type,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9901,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="segpipe",
            manufacturer_model_name=str(algorithm.get("name") or "segpipe")[:64],
            software_versions=f"segpipe {__version__}", device_serial_number="segpipe",
            content_label="SEGPIPE", content_description=f"{algo[0].AlgorithmName} {algo[0].AlgorithmVersion}"[:64],
            series_description=f"SEG {algo[0].AlgorithmName}"[:64],
            omit_empty_frames=bool(pixels.any()),  # an empty result still gets its frames
        )
    except (ValueError, TypeError, AttributeError) as e:
        raise InputError(f"{stem}: cannot build the DICOM SEG ({first_line(e)})") from None
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_file) as tmp:
        seg.save_as(tmp)
    log.debug("wrote %s (%d frames, %s)", out_file, int(seg.NumberOfFrames), seg_type.value)
    return out_file
