"""Find studies on disk — NIfTI files and DICOM series folders — and check their headers.

Headers only: ``read_header`` opens a NIfTI header with nibabel (lazily, no voxel data) or each
DICOM slice's header with SimpleITK, and refuses what cannot be loaded safely (missing,
unreadable, not an image, truncated, bad spacing, an absurd voxel count) with an InputError
naming the file and the problem. ``validate`` and the batch predictor share it.

DICOM series are grouped by SeriesInstanceUID (``ImageSeriesReader.GetGDCMSeriesIDs``). A series
is read as a regular grid (SimpleITK stacks the slices along the slice normal, spaced by the
first-to-last distance), so what is not one is refused before any voxel is read: a folder holding
several series; multi-frame (Enhanced) objects; slices of mixed sizes, orientations or pixel
spacings; a gantry-tilted (sheared) series; a missing or duplicated slice or non-uniform slice
spacing. A slice missing at either end of a series leaves no trace and passes.
``dicom_series_to_nifti`` writes a series as NIfTI (LPS -> RAS) so MONAI's NIfTI loader reads it.

Tolerance. Every slice must lie on that grid to within ``grid_tolerance_mm`` of its voxel size, along
the normal and in-plane; ``pipeline.dicom_seg`` accepts a mask on the series' grid with the same
tolerance, so a series read here is never refused by the SEG writer for its geometry.

    >>> find_studies(Path("incoming"))        # doctest: +SKIP
    [{'id': 'case_001', 'image': '/abs/incoming/case_001.nii.gz'}, {'id': 'ct_head', 'image': ...}]
    >>> find_studies(Path("mr"), channels=2)  # doctest: +SKIP
    [{'id': 'case', 'image': ['/abs/mr/case_0000.nii.gz', '/abs/mr/case_0001.nii.gz']}]
"""

from __future__ import annotations

import errno
import gzip
import logging
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError, first_line
from pipeline.fileio import write_nifti

log = logging.getLogger(__name__)

MAX_VOXELS = 2**31
NIFTI_SUFFIXES = (".nii.gz", ".nii")
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
MULTIFRAME_ADVICE = ("multi-frame (Enhanced) DICOM is not supported: export classic single-frame slices, "
                     "or convert with dcm2niix")


def grid_tolerance_mm(voxel_size: float) -> float:
    """How far (mm) a slice or frame may lie off the regular grid of a series along an axis whose
    voxels are ``voxel_size`` mm: ``max(GRID_TOL_VOXELS * voxel_size, GRID_TOL_MM)``.

    A tenth of a voxel moves nothing a network or a viewer can see. The 0.1 mm floor is the decimal
    rounding of ImagePositionPatient: exporters and anonymisers write it with as few as 1 decimal,
    which puts each slice up to 0.05 mm off and the grid through the first and last slices up to
    another 0.05 mm (a uniform 0.625 mm series written so is off by 0.16 voxels yet is uniform).
    That covers 2 decimals in any orientation, 1 decimal along the patient axes; an oblique
    series written with 1 decimal (each coordinate rounded) can be refused.
    The reader (slice positions, ``_check_stacking``/``_check_gaps``; pixel spacings) and the SEG
    writer (``pipeline.dicom_seg.to_frames``, per axis of the mask) both use this one rule."""
    return max(GRID_TOL_VOXELS * float(voxel_size), GRID_TOL_MM)


def pixel_spacings_differ(a: Any, b: Any, size: Any) -> bool:
    """Whether two in-plane pixel spacings (mm per axis, in the same order as ``size``, the
    pixels along each axis) put a slice's far edge further apart than ``grid_tolerance_mm``."""
    return any(abs(float(x) - float(y)) * max(int(n) - 1, 1) > grid_tolerance_mm(min(float(x), float(y)))
               for x, y, n in zip(a, b, size, strict=True))


