"""Synthetic studies: CT and MR abdominal phantoms (3D), an adult-sized CT cohort in millimetres,
two-channel MR and touching cells (2D, ``pipeline.synthetic_cells``), written as an MSD dataset. ``KINDS`` names them.

Random parameters are drawn apart from the deterministic drawing, as in TorchIO: ``draw_anatomy``
picks organ sizes, positions and rotations; ``anatomy_maps`` turns them into a tissue map and a
label map for any shape; ``ct_phantom`` / ``mr_phantom`` / ``mr2ch_phantom`` add intensities, bias,
blur and noise. Their geometry is in normalised voxel coordinates (-1..1 per axis), so everything
scales with the shape (a 77 mm phantom at the default 96x96x32, 0.8x0.8x2.5 mm).

The CT cohort (``ct-cohort``, ``pipeline.synthetic_cohort``) is physical instead: ``draw_cohort_anatomy`` draws an adult abdomen in
mm (body ~300x220 mm, liver, right/left kidneys in perirenal fat, spleen, a vertebral column with
discs), ``draw_ct_study`` an acquisition (512x512 matrix at 0.6-0.9 mm, slices 1.5-5 mm, a 200-250
mm scan range, table position, HU values, noise), ``cohort_geometry`` the voxel grid and
``cohort_maps`` the drawing, painted in each organ's bounding box. ``shape`` (a fixed matrix over
the same field of view) or ``voxel_scale`` (coarser voxels) make small versions for tests.

Case ``i`` of a dataset depends only on ``(seed, i)``, so ``n=4`` and ``n=8`` share their first four
cases. Every fifth case is a second study of the previous case's patient (same anatomy, shifted on
the table, new noise; for the cohort also a new acquisition), so patient-grouped splits have
something to group. Multi-channel images are 4D (X, Y, Z, C) as in MSD BrainTumour, or one file per
channel (``case_0000.nii.gz``, ``case_0001.nii.gz``, nnU-Net v2), the entry's "image" then a list.

Example::

    >>> import numpy as np
    >>> image, label = ct_phantom((32, 32, 12), np.random.default_rng(0))
    >>> image.dtype, label.dtype, sorted(np.unique(label).tolist())
    (dtype('int16'), dtype('uint8'), [0, 1, 2, 3])
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.errors import InputError, UsageError
from pipeline.fileio import HOST, atomic_path, pid_alive, remove_made_folders, write_nifti

log = logging.getLogger(__name__)

CT_LABELS = {"0": "background", "1": "liver", "2": "kidney", "3": "spleen"}
CELL_LABELS = {"0": "background", "1": "cell"}
CT_SPACING = (0.8, 0.8, 2.5)
CT_ORIGIN = (120.0, 95.0, -300.0)
CELL_SPACING = (0.5, 0.5)
CELL_ORIGIN = (32.0, 32.0)
DEFAULT_SHAPES = {"ct3d": (96, 96, 32), "mr3d": (96, 96, 32), "cells2d": (128, 128), "mr2ch": (96, 96, 32)}
KINDS = {
    "ct3d": "CT phantom in HU, 0.8x0.8x2.5 mm, 77 mm across; liver, kidney, spleen (default 96x96x32)",
    "mr3d": "T1-like MR phantom of the ct3d anatomy, float32 with a bias field (default 96x96x32)",
    "cells2d": "2D microscopy of touching cells: semantic and instance labels (default 128x128)",
    "ct-cohort": "adult CT in mm: ~300 mm body, 512x512 at 0.6-0.9 mm, 1.5-5 mm slices varying per case; "
                 "liver, kidney_right, spleen, kidney_left",
    "mr2ch": "two-channel MR (T1-like, T2-like) of the ct3d anatomy: 4D (X,Y,Z,2) or one file per channel",
}
CHANNEL_LAYOUTS = ("4d", "files")
COHORT_LABELS = {"0": "background", "1": "liver", "2": "kidney_right", "3": "spleen", "4": "kidney_left"}
MR2CH_CHANNELS = {"0": "T1", "1": "T2"}

# tissue codes of ``anatomy_maps`` and ``cohort_maps``; organs map to labels 1..3 (cohort: 1..4)
AIR, FAT, SOFT, BONE, LIVER, KIDNEY, SPLEEN, KIDNEY_L, DISC, MUSCLE = range(10)
ORGAN_LABEL = {LIVER: 1, KIDNEY: 2, SPLEEN: 3}


def lps_affine(spacing: Sequence[float] = CT_SPACING, origin: Sequence[float] = CT_ORIGIN) -> np.ndarray:
    """4x4 voxel-to-world (RAS mm) affine of a DICOM-derived volume stored in LPS voxel order:
    ``diag(-sx, -sy, sz)`` plus ``origin``. 2D spacings/origins get a 1 mm third axis at z=0."""
    sp = list(spacing) + [1.0] * (3 - len(spacing))
    org = list(origin) + [0.0] * (3 - len(origin))
    aff = np.diag([-sp[0], -sp[1], sp[2], 1.0])
    aff[:3, 3] = org
    return aff


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix from angles (degrees) about axes 0, 1, 2, applied in that order."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _grid(shape: Sequence[int]) -> list[np.ndarray]:
    """Normalised voxel-centre coordinates in (-1, 1) per axis, broadcastable (sparse)."""
    return np.meshgrid(*[(np.arange(s) + 0.5) / s * 2 - 1 for s in shape], indexing="ij", sparse=True)


def ellipsoid_mask(shape: Sequence[int], center: Sequence[float], semi_axes: Sequence[float],
                   angles_deg: Sequence[float] = (0, 0, 0)) -> np.ndarray:
    """Boolean mask of a rotated ellipsoid given in normalised coordinates."""
    rot = _rotation(angles_deg)
    d = [g - c for g, c in zip(_grid(shape), center, strict=True)]
    q = 0.0
    for k in range(3):  # coordinates in the ellipsoid's own frame: rot.T @ d
        local = rot[0, k] * d[0] + rot[1, k] * d[1] + rot[2, k] * d[2]
        q = q + (local / semi_axes[k]) ** 2
    return q <= 1.0


def _extent(semi_axes: Sequence[float], angles_deg: Sequence[float], direction: np.ndarray) -> float:
    """Distance from an ellipsoid's centre to its surface along a unit ``direction``."""
    local = _rotation(angles_deg).T @ direction
    return float(1.0 / np.sqrt(np.sum((local / np.asarray(semi_axes)) ** 2)))


