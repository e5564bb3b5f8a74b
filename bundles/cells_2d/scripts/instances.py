"""Instance figures of predicted cell masks: connected components matched to the true cells.

A predicted component and a true cell match when their IoU exceeds 0.5 (such a match is unique
both ways). Per image: Dice of the semantic masks, true cells, predicted components, matches;
over all images: instance precision, recall and F1. The same figures for the connected
components of the *true* semantic mask show what a perfect semantic segmentation could separate
(touching cells merge into one component, cells apart by a one-pixel gap do not).
``--min-size`` ignores predicted components smaller than that many pixels (specks)::

    python bundles/cells_2d/scripts/instances.py --pred PRED_DIR --manifest data/cells2d_test/dataset.json

``PRED_DIR`` holds ``<id>.nii.gz`` masks as written by ``segpipe predict``; the manifest's entries
carry ``label`` and ``instance`` (``segpipe synth --kind cells2d`` writes both).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from pipeline.manifest import load_manifest


def matches(pred_instances: np.ndarray, true_instances: np.ndarray, iou: float = 0.5) -> int:
    """Number of (predicted, true) instance pairs with IoU > ``iou`` (>= 0.5 keeps them one-to-one)."""
    p, t = pred_instances.ravel().astype(np.int64), true_instances.ravel().astype(np.int64)
    fg = (p > 0) & (t > 0)
    overlap = np.bincount(p[fg] * (t.max() + 1) + t[fg], minlength=(p.max() + 1) * (t.max() + 1))
    overlap = overlap.reshape(p.max() + 1, t.max() + 1)
    union = np.bincount(p)[:, None] + np.bincount(t, minlength=t.max() + 1)[None, :] - overlap
    return int(((overlap[1:, 1:] / np.maximum(union[1:, 1:], 1)) > iou).sum())


def components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of a binary mask (the synthetic gaps between cells are 8-connected
    clean, so a diagonal contact is part of one cell)."""
    return ndimage.label(mask > 0, structure=np.ones((3,) * mask.ndim, bool))[0]


def drop_small(instances: np.ndarray, min_size: int) -> np.ndarray:
    """``instances`` relabelled 1..n without the components smaller than ``min_size`` pixels."""
    sizes = np.bincount(instances.ravel())
    keep = np.flatnonzero(sizes >= min_size)
    table = np.zeros(len(sizes), np.int64)
    table[keep[keep > 0]] = np.arange(1, int((keep > 0).sum()) + 1)
    return table[instances]


def case_figures(pred: np.ndarray, label: np.ndarray, instance: np.ndarray, min_size: int = 0) -> dict[str, float]:
    pred_cc, label_cc = drop_small(components(pred), min_size), components(label)
    inter = float(np.logical_and(pred > 0, label > 0).sum())
    dice = 2 * inter / max(float((pred > 0).sum() + (label > 0).sum()), 1.0)
    return {"dice": dice, "cells": int(instance.max()), "pred_components": int(pred_cc.max()),
            "matched": matches(pred_cc, instance), "oracle_components": int(label_cc.max()),
            "oracle_matched": matches(label_cc, instance)}


def _f1(matched: int, predicted: int, true: int) -> dict[str, float]:
    precision, recall = matched / max(predicted, 1), matched / max(true, 1)
    return {"precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(precision + recall, 1e-12)}


def summarise(rows: list[dict[str, float]]) -> dict[str, object]:
    total = {k: sum(r[k] for r in rows) for k in ("cells", "pred_components", "matched",
                                                   "oracle_components", "oracle_matched")}
    return {"images": len(rows), "mean_dice": float(np.mean([r["dice"] for r in rows])), **total,
            "instances": _f1(total["matched"], total["pred_components"], total["cells"]),
            "oracle_instances": _f1(total["oracle_matched"], total["oracle_components"], total["cells"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pred", required=True, help="folder of predicted masks <id>.nii.gz")
    ap.add_argument("--manifest", required=True, help="manifest with label and instance per entry")
    ap.add_argument("--min-size", type=int, default=0, help="ignore predicted components smaller than this (pixels)")
    a = ap.parse_args(argv)
    rows = []
    for e in load_manifest(Path(a.manifest))["training"]:
        pred = np.asarray(nib.load(Path(a.pred) / f"{e['id']}.nii.gz").dataobj)
        label = np.asarray(nib.load(e["label"]).dataobj)
        instance = np.asarray(nib.load(e["instance"]).dataobj)
        rows.append({"id": e["id"], **case_figures(pred, label, instance, a.min_size)})
    print(json.dumps(summarise(rows), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
