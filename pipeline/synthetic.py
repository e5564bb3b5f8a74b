"""Synthetic studies written as an MSD dataset (``write_dataset``): CT and MR abdominal phantoms (3D,
drawn by ``pipeline.phantoms``), an adult-sized CT cohort in millimetres (``pipeline.synthetic_cohort``),
two-channel MR and touching cells (2D, ``pipeline.synthetic_cells``). ``KINDS`` names them.

The CT cohort (``ct-cohort``) is physical: ``draw_cohort_anatomy`` draws an adult abdomen in
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

import numpy as np

from pipeline.errors import InputError, UsageError
from pipeline.fileio import HOST, atomic_path, pid_alive, remove_made_folders, write_nifti
from pipeline.phantoms import (
    CELL_ORIGIN,
    CELL_SPACING,
    CT_ORIGIN,
    CT_SPACING,
    ct_phantom,
    draw_anatomy,
    lps_affine,
    mr2ch_phantom,
    mr_phantom,
    shift_anatomy,
)

log = logging.getLogger(__name__)

CT_LABELS = {"0": "background", "1": "liver", "2": "kidney", "3": "spleen"}
CELL_LABELS = {"0": "background", "1": "cell"}
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
