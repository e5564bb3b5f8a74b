"""Files every stage shares: atomic writes, reading a label map, writing a NIfTI image.

- ``atomic_path(path)``: a temporary name beside ``path`` that is renamed onto it when the block
  ends without an error (``os.replace``), and deleted otherwise: a reader never sees half a file
  and a killed writer leaves the previous file intact.
- ``locked(path)``: an exclusive lock on the file ``path`` for the block (``flock``): processes
  that share a folder (batch shards, folds run side by side) take turns at what they share.
- ``read_label(path)``: a NIfTI label map as an integer array (spatial axes only), its affine and
  voxel spacing, or one ``InputError`` line naming the file.
- ``write_nifti(array, path, ...)``: a NIfTI written atomically with the geometry of a source
  image (affine, qform and sform with their codes) or of an affine, optionally marked as labels.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError, first_line

NIFTI_INTENT_LABEL = 1002
#: this machine in temp names (8 hex digits of its host name's SHA-1): a process cleaning a folder
#: that other machines share (batch shards on a network file system) can tell their temp files apart
HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temp_prefix() -> str:
    """``.tmp-<pid>.<host>-``: the start of this process's temp names (``pipeline.predict_io``
    deletes those of dead processes of this machine only)."""
    return f".tmp-{os.getpid()}.{HOST}-"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a hidden temporary path in ``path``'s folder (``.tmp-<pid>.<host>-<name>``, so a
    batch run can tell its own temp files from a dead process's, and from another machine's);
    rename it onto ``path`` on success, delete it on failure."""
    path = Path(path)
    tmp = path.with_name(f"{temp_prefix()}{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_made_folders(folders: Sequence[Path]) -> list[Path]:
    """``rmdir`` the folders a failed run made, innermost first, stopping at the first that is not
    empty (or gone): it and its parents stay, so nothing that was there before, or that anyone put
    there, is deleted. Returns those removed."""
    removed = []
    for d in folders:
        try:
            Path(d).rmdir()
        except OSError:
            break
        removed.append(Path(d))
    return removed


@contextmanager
def locked(path: Path | str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block; released when
    the block ends or the process dies."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


#: a float label value within this of an integer is that integer (``read_label``; ``pipeline.validation`` alike)
LABEL_ROUNDING = 1e-3


def read_label(path: Path | str, max_values: int | None = None) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """``(labels, affine, spacing)`` of a NIfTI label map: integer values (a float file's values
    within ``LABEL_ROUNDING`` of integers are rounded, others refused, NaN and Inf too),
    trailing singleton axes dropped, 2D or 3D; spacing in mm from the header. ``max_values``
    refuses a file with more distinct values (an image given as a label)."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - nibabel raises many kinds for a file that is not an image
        raise InputError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {first_line(e)})") from None
    while data.ndim > 2 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise InputError(f"{path}: expected a 2D or 3D label map, got shape {data.shape}")
    if max_values is not None and np.unique(data).size > max_values:
        raise InputError(f"{path}: over {max_values} distinct values; an image, not a label?")
    if np.issubdtype(data.dtype, np.floating):  # float storage of integer labels: rounded
        rounded = np.rint(data)
        off = ~(np.abs(data - rounded) <= LABEL_ROUNDING)  # NaN and Inf are off too
        if off.any():
            raise InputError(f"{path}: non-integer label values (e.g. {float(data[off].flat[0]):g}); not a label map")
        data = rounded.astype(np.int64)
    elif not np.issubdtype(data.dtype, np.integer):
        raise InputError(f"{path}: label data type {data.dtype} is not numeric")
    spacing = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
    return data, np.asarray(img.affine, dtype=float), spacing


def write_nifti(array: np.ndarray, path: Path | str, affine: np.ndarray | None = None,
                like: Path | str | None = None, labels: bool = False) -> Path:
    """Write ``array`` as NIfTI atomically. Geometry from ``like`` (a NIfTI file: its affine,
    qform and sform with their codes, so viewers place both alike) or else ``affine`` (qform and
    sform both set to it, code 1 = scanner, millimetres). ``labels`` marks the file as a label map
    (NIFTI_INTENT_LABEL, no scaling). The data type is the array's."""
    import nibabel as nib

    img: Any
    if like is not None:
        src = nib.load(str(like))
        img = nib.Nifti1Image(array, src.affine, header=src.header.copy())
        img.set_qform(*src.get_qform(coded=True))
        img.set_sform(*src.get_sform(coded=True))
    elif affine is not None:
        img = nib.Nifti1Image(array, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
    else:
        raise ValueError("write_nifti needs a source image (like) or an affine")
    img.set_data_dtype(array.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if labels:
        img.header["intent_code"] = NIFTI_INTENT_LABEL
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path