def is_nifti(path: Path | str) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def study_id(path: Path | str) -> str:
    """The file name without ``.nii``/``.nii.gz`` (a DICOM folder: its name)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_header(path: Path | str, max_voxels: int = MAX_VOXELS) -> dict[str, Any]:
    """``{"shape", "affine" (RAS, 4x4), "pixdim", "dtype", "format"}`` from the header alone.
    InputError (one line: the file and the problem) unless ``path`` is a NIfTI file or a DICOM
    series folder whose header can be loaded: present, readable, not truncated, with positive
    finite spacing and at most ``max_voxels`` voxels."""
    path = Path(path)
    if path.is_dir():
        return _dicom_header(path, max_voxels)
    if not path.exists():
        raise InputError(f"{path}: {_missing_reason(path)}")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    if not is_nifti(path):
        raise InputError(f"{path}: not a NIfTI file (.nii, .nii.gz) or a DICOM series folder")
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    gz = path.name.lower().endswith(".gz")
    if gz and magic != b"\x1f\x8b":
        raise InputError(f"{path}: named .gz but not gzip-compressed")
    img = _nib_load(path)
    shape = tuple(int(n) for n in img.shape)
    nvox = math.prod(shape)
    _check_voxel_count(path, shape, nvox, max_voxels)
    hdr = img.header
    with (gzip.open if gz else open)(path, "rb") as f:  # nibabel's loaded header has pixdim "fixed"
        raw = type(hdr).from_fileobj(f, check=False)
    pixdim = tuple(float(v) for v in raw["pixdim"][1 : 1 + min(len(shape), 3)])
    _check_spacing(path, pixdim)
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: affine is not finite or is singular")
    dtype = hdr.get_data_dtype()
    expected = int(raw["vox_offset"]) + nvox * dtype.itemsize  # img.header has vox_offset reset to 0
    problem = _gzip_truncated(path, expected) if gz else (
        f"truncated: {size} bytes, the header needs {expected}" if size < expected else None)
    if problem:
        raise InputError(f"{path}: {problem}")
    return {"shape": shape, "affine": affine, "pixdim": pixdim, "dtype": dtype, "format": "nifti"}


def _missing_reason(path: Path) -> str:
    """Why ``path`` does not exist: missing, a broken symlink or a symlink loop."""
    if not path.is_symlink():
        return "missing file"
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop so; later versions raise OSError(ELOOP)
        return "symlink loop (the link points back to itself)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop (the link points back to itself)"
    return "missing file (broken symlink)"


def _nib_load(path: Path) -> Any:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InputError(f"{path}: truncated or corrupt gzip ({e or type(e).__name__})") from None
    except PermissionError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    except Exception as e:  # nibabel raises many kinds for a file that is not an image
        raise InputError(f"{path}: not a readable NIfTI image ({first_line(e)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI image (nibabel reads it as {type(img).__name__})")
    return img


def _check_voxel_count(path: Path, shape: tuple[int, ...], nvox: int, max_voxels: int) -> None:
    if nvox > max_voxels:
        raise InputError(f"{path}: header claims {nvox} voxels {shape}, more than the limit of "
                         f"{max_voxels}; refusing to allocate")
    if nvox == 0:
        raise InputError(f"{path}: header claims an empty image {shape}")


def _check_spacing(path: Path, spacing: tuple[float, ...]) -> None:
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"{path}: invalid voxel spacing {list(spacing)} (zero, negative or NaN)")


def _gzip_truncated(path: Path, expected: int) -> str | None:
    """None when the gzip stream holds at least ``expected`` bytes. The gzip trailer's ISIZE
    (size mod 2**32) answers without decompressing; only a mismatch decompresses, in chunks."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == expected % 2**32:
            return None
    total = 0
    try:
        with gzip.open(path, "rb") as g:
            while chunk := g.read(1 << 22):
                total += len(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        return f"truncated or corrupt gzip ({e or type(e).__name__})"
    return f"truncated: {total} bytes uncompressed, the header needs {expected}" if total < expected else None


# ---------------------------------------------------------------- DICOM


def dicom_series_files(folder: Path | str) -> list[str]:
    """The files of the one DICOM series in ``folder``, sorted along the slice normal.
    InputError for no series, several series (mixed folder) or an incomplete series."""
    return _dicom_series(Path(folder))["files"]


def _dicom_series(folder: Path) -> dict[str, Any]:
    import SimpleITK as sitk

    if not folder.is_dir():
        raise InputError(f"{folder}: missing DICOM series folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise InputError(f"{folder}: cannot read folder (permission denied)")
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not uids:
        raise InputError(f"{folder}: no DICOM series in folder")
    if len(uids) > 1:
        raise InputError(f"{folder}: {len(uids)} DICOM series mixed in one folder ({', '.join(uids)}); "
                         "put each series in a folder of its own")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uids[0])
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
        _check_stacking(folder, slices, direction, first["spacing"])
        _check_gaps(folder, slices, where)
        step = float(where[-1] - where[0]) / (len(slices) - 1)  # as SimpleITK spaces them: first to last
        out.update(size=(*first["size"][:2], len(slices)), spacing=(*first["spacing"][:2], step))
    return out


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
            "sop_class": r.GetMetaData("0008|0016").strip(" \0") if r.HasMetaDataKey("0008|0016") else ""}


