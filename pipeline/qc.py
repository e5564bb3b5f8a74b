"""Validation report: Dice per class and per case, and QC overlay PNGs, from a MONAI evaluator.

The evaluator's ``MeanDice`` key metric keeps every case's Dice per class (``save_details``),
already gathered across distributed ranks; the case ids are gathered here in the same order.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events

log = logging.getLogger(__name__)


def _case_id(item: dict[str, Any]) -> str:
    if item.get("id"):
        return str(item["id"])
    meta = getattr(item.get("image"), "meta", {}) or {}
    return Path(str(meta.get("filename_or_obj", "case"))).name.split(".")[0]


def _qc_slice(image: torch.Tensor, pred: torch.Tensor, label: torch.Tensor) -> dict[str, np.ndarray]:
    """The axial slice (last axis) with the most labelled voxels: image, predicted and true labels."""
    lab = label.argmax(0) if label.shape[0] > 1 else label[0]
    prd = pred.argmax(0) if pred.shape[0] > 1 else pred[0]
    z = int((lab > 0).flatten(0, -2).sum(0).argmax()) if lab.ndim == 3 else None
    pick = (lambda t: t[..., z]) if z is not None else (lambda t: t)
    return {k: pick(v).detach().cpu().float().numpy() for k, v in
            {"image": image[0], "pred": prd, "label": lab}.items()}


def attach_case_collector(evaluator: Engine, qc_cases: int = 3) -> None:
    """Record each validated case's id (and a QC slice of the first ``qc_cases`` on this rank)
    into ``evaluator.state.case_ids`` / ``evaluator.state.qc``."""

    def _start(engine: Engine) -> None:
        engine.state.case_ids, engine.state.qc = [], []

    def _iteration(engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        for item, out in zip(batch, output, strict=False):
            engine.state.case_ids.append(_case_id(item))
            if len(engine.state.qc) < qc_cases:
                engine.state.qc.append((engine.state.case_ids[-1], _qc_slice(out["image"], out["pred"], out["label"])))

    evaluator.add_event_handler(Events.STARTED, _start)
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, _iteration)


def summarize(evaluator: Engine, label_names: list[str], metric: str = "val_mean_dice") -> dict[str, Any]:
    """``{"metrics": {val_mean_dice, val_dice_<name>...}, "cases": [(id, [dice per class])]}``;
    every rank must call it (case ids are gathered)."""
    ids = list(evaluator.state.case_ids)
    if idist.get_world_size() > 1:
        ids = [i for part in idist.all_gather("\n".join(ids)) for i in part.split("\n") if i]
    details = getattr(evaluator.state, "metric_details", {}).get(metric)
    value = evaluator.state.metrics.get(metric)
    if details is None or value is None:
        return {"metrics": {}, "cases": []}
    per_case = torch.as_tensor(details).float().reshape(len(ids) or -1, -1).cpu()
    names = label_names[-per_case.shape[1]:]
    per_class = torch.nanmean(per_case, dim=0)
    metrics = {metric: float(value)}
    metrics.update({f"val_dice_{n}": float(v) for n, v in zip(names, per_class, strict=True)})
    return {"metrics": metrics, "cases": list(zip(ids, per_case.tolist(), strict=False)), "names": names}


def write_case_csv(path: Path, report: dict[str, Any]) -> Path:
    """One row per validation case: id, Dice per class, mean."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", *[f"dice_{n}" for n in report["names"]], "dice_mean"])
        for case, row in report["cases"]:
            w.writerow([case, *[f"{v:.4f}" for v in row], f"{np.nanmean(row):.4f}"])
    return path


def write_overlays(folder: Path, qc: list[tuple[str, dict[str, np.ndarray]]], label_names: list[str]) -> list[Path]:
    """For each case a PNG: the image slice with true (solid) and predicted (dashed) contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    colors = plt.get_cmap("tab10")
    paths = []
    for case, s in qc:
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        ax.imshow(s["image"].T, cmap="gray", origin="lower")
        for c in range(1, len(label_names)):
            for key, style in (("label", "solid"), ("pred", "dashed")):
                mask = (s[key] == c).astype(float)
                if mask.any() and mask.ndim == 2 and min(mask.shape) > 1:
                    ax.contour(mask.T, levels=[0.5], colors=[colors(c)], linestyles=style, linewidths=1)
        ax.set_title(f"{case}: true solid, predicted dashed", fontsize=8)
        ax.axis("off")
        out = folder / f"qc_{case}.png"
        fig.savefig(out, bbox_inches="tight")
        plt.close(fig)
        paths.append(out)
    return paths