def draw_anatomy(rng: np.random.Generator, touch_probability: float = 0.85) -> dict[str, Any]:
    """Random abdominal anatomy in normalised coordinates (axis 0 -> patient left, 1 -> posterior,
    2 -> superior, as in an LPS-stored volume). The kidney is placed against the liver so that the two
    overlap (the kidney is painted over the liver: they share a boundary) with ``touch_probability``,
    else a small gap apart."""
    u = rng.uniform
    body = {"center": [rng.normal(0, 0.02), rng.normal(0, 0.02), 0.0],
            "semi_axes": [u(0.84, 0.93), u(0.68, 0.8), 4.0], "angles": [0, 0, u(-5, 5)],
            "fat": u(0.08, 0.14)}
    liver = {"center": [-0.25 + rng.normal(0, 0.03), -0.12 + rng.normal(0, 0.03), 0.15 + rng.normal(0, 0.05)],
             "semi_axes": [u(0.36, 0.44), u(0.30, 0.38), u(0.5, 0.7)],
             "angles": [u(-10, 10), u(-10, 10), u(-25, 25)]}
    kidney = {"semi_axes": [u(0.15, 0.19), u(0.12, 0.16), u(0.3, 0.4)],
              "angles": [u(-10, 10), u(-10, 10), u(-30, 30)]}
    direction = np.array([u(-0.15, 0.15), u(0.6, 0.9), u(-0.5, -0.2)])
    direction /= np.linalg.norm(direction)
    touching = bool(rng.random() < touch_probability)
    reach = _extent(liver["semi_axes"], liver["angles"], direction)
    k_reach = _extent(kidney["semi_axes"], kidney["angles"], -direction)
    dist = reach + k_reach * (1 - u(0.2, 0.4)) if touching else reach + k_reach + u(0.08, 0.15)
    kidney["center"] = (np.asarray(liver["center"]) + dist * direction).tolist()
    spleen = {"center": [0.45 + rng.normal(0, 0.03), 0.25 + rng.normal(0, 0.03), 0.2 + rng.normal(0, 0.05)],
              "semi_axes": [u(0.16, 0.21), u(0.12, 0.16), u(0.3, 0.4)],
              "angles": [u(-10, 10), u(-10, 10), u(-30, 30)]}
    spine = {"center": [rng.normal(0, 0.02), 0.45 + rng.normal(0, 0.02), 0.0], "radius": u(0.08, 0.11)}
    return {"body": body, "liver": liver, "kidney": kidney, "spleen": spleen, "spine": spine,
            "touching": touching, "shift": [0.0, 0.0, 0.0]}


