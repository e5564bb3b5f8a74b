"""Scoring a cross-validation (``pipeline.crossval``): its out-of-fold masks against their labels,
and the post-processing chosen on them.

``score`` reads every out-of-fold mask whose stamp (``oof/.fold_<k>.model``) is the sha256 of its
fold's current ``model.pt`` and writes ``crossval.json``: Dice and HD95 per case, per fold and over
all cases (mean, sd), each scored fold's ``model_sha256``, and the post-processing chosen as
nnU-Net does (``choose_postprocessing``: keep-largest of all foreground or of each class, only
where it raises the out-of-fold Dice).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fileio import atomic_path

log = logging.getLogger(__name__)

RESULT_FILE = "crossval.json"
CANDIDATES = ("none", "largest_foreground", "largest_per_class")
#: keep-largest only for the classes whose out-of-fold Dice it raises (nnU-Net's per-class decision)
SELECTED = "largest_where_it_helps"


def postprocess_options(candidate: str, n_classes: int, classes: list[int] | None = None) -> dict[str, Any]:
    """The ``postprocess`` id (``pipeline.postprocess.label_cleanup``) of a candidate; ``classes``:
    the labels ``SELECTED`` keeps the largest component of."""
    fg = list(range(1, n_classes))
    return {"none": {}, "largest_foreground": {"keep_largest_foreground": True},
            "largest_per_class": {"keep_largest": fg}, SELECTED: {"keep_largest": list(classes or [])}}[candidate]


def choose_postprocessing(candidates: dict[str, list[list[float]]]) -> tuple[str, list[int]]:
    """The candidate with the highest out-of-fold mean Dice (``none`` unless another gains), and
    the classes (1-based) whose Dice keep-largest raises. ``candidates``: per candidate of
    ``CANDIDATES``, Dice per case and foreground class. Keep-largest of one class leaves every other
    class's voxels as they are, so the per-class choice's Dice is, class by class, the better of
    ``none`` and ``largest_per_class``: it differs from keeping the largest of every class where a
    class is several separate structures (both kidneys under one label), which that would cut.
    That choice's Dice per case and class is added to ``candidates`` as ``SELECTED``."""
    if not candidates["none"]:
        return "none", []
    none, each = np.array(candidates["none"]), np.array(candidates["largest_per_class"])
    helps = [c + 1 for c in range(none.shape[1]) if each[:, c].mean() > none[:, c].mean() + 1e-6]
    selected = np.where(np.isin(np.arange(1, none.shape[1] + 1), helps), each, none)
    candidates[SELECTED] = selected.tolist()
    means = {c: float(np.mean(v)) for c, v in candidates.items()}
    gaining = [c for c in (*CANDIDATES[1:], SELECTED) if means[c] > means["none"] + 1e-6]
    if not gaining:  # none unless one gains
        return "none", helps
    if helps and means[SELECTED] >= max(means[c] for c in gaining) - 1e-6:
        return SELECTED, helps  # as good as the best, and it leaves the classes it does not help alone
    return max(gaining, key=lambda c: means[c]), helps


