"""Validation report: Dice per class and per case, and QC overlay PNGs, from a MONAI evaluator.

A QC picture shows each case in three orthogonal planes through its labelled structures (one
plane for 2D), reference contours solid and predicted ones dashed, with a legend naming each
label's colour; ``pipeline.handlers.attach_validation`` draws them after every validation.

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

from pipeline.fileio import atomic_path

log = logging.getLogger(__name__)


def _case_id(item: dict[str, Any]) -> str:
    if item.get("id"):
        return str(item["id"])
    meta = getattr(item.get("image"), "meta", {}) or {}
    return Path(str(meta.get("filename_or_obj", "case"))).name.split(".")[0]


#: the planes of a 3D volume (RAS after the bundles' Orientationd): name, the axis held fixed
PLANES = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def _spacing(image: torch.Tensor, ndim: int) -> list[float]:
    affine = getattr(image, "affine", None)
    if affine is None or affine.shape[-1] < ndim + 1:
        return [1.0] * ndim
    a = torch.as_tensor(affine).double()[:ndim, :ndim]
    return [float(v) for v in torch.sqrt((a ** 2).sum(0))]


def qc_views(image: torch.Tensor, pred: torch.Tensor, label: torch.Tensor) -> dict[str, Any]:
    """Three orthogonal slices (one slice of a 2D image) through the labelled structures: each
    plane at the index with the most labelled voxels (the volume's middle if none). Returns
    ``{"views": [{"plane", "index", "image", "pred", "label", "aspect"}], "spacing"}`` with 2D numpy
    arrays (x along the first remaining axis) and the display aspect from the voxel spacing."""
    lab = label.argmax(0) if label.shape[0] > 1 else label[0]
    prd = pred.argmax(0) if pred.shape[0] > 1 else pred[0]
    img = image[0]
    spacing = _spacing(image, lab.ndim)
    vols = {"image": img, "pred": prd, "label": lab}
    if lab.ndim == 2:
        views = [{"plane": "slice", "index": None, "aspect": spacing[1] / spacing[0],
                  **{k: v.detach().cpu().float().numpy() for k, v in vols.items()}}]
        return {"views": views, "spacing": spacing}
    fg = (lab > 0).float()
    views = []
    for plane, axis in PLANES:
        other = [a for a in range(3) if a != axis]
        counts = fg.sum(dim=other)
        index = int(counts.argmax()) if counts.max() > 0 else lab.shape[axis] // 2
        views.append({"plane": plane, "index": index, "aspect": spacing[other[1]] / spacing[other[0]],
                      **{k: v.select(axis, index).detach().cpu().float().numpy() for k, v in vols.items()}})
    return {"views": views, "spacing": spacing}


def attach_case_collector(evaluator: Engine, qc_cases: int = 3) -> None:
    """Record each validated case's id (and QC views of the first ``qc_cases`` on this rank)
    into ``evaluator.state.case_ids`` / ``evaluator.state.qc``."""

    def _start(engine: Engine) -> None:
        engine.state.case_ids, engine.state.qc = [], []

    def _iteration(engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        for item, out in zip(batch, output, strict=False):
            engine.state.case_ids.append(_case_id(item))
            if len(engine.state.qc) < qc_cases:
                engine.state.qc.append((engine.state.case_ids[-1], qc_views(out["image"], out["pred"], out["label"])))

    evaluator.add_event_handler(Events.STARTED, _start)
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, _iteration)


def gathered_views(evaluator: Engine, qc_cases: int) -> list[tuple[str, dict[str, Any]]]:
    """The QC views of the validation's first ``qc_cases`` cases, from every process under
    torchrun (each collects its share's first ones; a shard's k-th case is the list's
    ``k * world + rank``-th, so interleaving them gives the cases one process would draw). Every
    rank must call it. Before, only rank 0's share was drawn."""
    views = list(getattr(evaluator.state, "qc", []))
    world = idist.get_world_size()
    if world > 1 and qc_cases > 0:
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, views)
        views = [part[k] for k in range(max(len(p) for p in parts)) for part in parts if k < len(part)]
    return views[:qc_cases]


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


