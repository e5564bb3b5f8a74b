"""Cases for the inference benchmarks: shipped networks with their weights, volumes preprocessed by
their bundle's own ``preprocessing``, true labels, and Dice.

- ``ct_mosaic``: a CT-sized volume with true labels on which the shipped ``phantom_ct_3d`` weights
  are in their training distribution: ``grid`` ct3d phantoms (each 96x96x32 at 0.8x0.8x2.5 mm, the
  size the weights were trained on) at random offsets in cells of 112x112x40, i.e. 448x448x120
  voxels for the default 4x4x3 (a 358 mm field of view), 224x224x120 after the bundle's resampling
  to 1.6x1.6x2.5 mm. The shipped weights do not transfer to one large phantom or to the adult
  ``ct-cohort`` studies (Dice 0.01-0.14 with MONAI's sliding window), so those measure speed, not
  quality.
- ``ct_cohort``: ``segpipe synth --kind ct-cohort`` studies (512x512 at 0.6-0.9 mm), labels mapped
  to the phantom's (both kidneys -> kidney).
- ``hippocampus``: MSD Task04 cases of a manifest (default: fold 0, 42 cases).
- ``manifest:PATH``: the first ``n`` cases of any labelled manifest (e.g. ``runs_cv/fold_0/validation.json``,
  the cases a fold's model did not train on).
- ``split:PATH:K``: fold ``K``'s validation cases of a cross-validation's ``splits.json`` (e.g.
  ``split:bundles/headneck_ct_oar/runs_cv_242/splits.json:0``: the CTs fold 0's model never saw).
- ``cells``: ``segpipe synth --kind cells2d`` images (128x128); ``cells_mosaic``: ``grid`` of them
  side by side.

Files are written once into ``cache`` (default: a folder in the system's temporary directory).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from pipeline.bundle import get, load_bundle
from pipeline.phantoms import CELL_ORIGIN, CELL_SPACING, CT_SPACING, ct_phantom, lps_affine
from pipeline.synthetic_cells import cells_image

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(tempfile.gettempdir()) / "segpipe-bench-inference"
HIPPO_MANIFEST = ROOT / "data_manifests" / "hippocampus_fold0_test.json"
Case = tuple[str, torch.Tensor, torch.Tensor]  # (name, image (1, C, *spatial) float32, label (*spatial) int64)


def bundle_network(name: str, overrides: dict | None = None, weights: Path | None = None) -> tuple[torch.nn.Module, object]:
    """The bundle's network in eval mode with its shipped ``models/model.pt`` (or ``weights``, e.g.
    a cross-validation fold's model for the cases it did not see), and its config parser."""
    parser = load_bundle(ROOT / "bundles" / name, ("common.json", "inference.json"), overrides or {})
    net = get(parser, "network_def")
    net.load_state_dict(torch.load(weights or ROOT / "bundles" / name / "models" / "model.pt", weights_only=True,
                                   map_location="cpu"))
    return net.eval(), parser