def _check_stacking(folder: Path, slices: list[dict], direction: np.ndarray, spacing: Any) -> None:
    """Refuse slices that do not advance along their normal: a gantry-tilted CT (positions advance
    along the table while the orientation is tilted) or otherwise sheared stack, any slice off the
    normal through the first one by more than ``grid_tolerance_mm`` of a pixel, along a row or a
    column. Refused rather than de-sheared: a sheared grid can be written neither as a NIfTI qform
    (orthogonal axes only) nor as a regular DICOM SEG frame grid, and SimpleITK would stack the
    slices along the normal, misplacing slice k by k * step * tan(tilt)."""
    offsets = np.array([s["origin"] - slices[0]["origin"] for s in slices])
    inplane = offsets @ direction[:, :2]  # along the rows' and the columns' direction (mm)
    off = np.abs(inplane) / [grid_tolerance_mm(v) for v in spacing[:2]]
    k = int(off.max(axis=1).argmax())
    if off[k].max() <= 1:
        return
    shear = float(np.linalg.norm(inplane[k]))
    tilt = math.degrees(math.atan2(shear, float(offsets[k] @ direction[:, 2])))
    tol = min(grid_tolerance_mm(v) for v in spacing[:2])
    raise InputError(f"{folder}: gantry-tilted series: slices advance {tilt:.3g} degrees off the slice normal "
                     f"({Path(slices[k]['file']).name} lies {shear:.3g} mm off it in-plane, more than the {tol:.2g} "
                     "mm tolerated), a sheared grid that fits neither a NIfTI nor a DICOM SEG; resample it to an "
                     "untilted grid first (e.g. dcm2niix corrects gantry tilt)")


def _check_gaps(folder: Path, slices: list[dict], where: np.ndarray) -> None:
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
    tol = grid_tolerance_mm(step)
    if np.abs(off).max() <= tol:
        return
    ref = float(np.median(gaps))  # the usual gap
    for i, gap in enumerate(gaps):
        steps = max(1, round(gap / ref))
        fits = abs(gap - steps * ref) <= grid_tolerance_mm(ref)
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


def _dicom_header(folder: Path, max_voxels: int) -> dict[str, Any]:
    s = _dicom_series(folder)
    shape = tuple(int(n) for n in s["size"])
    _check_voxel_count(folder, shape, math.prod(shape), max_voxels)
    _check_spacing(folder, s["spacing"])
    return {"shape": shape, "affine": lps_to_ras_affine(s["direction"], s["spacing"], s["origin"]),
            "pixdim": tuple(s["spacing"]), "dtype": None, "format": "dicom"}


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