def case_mean(row: Any) -> float:
    """Mean Dice of one case over its classes with a reference; NaN, without numpy's warning, for a
    case without any (an all-background label)."""
    row = np.asarray(row, dtype=float)
    return float(np.nanmean(row)) if np.isfinite(row).any() else float("nan")


def write_case_csv(path: Path, report: dict[str, Any]) -> Path:
    """One row per validation case: id, Dice per class, mean."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:  # the kept weights' cases, never half
        w = csv.writer(f)
        w.writerow(["case", *[f"dice_{n}" for n in report["names"]], "dice_mean"])
        for case, row in report["cases"]:
            w.writerow([case, *[f"{v:.4f}" for v in row], f"{case_mean(row):.4f}"])
    return path


def write_overlays(folder: Path, qc: list[tuple[str, dict[str, Any]]], label_names: list[str],
                   title: str = "", dice: dict[str, float] | None = None, predicted: bool = True) -> list[Path]:
    """For each case ``folder/qc_<case>.png`` (about 900x940 pixels): its three views in a 2x2
    grid with the legend in the fourth cell (one view above a legend for 2D; ``qc_views``),
    reference contours solid and predicted ones dashed (``predicted`` False: the reference
    alone), one colour per label (``pipeline.preview.label_colours``: the batch previews' and the
    DICOM SEG's colours); ``title`` (e.g. the epoch) and the case's mean Dice (``dice``) above."""
    from matplotlib.lines import Line2D

    from pipeline.preview import label_colours

    if not qc:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    colors = label_colours(len(label_names))
    handles = [Line2D([], [], color=colors[c], lw=3, label=label_names[c]) for c in range(1, len(label_names))]
    handles.append(Line2D([], [], color="0.3", lw=1.5, label="reference"))
    if predicted:
        handles.append(Line2D([], [], color="0.3", lw=1.5, ls="--", label="prediction"))
    keys = (("label", "solid"), ("pred", "dashed")) if predicted else (("label", "solid"),)
    from matplotlib.figure import Figure

    three = len(qc[0][1]["views"]) == 3  # 2x2: three planes and the legend (square: MLflow's image cards are)
    fig = Figure(figsize=(9, 9.4) if three else (7, 7.6), dpi=100)  # one figure for all cases, fixed layout: fast
    rects = [(0.02, 0.47, 0.46, 0.41), (0.52, 0.47, 0.46, 0.41), (0.02, 0.02, 0.46, 0.41), (0.52, 0.02, 0.46, 0.41)]
    axes = [fig.add_axes(r) for r in (rects if three else [(0.04, 0.12, 0.92, 0.74)])]
    for ax in axes:
        ax.set_axis_off()
    if three:
        axes[3].legend(handles=handles, loc="center", fontsize=13, frameon=False, title="labels", title_fontsize=13)
    else:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=11, frameon=False)
    paths = []
    for case, views in qc:
        drawn = []
        for ax, v in zip(axes, views["views"], strict=False):
            drawn.append(ax.imshow(v["image"].T, cmap="gray", origin="lower", aspect=v["aspect"], interpolation="nearest"))
            for c in range(1, len(label_names)):
                for key, style in keys:
                    mask = (v[key] == c).astype(float)
                    if mask.any() and min(mask.shape) > 1:
                        drawn.append(ax.contour(mask.T, levels=[0.5], colors=[colors[c]], linestyles=style,
                                                linewidths=1.5))
            ax.set_title(v["plane"] + ("" if v["index"] is None else f" {v['index']}"), fontsize=11)
        head = " - ".join(p for p in (case, title) if p)
        if dice and case in dice:
            head += (f"\nmean Dice {dice[case]:.3f}" if np.isfinite(dice[case])
                     else "\nno structure in the reference")
        fig.suptitle(head, fontsize=14, y=0.985)
        out = folder / f"qc_{case}.png"
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png")
        for artist in drawn:
            artist.remove()
        paths.append(out)
    return paths