def shift_anatomy(anatomy: dict[str, Any], rng: np.random.Generator, scale: float = 0.03) -> dict[str, Any]:
    """The same anatomy positioned differently on the table (a second study of one patient)."""
    out = json.loads(json.dumps(anatomy))
    out["shift"] = [rng.normal(0, scale), rng.normal(0, scale), rng.normal(0, 2 * scale)]
    return out


def anatomy_maps(shape: Sequence[int], anatomy: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic drawing: (tissue codes, label uint8) of ``anatomy`` on a grid of ``shape``."""
    shift = np.asarray(anatomy["shift"])

    def ell(part: dict[str, Any], scale: float = 1.0) -> np.ndarray:
        axes = np.asarray(part["semi_axes"]) * np.array([scale, scale, 1.0])
        return ellipsoid_mask(shape, np.asarray(part["center"]) + shift, axes, part["angles"])

    b = anatomy["body"]
    body, inner = ell(b), ell(b, 1 - b["fat"])
    tissue = np.full(shape, AIR, dtype=np.uint8)
    tissue[body] = FAT
    tissue[inner] = SOFT
    for name, code in (("liver", LIVER), ("kidney", KIDNEY), ("spleen", SPLEEN)):
        tissue[ell(anatomy[name]) & inner] = code  # later organs are painted over earlier ones
    sp = anatomy["spine"]
    g = _grid(shape)
    cyl = ((g[0] - sp["center"][0] - shift[0]) ** 2 + (g[1] - sp["center"][1] - shift[1]) ** 2
           <= sp["radius"] ** 2)
    tissue[np.broadcast_to(cyl, shape) & (tissue == SOFT)] = BONE
    label = np.zeros(shape, dtype=np.uint8)
    for code, value in ORGAN_LABEL.items():
        label[tissue == code] = value
    return tissue, label


def smooth_field(shape: Sequence[int], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Low-frequency field, max |value| = amplitude: a linear ramp in a random direction (so every
    organ sees a gradient) plus random quadratic terms, in normalised coordinates."""
    g, dims = _grid(shape), len(shape)
    direction = rng.normal(size=dims)
    direction /= np.linalg.norm(direction)
    quadratic = [g[j] * g[k] for j in range(dims) for k in range(j, dims)]
    field = sum(d * x for d, x in zip(direction, g, strict=True)) + 0.5 * sum(
        c * t for c, t in zip(rng.uniform(-1, 1, len(quadratic)), quadratic, strict=True))
    field = np.broadcast_to(field, shape).astype(np.float32)
    return field * (amplitude / (float(np.abs(field).max()) or 1.0))


def ct_phantom(shape: Sequence[int], rng: np.random.Generator, anatomy: dict[str, Any] | None = None,
               noise_hu: float = 15.0, bias_hu: float = 15.0, blur: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """CT-like phantom in Hounsfield units: (image int16, label uint8 with 1 liver, 2 kidney, 3 spleen).
    Air -1000, fat ~-100, soft tissue ~40, liver ~60, kidney ~150, spleen ~100, bone ~400; partial-volume
    blur, a smooth additive bias and Gaussian noise."""
    anatomy = anatomy if anatomy is not None else draw_anatomy(rng)
    tissue, label = anatomy_maps(shape, anatomy)
    u = rng.uniform
    hu = np.array([-1000, u(-110, -90), u(35, 45), u(350, 450), u(55, 65), u(145, 160), u(95, 105)], np.float32)
    image = hu[tissue]
    if blur:
        image = ndimage.gaussian_filter(image, sigma=(0.6, 0.6, 0.3))
    image += smooth_field(shape, rng, bias_hu) + rng.normal(0, noise_hu, shape).astype(np.float32)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), label


def mr_phantom(shape: Sequence[int], rng: np.random.Generator, anatomy: dict[str, Any] | None = None,
               noise: float = 12.0, bias: float = 0.35, blur: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """T1-like MR phantom with arbitrary units: (image float32, label uint8). Tissue values of a few
    hundred, a multiplicative smooth bias field ``exp(+-bias)`` and Rician noise."""
    anatomy = anatomy if anatomy is not None else draw_anatomy(rng)
    tissue, label = anatomy_maps(shape, anatomy)
    u = rng.uniform
    values = np.array([0, u(380, 420), u(170, 190), u(90, 110), u(270, 290), u(130, 150), u(220, 240)], np.float32)
    return _mr_image(tissue, values, rng, noise, bias, blur), label


def _mr_image(tissue: np.ndarray, values: np.ndarray, rng: np.random.Generator, noise: float, bias: float,
              blur: bool) -> np.ndarray:
    """One MR contrast: tissue ``values``, blur, a multiplicative bias field and Rician noise."""
    shape = tissue.shape
    image = values[tissue]
    if blur:
        image = ndimage.gaussian_filter(image, sigma=(0.6, 0.6, 0.3))
    image *= np.exp(smooth_field(shape, rng, bias))
    real = image + rng.normal(0, noise, shape).astype(np.float32)
    imag = rng.normal(0, noise, shape).astype(np.float32)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


def mr2ch_phantom(shape: Sequence[int], rng: np.random.Generator, anatomy: dict[str, Any] | None = None,
                  noise: float = 12.0, bias: float = 0.35, blur: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Two-channel MR of one anatomy: (image float32 (X, Y, Z, 2), label uint8 as ``mr_phantom``).
    Channel 0 is T1-like (fat bright, liver > spleen > kidney), channel 1 T2-like (fat and kidney
    bright, spleen > liver, muscle dark); each has its own bias field and Rician noise."""
    anatomy = anatomy if anatomy is not None else draw_anatomy(rng)
    tissue, label = anatomy_maps(shape, anatomy)
    u = rng.uniform
    t1 = np.array([0, u(380, 420), u(170, 190), u(90, 110), u(270, 290), u(130, 150), u(220, 240)], np.float32)
    t2 = np.array([0, u(330, 370), u(70, 90), u(140, 160), u(90, 110), u(300, 340), u(220, 250)], np.float32)
    return np.stack([_mr_image(tissue, v, rng, noise, bias, blur) for v in (t1, t2)], axis=-1), label


def patient_index(i: int) -> int:
    """Patient of case ``i``: every fifth case (1, 6, 11, ...) is a second study of the previous case's patient."""
    return i - (i + 4) // 5


MAX_VOXEL_SCALE = 10.0  # ct-cohort at 10x: ~51x51 in-plane, at least 4 slices of up to 50 mm (as --shape's minimum)
MAX_VOXELS = 2**27  # per volume (512^3): drawing one takes several float32 copies of it; 2000^3 would need ~60 GB
PREFIXES = {"ct3d": "ct", "mr3d": "mr", "cells2d": "cells", "ct-cohort": "ctc", "mr2ch": "mr2ch"}
DERIVED = ("splits.json", "fingerprint.json")  # written beside a manifest by segpipe validate --folds / fingerprint


def _check_args(kind: str, n: int, shape: Sequence[int] | None, channel_layout: str = "4d",
                voxel_scale: float = 1.0, seed: int = 0) -> tuple[int, ...] | None:
    if kind not in KINDS:
        raise UsageError(f"unknown kind {kind!r} (choose from {', '.join(KINDS)})")
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {seed!r}")
    if channel_layout not in CHANNEL_LAYOUTS or (channel_layout != "4d" and kind != "mr2ch"):
        raise UsageError(f"--channel-layout is one of {', '.join(CHANNEL_LAYOUTS)}, and 'files' is for "
                         f"--kind mr2ch; got {channel_layout!r} for {kind}")
    if not 1 <= voxel_scale <= MAX_VOXEL_SCALE or (voxel_scale != 1 and (kind != "ct-cohort" or shape)):
        raise UsageError(f"--voxel-scale is 1 to {MAX_VOXEL_SCALE:g} and for --kind ct-cohort without "
                         f"--shape; got {voxel_scale}")
    if shape is None and kind == "ct-cohort":
        return None
    shape = tuple(int(s) for s in (shape or DEFAULT_SHAPES[kind]))
    dims = 2 if kind == "cells2d" else 3
    if len(shape) != dims or min(shape) < (8 if dims == 2 else 4) or min(shape[:2]) < 16:
        raise UsageError(f"--shape for {kind} needs {dims} sizes, in-plane >= 16, got {list(shape)}")
    if (voxels := math.prod(shape)) > MAX_VOXELS:
        raise UsageError(f"--shape {list(shape)} is {voxels:,} voxels a volume, over the limit of "
                         f"{MAX_VOXELS:,} (512^3); choose a smaller shape")
    return shape


def _check_out(out: Path, kind: str) -> list[Path]:
    """What a synth into ``out`` replaces: nothing for a new or empty folder; for a previous synth of
    the same ``kind`` its own files (dataset.json, its case folders) and the files segpipe derived
    from it (``DERIVED``, stale for new data). InputError for anything else: two datasets are
    never mixed in one folder, and nothing that synth did not write is deleted."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; give a new or empty folder as --out")
    children = sorted(out.iterdir()) if out.is_dir() else []
    if not children:
        return []
    refuse = (f"--out {out}: not empty and not a previous `segpipe synth --kind {kind}` output; synthesise into "
              "a new or empty folder (two datasets are never mixed in one folder)")
    try:
        doc = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        raise InputError(refuse) from None
    if not isinstance(doc, dict) or doc.get("reference") != "segpipe pipeline.synthetic" \
            or doc.get("name") != f"segpipe-{kind}":
        raise InputError(refuse)
    ours = re.compile(rf"(\.tmp-.*|{re.escape(PREFIXES[kind])}_\d{{3,}}(_\d{{4}})?\.nii\.gz)")
    for child in children:
        if child.name in ("dataset.json", *DERIVED) and child.is_file():
            continue
        if child.name in ("imagesTr", "labelsTr", "instancesTr") and child.is_dir() and not child.is_symlink():
            if stray := [f.name for f in child.iterdir() if not (f.is_file() and ours.fullmatch(f.name))]:
                raise InputError(f"{refuse}: {child / stray[0]} is not a synth file")
            continue
        raise InputError(f"{refuse}: {child} is not a synth file")
    return children


def _remove_stale(out: Path) -> None:
    """Remove the hidden folders beside ``out`` that killed synths of this machine left."""
    stale = re.compile(rf"\.{re.escape(out.name)}\.synth-(\d+)\.{HOST}")
    for d in out.parent.glob(f".{out.name}.synth-*") if out.parent.is_dir() else []:
        if (m := stale.fullmatch(d.name)) and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


def _move_into(tmp: Path, out: Path, old: list[Path]) -> None:
    """Put the finished dataset in ``tmp`` at ``out``: a rename when ``out`` is new, else the previous
    synth's files (``old``) removed and ``tmp``'s moved in."""
    if not out.exists():
        os.replace(tmp, out)
        return
    for f in old:
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    if old:
        log.info("%s: replaced the previous synth output (%s)", out, ", ".join(f.name for f in old))
    for child in tmp.iterdir():
        os.replace(child, out / child.name)
    tmp.rmdir()


def write_dataset(kind: str, n: int, out: Path, seed: int = 0, shape: Sequence[int] | None = None,
                  channel_layout: str = "4d", voxel_scale: float = 1.0) -> Path:
    """Write ``n`` synthetic studies of ``kind`` (a key of ``KINDS``) under ``out`` in the Medical
    Segmentation Decathlon layout (imagesTr/, labelsTr/, for cells also instancesTr/) and return the
    path of ``out/dataset.json``, whose paths are relative ("./imagesTr/ct_000.nii.gz").
    Case ``i`` depends only on ``(seed, i)``.

    ``out`` must be new, empty, or hold a previous synth of the same ``kind`` and nothing else (its
    files, and a ``splits.json``/``fingerprint.json`` derived from them, are replaced); anything else
    is refused (InputError). The dataset is written into a hidden folder beside ``out`` and moved
    into place when complete: a failure or an interrupt leaves ``out`` as it was.

    ``ct-cohort`` is realistic by default (512x512 matrix, spacing drawn per case; 1-4 s a case and
    as long again to gzip); ``shape`` fixes the matrix over each case's field of view, ``voxel_scale``
    (1 to ``MAX_VOXEL_SCALE``) multiplies the drawn spacing. A volume has at most ``MAX_VOXELS``.
    ``mr2ch`` with ``channel_layout`` "4d" writes (X, Y, Z, 2)
    images; "files" writes one file per channel (``mr2ch_000_0000.nii.gz``, ``mr2ch_000_0001.nii.gz``),
    the entry's "image" then the list of them and its "id" the case (``mr2ch_000``)."""
    shape = _check_args(kind, n, shape, channel_layout, voxel_scale, seed)
    out = Path(os.path.abspath(out))  # abspath: "--out ." has a name and a parent
    old = _check_out(out, kind)
    tmp = out.parent / f".{out.name}.synth-{os.getpid()}.{HOST}"
    _remove_stale(out)
    created = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # deepest first: gone on failure
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # a dead process's, whose pid this one has
        tmp.mkdir(parents=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create the output folder ({e.strerror})") from None
    try:
        grid = _write_cases(kind, n, tmp, seed, shape, channel_layout, voxel_scale)
        _move_into(tmp, out, old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made_folders(created)
        raise
    log.info("wrote %d %s studies (%s) to %s", n, kind, grid, out)
    return out / "dataset.json"


def _write_cases(kind: str, n: int, out: Path, seed: int, shape: tuple[int, ...] | None, channel_layout: str,
                 voxel_scale: float) -> str:
    """Write the studies and dataset.json (atomically) into ``out``; return the grid's description."""
    prefix = PREFIXES[kind]
    for f in ["imagesTr", "labelsTr"] + (["instancesTr"] if kind == "cells2d" else []):
        (out / f).mkdir()

    training = []
    for i in range(n):
        stem, p = f"{prefix}_{i:03d}", patient_index(i)
        name = f"{stem}.nii.gz"
        entry = {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}", "patient": f"{prefix}_patient_{p:03d}"}
        rng = np.random.default_rng([seed, i])
        if kind == "cells2d":
            from pipeline.synthetic_cells import cells_image

            image, label, instance = cells_image(shape, rng)
            affine = lps_affine(CELL_SPACING, CELL_ORIGIN)
            write_nifti(instance, out / "instancesTr" / name, affine=affine)
            entry["instance"] = f"./instancesTr/{name}"
        elif kind == "ct-cohort":  # a later study of a patient: same anatomy, a new acquisition
            from pipeline.synthetic_cohort import ct_cohort_phantom, draw_cohort_anatomy

            anatomy = draw_cohort_anatomy(np.random.default_rng([seed, p, 1_000_003]))
            image, label, affine = ct_cohort_phantom(rng, anatomy, shape=shape, voxel_scale=voxel_scale)
        else:
            anatomy = draw_anatomy(np.random.default_rng([seed, p, 1_000_003]))
            if p != i:  # a later study of the same patient
                anatomy = shift_anatomy(anatomy, rng)
            make = {"ct3d": ct_phantom, "mr3d": mr_phantom, "mr2ch": mr2ch_phantom}[kind]
            image, label = make(shape, rng, anatomy)
            affine = lps_affine(CT_SPACING, CT_ORIGIN)
        if channel_layout == "files":
            names = [f"{stem}_{c:04d}.nii.gz" for c in range(image.shape[-1])]
            for c, channel_file in enumerate(names):
                write_nifti(np.ascontiguousarray(image[..., c]), out / "imagesTr" / channel_file, affine=affine)
            entry["image"], entry["id"] = [f"./imagesTr/{f}" for f in names], stem
        else:
            write_nifti(image, out / "imagesTr" / name, affine=affine)
        write_nifti(label, out / "labelsTr" / name, affine=affine)
        training.append(entry)

    grid = f"shape {list(shape)}" if shape else f"spacing drawn per case, voxel scale {voxel_scale:g}"
    manifest = {
        "name": f"segpipe-{kind}",
        "description": f"segpipe synthetic {kind} studies (seed {seed}, {grid}); not real patients",
        "reference": "segpipe pipeline.synthetic",
        "licence": "CC0",
        "release": "0.1",
        "tensorImageSize": "2D" if kind == "cells2d" else "4D" if kind == "mr2ch" and channel_layout == "4d" else "3D",
        "modality": MR2CH_CHANNELS if kind == "mr2ch" else
        {"0": {"ct3d": "CT", "ct-cohort": "CT", "mr3d": "MR", "cells2d": "microscopy"}[kind]},
        **({"channel_names": MR2CH_CHANNELS} if kind == "mr2ch" else {}),
        **({"file_ending": ".nii.gz"} if channel_layout == "files" else {}),
        "labels": CELL_LABELS if kind == "cells2d" else COHORT_LABELS if kind == "ct-cohort" else CT_LABELS,
        "numTraining": n,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    with atomic_path(out / "dataset.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return grid
