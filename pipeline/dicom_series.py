"""DICOM series folders: one regular grid or a one-line refusal, and the series as NIfTI.

A series is grouped by SeriesInstanceUID (``ImageSeriesReader.GetGDCMSeriesIDs``) and read as a
regular grid (SimpleITK stacks the slices along the slice normal, spaced by the first-to-last
distance), so what is not one is refused from the slice headers before any voxel is read
(``dicom_series``): a folder holding several image series (a SEG, RT structure set, report,
localizer or Secondary Capture beside one is left out, ``_image_series``); multi-frame
(Enhanced) objects; slices of mixed sizes, orientations or pixel spacings; a gantry-tilted
(sheared) series; a missing or duplicated slice or non-uniform slice spacing; a file that starts as
DICOM but is in no series (a slice cut short or damaged in the export, ``pipeline.dicom_files.damaged_files``). A slice
missing at either end of a series leaves no trace and passes. ``dicom_series_to_nifti`` writes a series as NIfTI (LPS -> RAS) so MONAI's NIfTI loader
reads it; ``pipeline.studies.read_header`` gives its header as for a NIfTI file.

Tolerance. Every slice must lie on that grid to within ``grid_tolerance_mm`` of its voxel size, along
the normal and in-plane; ``pipeline.dicom_seg`` accepts a mask on the series' grid with the same
tolerance, so a series read here is never refused by the SEG writer for its geometry.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dicom_files import damaged_files, quiet_itk, series_ids, sop_class
from pipeline.errors import InputError
from pipeline.fileio import write_nifti

log = logging.getLogger(__name__)
_SAID: set[tuple[str, str]] = set()  # (folder, what was left out) already logged by this process

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
#: How far a slice may lie off the regular grid a series is read as, shared with ``pipeline.dicom_seg``
#: (see ``grid_tolerance_mm``): a tenth of a voxel, and at least a tenth of a millimetre.
GRID_TOL_VOXELS = 0.1
GRID_TOL_MM = 0.1
#: SOP classes of multi-frame ("enhanced") images: one object holds the whole volume, its geometry in
#: per-frame functional groups that SimpleITK does not read
ENHANCED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT", "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR", "1.2.840.10008.5.1.4.1.1.4.3": "Enhanced MR Color",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR", "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET", "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced US Volume",
    "1.2.840.10008.5.1.4.1.1.12.1.1": "Enhanced XA", "1.2.840.10008.5.1.4.1.1.12.2.1": "Enhanced XRF",
    "1.2.840.10008.5.1.4.1.1.13.1.3": "Breast Tomosynthesis"}
#: SOP classes that are not an image series to segment but objects made from one, often exported into the
#: same folder (a SEG or an RT structure set beside the CT it outlines, a dose report)
DERIVED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation", "1.2.840.10008.5.1.4.1.1.66.5": "Surface Segmentation",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set", "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan", "1.2.840.10008.5.1.4.1.1.30": "Parametric Map",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR", "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR", "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection",
    "1.2.840.10008.5.1.4.1.1.88.67": "X-Ray Radiation Dose SR", "1.2.840.10008.5.1.4.1.1.11.1": "Presentation State"}
#: Secondary Capture Image Storage and its multi-frame variants (.1 to .4)
SECONDARY_CAPTURE_SOP = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_ADVICE = ("multi-frame (Enhanced) DICOM is not supported: export classic single-frame slices, "
                     "or convert with dcm2niix")


def grid_tolerance_mm(voxel_size: float, decimals: int | None = None) -> float:
    """How far (mm) a slice or frame may lie off the regular grid of a series along an axis whose
    voxels are ``voxel_size`` mm: ``max(GRID_TOL_VOXELS * voxel_size, GRID_TOL_MM)``, and with
    ``decimals`` (those ImagePositionPatient is written with, ``position_decimals``) at least
    what that rounding can do, ``sqrt(3) * 10**-decimals`` (one decimal at least).

    A tenth of a voxel moves nothing a network or a viewer can see. The 0.1 mm floor covers
    positions written with 2 decimals or more. Exporters and anonymisers write them with as few as
    1 decimal: each coordinate up to 0.05 mm off, so a slice up to 0.05 * sqrt(3) mm off along an
    oblique axis, and the grid through the first and last slices (or the first slice's own
    position) up to as much again: 0.17 mm, which ``decimals`` allows (a uniform oblique series
    written so is uniform; before, about 2 in 10 were refused).
    The reader (slice positions, ``_check_stacking``/``_check_gaps``; pixel spacings) and the SEG
    writer (``pipeline.dicom_seg.to_frames``, per axis of the mask) both use this one rule."""
    rounding = math.sqrt(3) * 10.0 ** -max(int(decimals), 1) if decimals is not None else 0.0
    return max(GRID_TOL_VOXELS * float(voxel_size), GRID_TOL_MM, rounding)


def position_decimals(positions: Any) -> int | None:
    """The decimals ImagePositionPatient is written with in ``positions`` (its values as written:
    ``"-12.5\\30\\-100.25"`` strings, or sequences of pydicom's DS values that keep their
    ``original_string``): the most any coordinate has, as writers write round values short
    (``30`` beside ``-12.345678``). None where none was written as text."""
    most = None
    for position in positions:
        values = position.split("\\") if isinstance(position, str) else [getattr(v, "original_string", None)
                                                                        for v in position]
        for v in values:
            if isinstance(v, str) and v.strip():
                text = v.strip().lower().split("e")[0]
                most = max(most or 0, len(text.split(".")[1]) if "." in text else 0)
    return most


def pixel_spacings_differ(a: Any, b: Any, size: Any) -> bool:
    """Whether two in-plane pixel spacings (mm per axis, in the same order as ``size``, the
    pixels along each axis) put a slice's far edge further apart than ``grid_tolerance_mm``."""
    return any(abs(float(x) - float(y)) * max(int(n) - 1, 1) > grid_tolerance_mm(min(float(x), float(y)))
               for x, y, n in zip(a, b, size, strict=True))