def find_studies(folder: Path | str, strict: bool = True, channels: int = 1) -> list[dict[str, Any]]:
    """Manifest-like entries ``{"id", "image"}`` for every NIfTI file and DICOM series folder under
    ``folder`` (recursively, hidden names skipped), sorted by id. The id is the path below
    ``folder`` without the NIfTI suffix, ``/`` replaced by ``_`` (a top-level file: its name).
    A mixed or incomplete DICOM folder raises InputError; with ``strict=False`` it is listed as a
    study instead, so batch work reports it as that study's failure and goes on with the rest.

    ``channels`` > 1 (a multi-channel bundle): NIfTI files named ``<case>_0000.nii.gz`` ..
    ``<case>_<channels-1>.nii.gz`` in one folder (nnU-Net v2's one file per channel) are one study
    ``<case>`` whose ``image`` is that list in channel order; a case with missing or extra channel
    files raises InputError, or with ``strict=False`` is listed with a ``problem`` for batch work
    to report. Other files stay one study each (e.g. 4D images with the channels inside). A folder
    whose NIfTI files all end in ``_0000`` is nnU-Net's one-channel layout: ``case_0000.nii.gz`` is
    study ``case``, as its label ``case.nii.gz`` is named."""
    import SimpleITK as sitk

    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    found: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        names = [n for n in filenames if not n.startswith(".")]
        studies: list[Path | list[Path]] = [here / n for n in names if is_nifti(n)]
        if channels > 1 or (studies and all(_channel_case(study_id(f))[1] == 0 for f in studies)):
            studies = _group_channel_files(studies, channels, strict)  # every file case_0000: nnU-Net's too
        if len([n for n in names if is_nifti(n)]) < len(names) and sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(here)):
            try:
                dicom_series_files(here)  # refuse mixed or incomplete series here, by folder name
            except InputError:
                if strict:
                    raise
            studies.append(here)
        for study in studies:
            path = study[0] if isinstance(study, list) else study
            rel = path.relative_to(root)
            stem = _channel_case(study_id(rel))[0] if isinstance(study, list) else study_id(rel)
            sid = "_".join((*rel.parts[:-1], stem)) if rel.parts else root.name
            if sid in found:  # e.g. a.nii beside a.nii.gz: one mask name for two studies
                clash = f"{path}: study id {sid!r} is also {found[sid]['image']}"
                if strict:
                    raise InputError(clash)
                found[sid]["problem"] = f"{clash}; rename one of them"  # fails as its own study
                continue
            image = ([str(p.absolute()) for p in study] if isinstance(study, list) and channels > 1
                     else str(path.absolute()))
            found[sid] = {"id": sid, "image": image}
            if isinstance(study, list) and [_channel_case(study_id(p))[1] for p in study] != list(range(channels)):
                found[sid]["problem"] = (f"{path.parent}: case {stem!r} has channel files "
                                         f"{', '.join(p.name for p in study)}; a {channels}-channel bundle "
                                         f"needs {stem}_0000 .. {stem}_{channels - 1:04d}")
    log.debug("found %d studies under %s", len(found), root)
    return [found[sid] for sid in sorted(found)]


def _channel_case(stem: str) -> tuple[str, int | None]:
    """``("case", 1)`` for ``case_0001``; ``(stem, None)`` for a name without a channel suffix."""
    head, sep, tail = stem.rpartition("_")
    return (head, int(tail)) if sep and head and len(tail) == 4 and tail.isdigit() else (stem, None)


def _group_channel_files(files: list[Path], channels: int, strict: bool) -> list[Path | list[Path]]:
    """Files named ``<case>_<NNNN>`` grouped per case in channel order (one file per channel); a
    group that is not exactly channels 0..``channels``-1 raises InputError when ``strict``. Numbers
    that cannot be channels (no 0000, or more files than channels: ``BRATS_0001``, ``BRATS_0002``,
    ...) are case names, one study each."""
    groups: dict[str, dict[int, Path]] = {}
    out: list[Path | list[Path]] = []
    for f in sorted(files):
        case, index = _channel_case(study_id(f))
        if index is None:
            out.append(f)
        else:
            groups.setdefault(case, {})[index] = f
    for case, by_index in groups.items():
        if 0 not in by_index or len(by_index) > channels:
            out.extend(by_index[i] for i in sorted(by_index))
            continue
        if sorted(by_index) != list(range(channels)) and strict:
            raise InputError(f"{next(iter(by_index.values())).parent}: case {case!r} has channel files "
                             f"{sorted(by_index)}, a {channels}-channel bundle needs 0..{channels - 1}")
        out.append([by_index[i] for i in sorted(by_index)])
    return out
