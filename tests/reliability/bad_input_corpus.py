"""The bad-input corpus: builders that write each kind of broken (or valid but odd) input.

``KINDS`` maps a kind's name to its ``Kind``: what it breaks (the image, the label or the
manifest of a one-case dataset), how, and the words the refusal must contain. ``build`` writes a
one-case dataset broken as a kind says; image kinds' builders also write straight into a folder
of studies for batch prediction.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from test_studies import volume, write_series  # the DICOM writer of the studies tests

from pipeline.errors import InputError
from pipeline.fileio import write_nifti
from pipeline.phantoms import ct_phantom
from pipeline.studies import read_header
from pipeline.synthetic import CT_LABELS

SHAPE = (16, 16, 8)
SPACING = (0.8, 0.8, 2.5)
ORIGIN = (-6.0, -6.0, -10.0)
AS_ROOT = os.geteuid() == 0  # root reads files whatever their mode


def affine(spacing: tuple[float, ...] = SPACING, rotation: np.ndarray | None = None) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = (np.eye(3) if rotation is None else rotation) @ np.diag(spacing)
    a[:3, 3] = ORIGIN
    return a


RAS = affine()


def phantom(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    return ct_phantom(shape, np.random.default_rng(seed))[0]


def nii(path: Path, data: np.ndarray, aff: np.ndarray = RAS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_nifti(np.asarray(data), path, affine=aff)


def patch_header(path: Path, offset: int, fmt: str, *values: Any) -> Path:
    """Overwrite raw header bytes (nibabel would repair them on save)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into(fmt, raw, offset, *values)
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


# ---------------------------------------------------------------- image kinds: make(folder, name) -> path


def _bytes(data: bytes) -> Callable[[Path, str], Path]:
    def make(folder: Path, name: str) -> Path:
        (p := folder / f"{name}.nii.gz").write_bytes(data)
        return p
    return make


def _truncated(folder: Path, name: str) -> Path:
    p = nii(folder / f"{name}.nii.gz", phantom())
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p