def dicom_series_files(folder: Path | str) -> list[str]:
    """The files of the one DICOM series in ``folder``, sorted along the slice normal.
    InputError for no series, several series (mixed folder) or an incomplete series."""
    return dicom_series(Path(folder))["files"]


def dicom_series(folder: Path) -> dict[str, Any]:
    import SimpleITK as sitk

    if not folder.is_dir():
        raise InputError(f"{folder}: missing DICOM series folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise InputError(f"{folder}: cannot read folder (permission denied)")
    uids = series_ids(folder)
    if not uids:
        raise InputError(f"{folder}: no DICOM series in folder")
    with quiet_itk():
        members = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in uids}
    damaged = damaged_files(folder, {Path(f).name for files in members.values() for f in files},
                             {sop_class(files[0]) for files in members.values() if files})
    if damaged:
        raise InputError(f"{folder}: {', '.join(damaged[:3])}{' ...' if len(damaged) > 3 else ''} cannot be read: "
                         f"DICOM file{'s' if len(damaged) > 1 else ''} cut short or damaged (export the series again)")
    uids = _image_series(folder, members)
    files = members[uids[0]]
    slices = [_slice_info(f) for f in files]
    for s in slices:
        if s["frames"] > 1 or s["sop_class"] in ENHANCED_SOP_CLASSES:
            kind = f"{ENHANCED_SOP_CLASSES[s['sop_class']]}, " if s["sop_class"] in ENHANCED_SOP_CLASSES else ""
            raise InputError(f"{folder}: {Path(s['file']).name} is a multi-frame image ({kind}{s['frames']} "
                             f"frame{'s' if s['frames'] != 1 else ''} in one file); {MULTIFRAME_ADVICE}")
    first = slices[0]
    for s in slices[1:]:
        if s["size"] != first["size"] or not np.allclose(s["direction"], first["direction"], atol=1e-4):
            raise InputError(f"{folder}: series {uids[0]} mixes slice sizes or orientations ({s['file']})")
        if pixel_spacings_differ(s["spacing"][:2], first["spacing"][:2], first["size"][:2]):
            raise InputError(f"{folder}: series {uids[0]} mixes pixel spacings {_pixel_spacing(first)} and "
                             f"{_pixel_spacing(s)} mm ({Path(s['file']).name}); one grid needs one spacing "
                             "(two reconstructions under one series UID?)")
    direction = first["direction"]
    normal = direction[:, 2]
    slices.sort(key=lambda s: float(normal @ s["origin"]))
    where = np.array([normal @ s["origin"] for s in slices])
    out = {"uid": uids[0], "files": [s["file"] for s in slices], "direction": direction,
           "origin": slices[0]["origin"], "size": first["size"], "spacing": first["spacing"]}
    if len(slices) > 1:
        decimals = position_decimals([s["position"] for s in slices])
        _check_stacking(folder, slices, direction, first["spacing"], decimals)
        _check_gaps(folder, slices, where, decimals)
        step = float(where[-1] - where[0]) / (len(slices) - 1)  # as SimpleITK spaces them: first to last
        out.update(size=(*first["size"][:2], len(slices)), spacing=(*first["spacing"][:2], step))
    return out