def preprocess(parser: object, image: Path, label: Path, remap: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` and ``label`` through the bundle's ``preprocessing``: (1, C, *spatial), (*spatial)."""
    d = get(parser, "preprocessing")({"image": str(image), "label": str(label)})
    x = d["image"].as_tensor()[None].float().contiguous()
    y = d["label"].as_tensor()[0].round().long()
    if remap is not None:
        y = torch.as_tensor(remap)[y]
    return x, y


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def ct_mosaic_files(grid: Sequence[int] = (4, 4, 3), seed: int = 0, cache: Path = CACHE) -> tuple[Path, Path]:
    """(image, label) NIfTI files of ``grid`` cells of 112x112x40 voxels (0.8x0.8x2.5 mm), each
    holding one ct3d phantom of 96x96x32 at a random offset in air (so windows never line up with
    the phantoms): 448x448x120 voxels for the default 4x4x3, 224x224x120 after resampling."""
    tile, cell = (96, 96, 32), (112, 112, 40)
    stem = f"ct_mosaic_{'x'.join(map(str, grid))}_s{seed}"
    img_p, lab_p = cache / f"{stem}_img.nii.gz", cache / f"{stem}_lab.nii.gz"
    if img_p.exists() and lab_p.exists():
        return img_p, lab_p
    rng = np.random.default_rng(seed)
    shape = tuple(g * c for g, c in zip(grid, cell, strict=True))
    img, lab = np.full(shape, -1000, np.int16), np.zeros(shape, np.uint8)
    for idx in np.ndindex(*grid):
        offset = [i * c + int(rng.integers(0, c - t + 1)) for i, c, t in zip(idx, cell, tile, strict=True)]
        box = tuple(slice(o, o + t) for o, t in zip(offset, tile, strict=True))
        img[box], lab[box] = ct_phantom(tile, rng)
    affine = lps_affine(CT_SPACING)
    return _save(img, affine, img_p), _save(lab, affine, lab_p)


def cells_mosaic_files(grid: Sequence[int] = (4, 4), seed: int = 0, cache: Path = CACHE) -> tuple[Path, Path]:
    """(image, label) NIfTI files of ``grid`` cells2d images of 128x128 side by side."""
    tile = (128, 128)
    stem = f"cells_mosaic_{'x'.join(map(str, grid))}_s{seed}"
    img_p, lab_p = cache / f"{stem}_img.nii.gz", cache / f"{stem}_lab.nii.gz"
    if img_p.exists() and lab_p.exists():
        return img_p, lab_p
    rng = np.random.default_rng(seed)
    shape = tuple(g * t for g, t in zip(grid, tile, strict=True))
    img, lab = np.zeros(shape, np.float32), np.zeros(shape, np.uint8)
    for idx in np.ndindex(*grid):
        box = tuple(slice(i * t, (i + 1) * t) for i, t in zip(idx, tile, strict=True))
        img[box], lab[box], _ = cells_image(tile, rng)
    affine = lps_affine(CELL_SPACING, CELL_ORIGIN)
    return _save(img, affine, img_p), _save(lab, affine, lab_p)


def add_threads_option(ap: argparse.ArgumentParser) -> None:
    """``--threads N``: torch threads of a timed run (``set_threads``)."""
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default). Under load use 1: with 2 threads on 2 busy "
                         "cores every parallel region waits for a descheduled thread (10-20x slower, erratic)")


def set_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` unless ``n`` is 0 (torch's default)."""
    if n:
        torch.set_num_threads(n)


def _synth_files(kind: str, n: int, seed: int, cache: Path) -> list[tuple[Path, Path]]:
    """(image, label) files of ``n`` studies of ``segpipe synth --kind kind``, written once into ``cache``."""
    from pipeline.synthetic import write_dataset

    out = cache / f"{kind.replace('-', '_')}_n{n}_s{seed}"
    if not (out / "dataset.json").exists():
        write_dataset(kind, n, out, seed=seed)
    entries = json.loads((out / "dataset.json").read_text())["training"]
    return [(out / e["image"], out / e["label"]) for e in entries]


def ct_cohort_files(n: int = 1, seed: int = 0, cache: Path = CACHE) -> list[tuple[Path, Path]]:
    """(image, label) files of ``n`` ct-cohort studies (labels: 0-4, see ``COHORT_TO_PHANTOM``)."""
    return _synth_files("ct-cohort", n, seed, cache)


#: ct-cohort labels (background, liver, kidney_right, spleen, kidney_left) -> the phantom's
COHORT_TO_PHANTOM = (0, 1, 2, 3, 2)


def cells_files(n: int = 10, seed: int = 0, cache: Path = CACHE) -> list[tuple[Path, Path]]:
    """(image, label) files of ``n`` cells2d images of the default 128x128 (``segpipe synth``)."""
    return _synth_files("cells2d", n, seed, cache)


def hippocampus_files(manifest: Path = HIPPO_MANIFEST, n: int | None = None) -> list[tuple[Path, Path]]:
    """(image, label) of the manifest's first ``n`` cases (all when None)."""
    entries = json.loads(manifest.read_text())["training"][:n]
    return [((manifest.parent / e["image"]).resolve(), (manifest.parent / e["label"]).resolve()) for e in entries]


def split_files(spec: str, n: int | None = None) -> list[tuple[Path, Path]]:
    """(image, label) of fold K's validation cases, ``spec`` = ``PATH:K`` (a splits.json, which names
    its manifest), in the manifest's order; the first ``n`` (all when None)."""
    from pipeline.manifest import load_manifest

    path, _, k = spec.rpartition(":")
    split = json.loads(Path(path).read_text())
    val = set(split["val"][int(k)])
    entries = [e for e in load_manifest(Path(split["manifest"]))["training"] if e["id"] in val]
    return [(Path(e["image"]), Path(e["label"])) for e in entries][:n]


def load_cases(kind: str, parser: object, n: int | None = None, grid: Sequence[int] | None = None,
               seed: int = 0) -> list[Case]:
    """Preprocessed cases of ``kind`` (ct-mosaic, ct-cohort, hippocampus, cells, cells-mosaic, manifest:PATH,
    split:PATH:K)."""
    if kind == "ct-mosaic":
        files, remap = [ct_mosaic_files(grid or (4, 4, 3), seed)], None
    elif kind == "ct-cohort":
        files, remap = ct_cohort_files(n or 1, seed), COHORT_TO_PHANTOM
    elif kind == "hippocampus":
        files, remap = hippocampus_files(n=n), None
    elif kind.startswith("split:"):  # a fold's validation cases of a cross-validation's splits.json
        files, remap = split_files(kind.split(":", 1)[1], n=n), None
    elif kind.startswith("manifest:"):  # any labelled manifest, e.g. a cross-validation fold's validation.json
        files, remap = hippocampus_files(Path(kind.split(":", 1)[1]), n=n), None
    elif kind == "cells":
        files, remap = cells_files(n or 10, seed), None
    elif kind == "cells-mosaic":
        files, remap = [cells_mosaic_files(grid or (4, 4), seed)], None
    else:
        raise ValueError(f"unknown case kind {kind!r}")
    return [(Path(i).name.split(".")[0], *preprocess(parser, i, lab, remap)) for i, lab in files]


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, n_classes: int) -> list[float]:
    """Dice of each foreground class (1..n_classes-1); 1.0 where both are empty."""
    out = []
    for c in range(1, n_classes):
        a, b = pred == c, label == c
        total = int(a.sum() + b.sum())
        out.append(2.0 * int((a & b).sum()) / total if total else 1.0)
    return out