def _huge_header(folder: Path, name: str) -> Path:
    """A NIfTI-2 header claiming 50,000^3 int16 voxels (250 TB) and a 64-byte payload."""
    hdr = nib.Nifti2Header()
    hdr.set_data_shape((50_000,) * 3)
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 544
    (p := folder / f"{name}.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + bytes(4) + bytes(64)))
    return p


def _zeros(shape: tuple[int, ...]) -> Callable[[Path, str], Path]:
    return lambda folder, name: nii(folder / f"{name}.nii.gz", np.zeros(shape, np.int16))


def _pixdim(value: float) -> Callable[[Path, str], Path]:
    return lambda folder, name: patch_header(nii(folder / f"{name}.nii.gz", phantom()), 76 + 4 * 2, "<f", value)


def _nan_inf(folder: Path, name: str) -> Path:
    data = phantom().astype(np.float32)
    data[1, 1, 1] = data[2, 2, 2] = np.nan
    data[3, 3, 3] = np.inf
    return nii(folder / f"{name}.nii.gz", data)


def _odd(shape: tuple[int, ...] = SHAPE, aff: np.ndarray = RAS) -> Callable[[Path, str], Path]:
    return lambda folder, name: nii(folder / f"{name}.nii.gz", phantom(shape), aff)


def _oblique_rotation() -> np.ndarray:
    z, x = np.deg2rad(20), np.deg2rad(10)
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return rz @ rx


def _lps(folder: Path, name: str) -> Path:
    """The good_0 study (seed 0, RAS) stored in LPS voxel order: same voxels in the world."""
    aff = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    aff[:3, 3] = RAS[:3, :3] @ [SHAPE[0] - 1, SHAPE[1] - 1, 0] + ORIGIN
    return nii(folder / f"{name}.nii.gz", phantom()[::-1, ::-1], aff)


def _two_series(folder: Path, name: str) -> Path:
    """Two series in one folder, their slices interleaved half a slice apart."""
    write_series(folder / name, volume(), uid="1.2.826.0.1.3680043.2.1125.9.1", prefix="a")
    other = volume()
    other.SetOrigin(tuple(np.add(other.GetOrigin(), (0, 0, 1.25))))
    return write_series(folder / name, other, uid="1.2.826.0.1.3680043.2.1125.9.2", prefix="b")


def _cut_short(which: int) -> Callable[[Path, str], Path]:
    """A series whose slice ``which`` was cut to half its bytes (an interrupted copy or export):
    in the middle GDCM left it out as a gap, at an end without a word, one slice short."""
    def make(folder: Path, name: str) -> Path:
        series = write_series(folder / name, volume())
        f = sorted(series.iterdir())[which]
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return series
    return make


def _symlink_loop(folder: Path, name: str) -> Path:
    (p := folder / f"{name}.nii.gz").symlink_to(p.name)
    return p


def _unreadable(folder: Path, name: str) -> Path:
    p = nii(folder / f"{name}.nii.gz", phantom())
    p.chmod(0)
    return p


# ---------------------------------------------------------------- label kinds: make(folder, name, image) -> path


def _label(value: float | None = None, dtype: type = np.uint8, shape: tuple[int, ...] = SHAPE,
           shift_mm: float = 0.0, foreground: bool = True) -> Callable[[Path, str, Path], Path]:
    def make(folder: Path, name: str, image: Path) -> Path:
        lab = np.zeros(shape, dtype)
        lab[8, 8, 4] = foreground
        if value is not None:
            lab[4, 4, 2] = value
        aff = RAS.copy()
        aff[0, 3] += shift_mm
        return nii(folder / f"{name}.nii.gz", lab, aff)
    return make


def label_like(image: Path, out: Path) -> Path:
    """A clean label in the image's geometry (the default geometry when the header is refused)."""
    try:
        h = read_header(image)
    except InputError:
        h = {"shape": SHAPE, "affine": RAS}
    shape = h["shape"][:3] if len(h["shape"]) >= 3 else SHAPE
    lab = np.zeros(shape, np.uint8)
    lab[tuple(s // 2 for s in shape)] = 1
    return nii(out, lab, h["affine"] if len(h["shape"]) >= 3 else RAS)


# ---------------------------------------------------------------- manifest kinds: make(root, image, label) -> path


def write_manifest(root: Path, entry: dict[str, str], **fields: Any) -> Path:
    doc = {"name": "corpus", "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": CT_LABELS,
           "training": [entry], "test": [], **fields}
    (root / "dataset.json").write_text(json.dumps({k: v for k, v in doc.items() if v is not None}))
    return root / "dataset.json"


def _not_json(root: Path, image: Path, label: Path) -> Path:
    (p := root / "dataset.json").write_text("{'labels': {0: 'background'}, training: [")
    return p


def _without_labels(root: Path, image: Path, label: Path) -> Path:
    return write_manifest(root, {"image": "./imagesTr/case.nii.gz", "label": "./labelsTr/case.nii.gz"},
                          labels=None)


def _outside(dotdot: bool) -> Callable[[Path, Path, Path], Path]:
    def make(root: Path, image: Path, label: Path) -> Path:
        moved = root.parent / "elsewhere" / image.name
        moved.parent.mkdir(exist_ok=True)
        image.rename(moved)
        path = os.path.relpath(moved, root) if dotdot else str(moved)
        write_manifest(root, {"image": path, "label": "./labelsTr/case.nii.gz"})
        return moved
    return make


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Kind:
    role: str  # what `make` breaks: "image", "label" or "manifest"
    make: Callable[..., Path]
    problem: str  # in the validate and train line; "" = valid but odd: every command succeeds
    predict: str | None = None  # in predict's report error, when it differs from `problem`


KINDS: dict[str, Kind] = {
    "empty_file": Kind("image", _bytes(b""), "empty file (0 bytes)"),
    "truncated_gz": Kind("image", _truncated, "truncated"),
    "text_named_nii_gz": Kind("image", _bytes(b"patient notes, not an image\n" * 9), "named .gz but not gzip"),
    "gzip_of_garbage": Kind("image", _bytes(gzip.compress(np.random.default_rng(0).bytes(4096))),
                            "not a readable NIfTI image"),
    "header_50000_cubed": Kind("image", _huge_header, "header claims 125000000000000 voxels (50000, 50000, 50000), "
                                                      "more than the limit of"),
    "4d_for_3d": Kind("image", _zeros((*SHAPE, 3)), "4D image (16, 16, 8, 3) where 3D is expected",
                      predict="3 channels in image [16, 16, 8, 3], the bundle expects 1"),
    "2d_for_3d": Kind("image", _zeros(SHAPE[:2]), "2D image (16, 16) where 3D is expected",
                      predict="2D image [16, 16] given to a 3D bundle"),
    "zero_pixdim": Kind("image", _pixdim(0.0), "invalid voxel spacing"),
    "negative_pixdim": Kind("image", _pixdim(-0.8), "invalid voxel spacing"),
    "nan_pixdim": Kind("image", _pixdim(float("nan")), "invalid voxel spacing"),
    "nan_inf_voxels": Kind("image", _nan_inf, "non-finite voxels: 2 NaN, 1 Inf", predict="non-finite voxels"),
    "one_voxel_thick": Kind("image", _odd((16, 16, 1)), ""),
    "smaller_than_roi": Kind("image", _odd((6, 5, 3)), ""),
    "oblique_affine": Kind("image", _odd(aff=affine(rotation=_oblique_rotation())), ""),
    "lps_affine": Kind("image", _lps, ""),
    "dicom_missing_slice": Kind("image", lambda f, n: write_series(f / n, volume(), skip=(2,)),
                                "incomplete series: 5 mm gap after slice 1"),
    "dicom_two_series": Kind("image", _two_series, "2 DICOM image series mixed in one folder"),
    "dicom_nonuniform_spacing": Kind("image", lambda f, n: write_series(f / n, volume(), shift={3: 0.7, 4: 0.7}),
                                     "non-uniform slice spacing: 3.2 mm gap after slice 2"),
    "dicom_slice_cut_short": Kind("image", _cut_short(2), "slice_002.dcm cannot be read: DICOM file cut short"),
    "dicom_last_slice_cut_short": Kind("image", _cut_short(-1), "slice_004.dcm cannot be read: DICOM file cut short"),
    "symlink_loop": Kind("image", _symlink_loop, "symlink loop"),
    "unreadable": Kind("image", _unreadable, "cannot read (Permission denied)"),
    "label_shape_mismatch": Kind("label", _label(shape=(16, 16, 7)), "shape (16, 16, 8) != label"),
    "label_affine_mismatch": Kind("label", _label(shift_mm=3.0), "affines differ (by up to 3 mm)"),
    "label_float_non_integer": Kind("label", _label(0.5, np.float32), "non-integer label values in 1 voxels"),
    "label_value_undeclared": Kind("label", _label(7), "label values [7] not declared in the manifest's labels"),
    "label_all_background": Kind("label", _label(foreground=False), "label is empty (all background)"),
    "manifest_not_json": Kind("manifest", _not_json, "not valid JSON"),
    "manifest_without_labels": Kind("manifest", _without_labels, "manifest lacks 'labels'"),
    "manifest_dotdot_path": Kind("manifest", _outside(dotdot=True), "outside the manifest's folder"),
    "manifest_absolute_outside": Kind("manifest", _outside(dotdot=False), "outside the manifest's folder"),
}


def build(name: str, root: Path) -> tuple[Path, Path]:
    """A one-case dataset under ``root`` broken as ``name`` says: (manifest, the file to name)."""
    kind = KINDS[name]
    images, labels = root / "imagesTr", root / "labelsTr"
    images.mkdir(parents=True)
    image = kind.make(images, "case") if kind.role == "image" else nii(images / "case.nii.gz", phantom())
    label = kind.make(labels, "case", image) if kind.role == "label" else label_like(image, labels / "case.nii.gz")
    manifest = write_manifest(root, {"image": f"./{image.relative_to(root)}", "label": f"./{label.relative_to(root)}"})
    bad = kind.make(root, image, label) if kind.role == "manifest" else label if kind.role == "label" else image
    return manifest, bad