def _image_series(folder: Path, members: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The series of ``members`` (uid -> its files) to segment, leaving out, as long as another series remains, first
    derived objects (``DERIVED_SOP_CLASSES``: a SEG, RT structure set, report, ...), then
    localizers (ImageType LOCALIZER: a CT's scout or an MR's survey, exported with the study), then
    Secondary Capture images (a dose screenshot; some converters write a volume as SC, which is
    read when it is the only image series). InputError naming them when only derived objects, only
    localizers or only a single SC image are there (a folder per series of a PACS export has such
    folders: nothing to segment); several series left are refused, named by ``_series_names``."""
    uids = tuple(members)
    info = {uid: _series_tags(files) for uid, files in members.items()}
    derived = sorted({DERIVED_SOP_CLASSES[i["sop"]] for i in info.values() if i["sop"] in DERIVED_SOP_CLASSES})
    keep = [uid for uid in uids if info[uid]["sop"] not in DERIVED_SOP_CLASSES]
    if not keep:
        raise InputError(f"{folder}: no image series, only {', '.join(derived)} objects")
    is_sc = {uid: info[uid]["sop"].split(".")[:10] == SECONDARY_CAPTURE_SOP.split(".") for uid in keep}
    if all("LOCALIZER" in info[uid]["image_type"] for uid in keep):
        raise InputError(f"{folder}: only a localizer (scout) series ({_series_names(folder, keep, info)}): nothing "
                         "to segment")
    if all(is_sc[uid] and info[uid]["files"] == 1 for uid in keep):
        raise InputError(f"{folder}: only a single Secondary Capture image ({_series_names(folder, keep, info)}), a "
                         "screenshot rather than a volume: nothing to segment")
    left_out = [f"the {', '.join(derived)} object(s)"] if derived else []
    for what, drop in (("localizer", lambda i: "LOCALIZER" in i["image_type"]),
                       ("Secondary Capture", lambda i: i["sop"].split(".")[:10] == SECONDARY_CAPTURE_SOP.split("."))):
        rest = [uid for uid in keep if not drop(info[uid])]
        if rest and len(rest) < len(keep):
            left_out.append(f"{what} {_series_names(folder, [u for u in keep if u not in rest], info)}")
            keep = rest
    said = (os.path.abspath(folder), "; ".join(left_out))  # once: a predict reads a folder's headers 4 times,
    if left_out and said not in _SAID:  # named relatively and absolutely
        _SAID.add(said)
        log.info("%s: reading the image series, not %s beside it", folder, "; ".join(left_out))
    if len(keep) > 1:
        raise InputError(f"{folder}: {len(keep)} DICOM image series mixed in one folder "
                         f"({_series_names(folder, keep, info)}); put each series in a folder of its own")
    return tuple(keep)


def _series_tags(files: tuple[str, ...]) -> dict[str, Any]:
    """What tells a series apart, from its first file: SOP class, ImageType values (upper case),
    SeriesNumber, SeriesDescription, Modality, and the number of files. An unreadable file or a
    missing tag reads as empty (judged an image series)."""
    import pydicom

    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=[
            "SOPClassUID", "ImageType", "SeriesNumber", "SeriesDescription", "Modality"])
    except Exception:  # noqa: BLE001 - unreadable here: SimpleITK reports it when the slices are read
        ds = pydicom.Dataset()
    image_type = ds.get("ImageType", "")
    values = list(image_type) if isinstance(image_type, pydicom.multival.MultiValue) else str(image_type).split("\\")
    return {"sop": str(ds.get("SOPClassUID", "")), "image_type": [str(v).strip().upper() for v in values],
            "number": str(ds.get("SeriesNumber", "") or ""), "description": str(ds.get("SeriesDescription", "") or ""),
            "modality": str(ds.get("Modality", "") or ""), "files": len(files)}


def _series_names(folder: Path, uids: list[str], info: dict[str, dict[str, Any]]) -> str:
    """Series as a user finds them in a viewer: number, description, modality and file count (the
    UID where the series has neither number nor description)."""
    names = []
    for uid in uids:
        i = info[uid]
        name = " ".join(x for x in (f"series {i['number']}" if i["number"] else "",
                                    f'"{i["description"]}"' if i["description"] else "") if x) or f"series {uid}"
        detail = ", ".join(x for x in (i["modality"], f"{i['files']} file{'s' if i['files'] != 1 else ''}") if x)
        names.append(f"{name} ({detail})")
    return "; ".join(names)


def _pixel_spacing(s: dict[str, Any]) -> str:
    """A slice's PixelSpacing as DICOM writes it: between rows, between columns."""
    return f"{s['spacing'][1]:g} x {s['spacing'][0]:g}"


def _slice_info(file: str) -> dict[str, Any]:
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(file)
    try:
        r.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(f"{file}: unreadable DICOM slice ({str(e).strip().splitlines()[-1]})") from None
    size = tuple(r.GetSize())
    frames = r.GetMetaData("0028|0008").strip() if r.HasMetaDataKey("0028|0008") else ""
    return {"file": file, "origin": np.array(r.GetOrigin(), dtype=float), "size": size,
            "spacing": tuple(r.GetSpacing()), "direction": np.array(r.GetDirection(), dtype=float).reshape(3, 3),
            "frames": max(int(frames) if frames.isdigit() else 1, size[2] if len(size) > 2 else 1),
            "sop_class": r.GetMetaData("0008|0016").strip(" \0") if r.HasMetaDataKey("0008|0016") else "",
            "position": r.GetMetaData("0020|0032").strip(" \0") if r.HasMetaDataKey("0020|0032") else ""}


def _check_stacking(folder: Path, slices: list[dict], direction: np.ndarray, spacing: Any,
                    decimals: int | None = None) -> None:
    """Refuse slices that do not advance along their normal: a gantry-tilted CT (positions advance
    along the table while the orientation is tilted) or otherwise sheared stack, any slice off the
    normal through the first one by more than ``grid_tolerance_mm`` of a pixel, along a row or a
    column. Refused rather than de-sheared: a sheared grid can be written neither as a NIfTI qform
    (orthogonal axes only) nor as a regular DICOM SEG frame grid, and SimpleITK would stack the
    slices along the normal, misplacing slice k by k * step * tan(tilt)."""
    offsets = np.array([s["origin"] - slices[0]["origin"] for s in slices])
    inplane = offsets @ direction[:, :2]  # along the rows' and the columns' direction (mm)
    off = np.abs(inplane) / [grid_tolerance_mm(v, decimals) for v in spacing[:2]]
    k = int(off.max(axis=1).argmax())
    if off[k].max() <= 1:
        return
    shear = float(np.linalg.norm(inplane[k]))
    tilt = math.degrees(math.atan2(shear, float(offsets[k] @ direction[:, 2])))
    tol = min(grid_tolerance_mm(v, decimals) for v in spacing[:2])
    what = "gantry-tilted series" if shear > 0.5 else "sheared series"
    raise InputError(f"{folder}: {what}: slices advance {tilt:.3g} degrees off the slice normal "
                     f"({Path(slices[k]['file']).name} lies {shear:.3g} mm off it in-plane, more than the {tol:.2g} "
                     "mm tolerated), a sheared grid that fits neither a NIfTI nor a DICOM SEG; resample it to an "
                     "untilted grid first (e.g. dcm2niix corrects gantry tilt)")


def _check_gaps(folder: Path, slices: list[dict], where: np.ndarray, decimals: int | None = None) -> None:
    """Refuse duplicate positions and slices off the uniform grid SimpleITK stacks them on (first
    slice + k * the first-to-last distance / (n - 1)) by more than ``grid_tolerance_mm`` of that
    step: a gap of a whole number of steps (a missing slice), one other odd gap, or small
    differences adding up along the series. ``where``: the sorted positions along the normal."""
    names = [Path(s["file"]).name for s in slices]
    gaps = np.diff(where)
    for i, gap in enumerate(gaps):
        if gap < 1e-3:
            raise InputError(f"{folder}: duplicate slice position ({names[i]} and {names[i + 1]}); "
                             "incomplete or mixed series")
    step = float(where[-1] - where[0]) / (len(where) - 1)
    off = where - (where[0] + step * np.arange(len(where)))
    tol = grid_tolerance_mm(step, decimals)
    if np.abs(off).max() <= tol:
        return
    ref = float(np.median(gaps))  # the usual gap
    for i, gap in enumerate(gaps):
        steps = max(1, round(gap / ref))
        fits = abs(gap - steps * ref) <= grid_tolerance_mm(ref, decimals)
        if steps == 1 and fits:
            continue
        at = f"{gap:.3g} mm gap after slice {i} ({names[i]}) where slices are {ref:.3g} mm apart"
        if fits:
            raise InputError(f"{folder}: incomplete series: {at} (missing slice?)")
        raise InputError(f"{folder}: non-uniform slice spacing: {at}")
    k = int(np.abs(off).argmax())
    raise InputError(f"{folder}: non-uniform slice spacing: gaps of {gaps.min():.4g} to {gaps.max():.4g} mm add up "
                     f"to {names[k]} (slice {k}) lying {abs(off[k]):.3g} mm off the uniform {step:.4g} mm grid "
                     f"through the first and last slices (at most {tol:.3g} mm)")


def lps_to_ras_affine(direction: Any, spacing: Any, origin: Any) -> np.ndarray:
    """The NIfTI (RAS) voxel-to-world affine of an ITK/DICOM geometry given in LPS:
    direction (3x3, columns = axes), spacing and origin."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ np.asarray(direction, dtype=float).reshape(3, 3) @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(origin, dtype=float)
    return affine


def read_dicom_series(folder: Path | str) -> Any:
    """The checked series as a ``SimpleITK.Image`` (slices in the order of their positions)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_series_files(folder))
    # the slice positions are checked (``_check_gaps``, to ``grid_tolerance_mm``); ITK would still print a
    # multi-line "Non uniform sampling" warning for, e.g., positions written with 1 or 2 decimals
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise InputError(f"{folder}: cannot read DICOM series ({str(e).strip().splitlines()[-1]})") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)


def dicom_series_to_nifti(folder: Path | str, out_file: Path | str) -> Path:
    """Write the DICOM series in ``folder`` as a NIfTI file whose affine maps voxels to RAS
    millimetres (SimpleITK's LPS direction and origin converted), qform and sform both set."""
    import SimpleITK as sitk

    img = read_dicom_series(folder)
    affine = lps_to_ras_affine(img.GetDirection(), img.GetSpacing(), img.GetOrigin())
    data = np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0))  # (z, y, x) -> (x, y, z)
    out_file = write_nifti(data, out_file, affine=affine)
    log.debug("wrote %s from DICOM series %s", out_file, folder)
    return out_file