def _dice(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> list[float]:
    out = []
    for c in range(1, n_classes):
        p, r = pred == c, ref == c
        denom = int(p.sum()) + int(r.sum())
        out.append(1.0 if denom == 0 else 2.0 * int((p & r).sum()) / denom)
    return out


def _current_model(out: Path, k: int, ids: list[str]) -> str | None:
    """The sha256 of fold ``k``'s ``model.pt`` where its out-of-fold masks count: the model is there
    and is the one they were predicted with (``oof/.fold_<k>.model``); else None. A fold deleted,
    trained again and not yet predicted, or masks without a stamp (from before stamps, or of a run
    killed before its stamp) leave its cases unscored."""
    weights, stamp = out / f"fold_{k}" / "model.pt", out / "oof" / f".fold_{k}.model"
    if not weights.is_file():
        if any((stamp.parent / f"{sid}.nii.gz").is_file() for sid in ids):  # none: a fold not trained yet
            log.warning("fold %d: no model.pt in %s; its out-of-fold masks are not scored", k, weights.parent)
        return None
    digest = model_digest(weights)
    return digest if read_stamp(stamp) == digest else None


def read_stamp(stamp: Path) -> str | None:
    try:
        return stamp.read_text().strip()
    except OSError:
        return None


def model_digest(weights: Path) -> str:
    """The sha256 of a fold's model.pt: the stamp of the out-of-fold masks it predicted."""
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def score(out: Path, manifest: Path, cases: list[list[str]], name: str) -> dict[str, Any]:
    """Dice and HD95 of every out-of-fold mask there is; the post-processing candidates' mean
    Dice; write ``out/crossval.json``."""
    import torch

    from pipeline.evaluation import case_metrics, json_safe
    from pipeline.fileio import read_label
    from pipeline.manifest import load_manifest
    from pipeline.postprocess import label_cleanup

    m = load_manifest(manifest)
    labels = m["labels"]
    names = [labels[str(i)] for i in range(len(labels))]
    refs = {e["id"]: e["label"] for e in m["training"]}
    def cleaned(pred: np.ndarray, options: dict[str, Any]) -> np.ndarray:
        tensor = torch.as_tensor(pred.astype(np.int64))[None]
        return np.asarray(label_cleanup(options)(tensor)[0])

    def row(k: int, pred: np.ndarray, ref: np.ndarray, spacing: Any) -> dict[str, Any]:
        metrics = case_metrics(pred, ref, spacing, labels)
        return {"fold": k, "dice": {n: metrics[n]["dice"] for n in names[1:]},
                "hd95_mm": {n: metrics[n]["hd95_mm"] for n in names[1:]}}

    per_case: dict[str, Any] = {}
    candidates = {c: [] for c in CANDIDATES}
    found = []
    models: dict[str, str] = {}  # each scored fold's model.pt: what export-ensemble may ship
    for k, ids in enumerate(cases):
        digest = _current_model(out, k, ids)
        if digest is None:
            continue
        models[str(k)] = digest
        for sid in ids:
            mask = out / "oof" / f"{sid}.nii.gz"
            if not mask.is_file():
                continue
            pred, _, _ = read_label(mask)
            ref, _, spacing = read_label(refs[sid])
            per_case[sid] = row(k, pred, ref, spacing)
            found.append((k, sid, mask))
            for c in CANDIDATES:
                candidates[c].append(_dice(cleaned(pred, postprocess_options(c, len(names))), ref, len(names)))
    best, helps = choose_postprocessing(candidates)
    means = {c: float(np.mean(v)) if v else math.nan for c, v in candidates.items()}  # over cases and classes
    per_class = {c: {n: float(np.mean([d[i] for d in v])) for i, n in enumerate(names[1:])} if v else {}
                 for c, v in candidates.items()}
    options = postprocess_options(best, len(names), helps)
    # the chosen post-processing's Dice and HD95 (removed fragments far away change the HD95 most)
    chosen_cases = dict(per_case)
    if best != "none":
        for k, sid, mask in found:
            ref, _, spacing = read_label(refs[sid])
            chosen_cases[sid] = row(k, cleaned(read_label(mask)[0], options), ref, spacing)
    chosen_rows = list(chosen_cases.values())
    result = {
        "bundle": name, "manifest": str(manifest), "folds": len(cases), "cases_scored": len(per_case),
        "cases_total": sum(map(len, cases)),
        "summary": _summary(per_case.values(), names[1:]),
        "per_fold": {str(k): _summary([v for v in per_case.values() if v["fold"] == k], names[1:])
                     for k in range(len(cases))},
        "postprocessing": {"mean_dice": means, "dice": per_class, "chosen": best,
                           "postprocess": options,
                           "keep_largest_helps": [names[c] for c in helps],
                           "summary": _summary(chosen_rows, names[1:]),
                           "per_fold": {str(k): _summary([v for v in chosen_rows if v["fold"] == k], names[1:])
                                        for k in range(len(cases))},
                           "cases": chosen_cases},
        "cases": per_case,
        "model_sha256": models,
    }
    with atomic_path(out / RESULT_FILE) as tmp:
        tmp.write_text(json.dumps(json_safe(result), indent=1) + "\n")
    log.info("cross-validation of %s: %d of %d cases scored, out-of-fold mean Dice %.4f; post-processing: %s",
             name, result["cases_scored"], result["cases_total"], result["summary"]["mean_dice"], best)
    return result


def _summary(rows: Any, classes: list[str]) -> dict[str, Any]:
    rows = list(rows)
    out: dict[str, Any] = {"n": len(rows)}
    for metric in ("dice", "hd95_mm"):
        out[metric] = {}
        for c in classes:
            v = np.array([r[metric][c] for r in rows], dtype=float)
            v = v[np.isfinite(v)]
            out[metric][c] = {"mean": float(v.mean()) if v.size else math.nan,
                              "sd": float(v.std()) if v.size else math.nan}
    means = [out["dice"][c]["mean"] for c in classes]
    out["mean_dice"] = float(np.mean(means)) if rows else math.nan
    return out


#: the MLflow section of the out-of-fold figures (a training run's are ``val/``, an evaluation's ``eval/``)
SECTION = "oof/"


def mlflow_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The parent run's MLflow metrics from ``result`` (``crossval.json``), in the ``oof/`` section:
    ``mean_dice``, ``dice_<class>``, ``hd95_mm_<class>``, ``mean_dice_postprocessed`` (with the
    chosen post-processing), ``fold<k>_mean_dice`` of each fold scored so far, ``cases_scored``
    and ``cases_total``. A class whose HD95 no case defines (no structure predicted or in the
    reference) is NaN, which MLflow keeps and shows, rather than left out; before any case is
    scored there are only the counts."""
    from pipeline.tracking_store import class_metric_name

    out = {"cases_scored": float(result["cases_scored"]), "cases_total": float(result["cases_total"])}
    if result["cases_scored"]:
        s = result["summary"]
        out["mean_dice"] = s["mean_dice"]
        out["mean_dice_postprocessed"] = result["postprocessing"]["summary"]["mean_dice"]
        for c, v in s["dice"].items():
            out[f"dice_{class_metric_name(c)}"] = v["mean"]
        for c, v in s["hd95_mm"].items():
            out[f"hd95_mm_{class_metric_name(c)}"] = v["mean"]
        for k, v in result["per_fold"].items():
            if v["n"]:
                out[f"fold{k}_mean_dice"] = v["mean_dice"]
    return {SECTION + k: math.nan if v is None else float(v) for k, v in out.items()}  # None: crossval.json's NaN


# -- the ensemble into the bundle ---------------------------------------------------------------------
