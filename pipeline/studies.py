"""Find studies on disk — NIfTI files and DICOM series folders — and check their headers.

Headers only: ``read_header`` opens a NIfTI header with nibabel (lazily, no voxel data) or each
DICOM slice's header with SimpleITK, and refuses what cannot be loaded safely (missing,
unreadable, not an image, truncated, bad spacing, an absurd voxel count) with an InputError
naming the file and the problem. ``validate`` and the batch predictor share it.

A DICOM series folder's geometry, and what is refused before any voxel is read, is
``pipeline.dicom_series``'s.

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

from pipeline.dicom_files import series_ids
from pipeline.dicom_series import dicom_series, dicom_series_files, lps_to_ras_affine
from pipeline.errors import InputError, first_line
from pipeline.predict_stamp import STAMP

log = logging.getLogger(__name__)

MAX_VOXELS = 2**31
NIFTI_SUFFIXES = (".nii.gz", ".nii")
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


def _dicom_header(folder: Path, max_voxels: int) -> dict[str, Any]:
    s = dicom_series(folder)
    shape = tuple(int(n) for n in s["size"])
    _check_voxel_count(folder, shape, math.prod(shape), max_voxels)
    _check_spacing(folder, s["spacing"])
    return {"shape": shape, "affine": lps_to_ras_affine(s["direction"], s["spacing"], s["origin"]),
            "pixdim": tuple(s["spacing"]), "dtype": None, "format": "dicom"}


def find_studies(folder: Path | str, strict: bool = True, channels: int = 1) -> list[dict[str, Any]]:
    """Manifest-like entries ``{"id", "image"}`` for every NIfTI file and DICOM series folder under
    ``folder`` (recursively, hidden names skipped), sorted by id. The id is the path below
    ``folder`` without the NIfTI suffix, ``/`` replaced by ``_`` (a top-level file: its name).
    A folder below ``folder`` that holds ``segpipe predict``'s stamp (an earlier run's output) is
    left out with what is under it.
    A mixed or incomplete DICOM folder raises InputError; with ``strict=False`` it is listed as a
    study instead, so batch work reports it as that study's failure and goes on with the rest.

    ``channels`` > 1 (a multi-channel bundle): NIfTI files named ``<case>_0000.nii.gz`` ..
    ``<case>_<channels-1>.nii.gz`` in one folder (nnU-Net v2's one file per channel) are one study
    ``<case>`` whose ``image`` is that list in channel order; a case with missing or extra channel
    files raises InputError, or with ``strict=False`` is listed with a ``problem`` for batch work
    to report. Other files stay one study each (e.g. 4D images with the channels inside). A folder
    whose NIfTI files all end in ``_0000`` is nnU-Net's one-channel layout: ``case_0000.nii.gz`` is
    study ``case``, as its label ``case.nii.gz`` is named."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    found: dict[str, dict[str, Any]] = {}
    clashes: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if here != root and STAMP in filenames:  # an earlier segpipe predict's output: masks, not studies
            log.warning("%s: left out, the output of an earlier segpipe predict (%s says so): its masks are not "
                        "studies", here, STAMP)  # a warning: a folder of studies it also wrote into is left out too
            dirnames[:] = []
            continue
        names = [n for n in filenames if not n.startswith(".")]
        studies: list[Path | list[Path]] = [here / n for n in names if is_nifti(n)]
        if channels > 1 or (studies and all(_channel_case(study_id(f))[1] == 0 for f in studies)):
            studies = _group_channel_files(studies, channels, strict)  # every file case_0000: nnU-Net's too
        if len([n for n in names if is_nifti(n)]) < len(names) and series_ids(here):
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
                if strict:
                    raise InputError(f"{path}: study id {sid!r} is also {found[sid]['image']}")
                clashes.setdefault(sid, []).append(str(path.absolute()))  # all fail as one study, each named
                continue
            image = ([str(p.absolute()) for p in study] if isinstance(study, list) and channels > 1
                     else str(path.absolute()))
            found[sid] = {"id": sid, "image": image}
            if isinstance(study, list) and [_channel_case(study_id(p))[1] for p in study] != list(range(channels)):
                found[sid]["problem"] = (f"{path.parent}: case {stem!r} has channel files "
                                         f"{', '.join(p.name for p in study)}; a {channels}-channel bundle "
                                         f"needs {stem}_0000 .. {stem}_{channels - 1:04d}")
    for sid, others in clashes.items():
        found[sid]["problem"] = (f"{found[sid]['image']}: study id {sid!r} is also {' and '.join(others)}; "
                                 f"rename {'one of them' if len(others) == 1 else 'all but one'}")
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
