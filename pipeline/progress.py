"""``progress.png``: a training's curves in one picture, as nnU-Net draws them for each fold.

Three panels, all against the epoch: training loss (left axis) with validation Dice per class
and their mean (right axis, 0..1); seconds per epoch; learning rate. Drawn from the run's
journal (``metrics.jsonl``, ``pipeline.tracking``), so a resumed run's picture covers every
epoch, and redrawn after each validation (``pipeline.handlers.attach_tracker``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.fileio import atomic_path

log = logging.getLogger(__name__)


def read_curves(journal: Path) -> dict[str, dict[int, float]]:
    """Per-epoch metrics of a journal as ``{name: {step: value}}`` (the last record of a step
    wins: a resumed run repeats the epochs after its checkpoint); per-iteration loss and system
    metrics left out."""
    curves: dict[str, dict[int, float]] = {}
    for line in Path(journal).read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if r.get("kind") == "metric" and r["key"] != "train_loss" and not r["key"].startswith("system/"):
            curves.setdefault(r["key"], {})[int(r["step"])] = float(r["value"])
    return curves


def plot_progress(journal: Path, out: Path) -> Path:
    """Draw ``out`` (PNG, written atomically) from ``journal``; return its path."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from pipeline.preview import label_colours

    curves = read_curves(journal)

    def xy(name: str) -> tuple[list[int], list[float]]:
        points = sorted(curves.get(name, {}).items())
        return [p[0] for p in points], [p[1] for p in points]

    fig = Figure(figsize=(10, 11), dpi=90)
    ax_loss, ax_time, ax_lr = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1, 1]})
    ax_loss.plot(*xy("train_loss_epoch"), color="0.35", marker=".", label="training loss")
    ax_loss.set_ylabel("loss")
    ax_dice = ax_loss.twinx()
    classes = [k for k in curves if k.startswith("val_dice_")]  # label order: the colours of the QC pictures
    colors = label_colours(len(classes) + 1)
    for i, name in enumerate(classes):
        ax_dice.plot(*xy(name), color=colors[i + 1], marker="o", ms=3, lw=1.2,
                     label=f"Dice {name[len('val_dice_'):]}")
    ax_dice.plot(*xy("val_mean_dice"), color="black", ls="--", marker="o", lw=2.2, label="Dice mean")
    ax_dice.set_ylim(0, 1)
    ax_dice.set_ylabel("validation Dice")
    lines = ax_loss.get_legend_handles_labels()
    more = ax_dice.get_legend_handles_labels()
    ax_loss.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_loss.set_title("training progress")
    ax_time.plot(*xy("epoch_time_s"), color="tab:blue", marker=".")
    ax_time.set_ylabel("epoch time (s)")
    ax_time.grid(alpha=0.3)
    ax_lr.plot(*xy("lr"), color="tab:red", marker=".")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_lr.grid(alpha=0.3)
    fig.subplots_adjust(left=0.09, right=0.91, top=0.96, bottom=0.05, hspace=0.08)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out


def evaluation_figure(summary: dict) -> Any:
    """The ``matplotlib.figure.Figure`` of ``plot_evaluation``: Dice and surface Dice (its
    tolerance, ``summary["tolerance_mm"]``, 1 mm unless it says, in the legend) per class on one
    0..1 axis, HD95 in mm beside; the legend below the bars, where it hides no value label."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(summary["per_class"])
    rows = [summary["per_class"][n] for n in names]
    y = np.arange(len(names))
    height = 2.1 + 0.45 * len(names)
    fig = Figure(figsize=(9, height), dpi=100)
    FigureCanvasAgg(fig)
    ax_dice, ax_hd = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1.4, 1]})
    tolerance = float(summary.get("tolerance_mm") or 1.0)
    for offset, key, label in ((-0.2, "dice_mean", "Dice"),
                               (0.2, "nsd_mean", f"surface Dice (tolerance {tolerance:g} mm)")):
        values = [r[key] if r[key] is not None else np.nan for r in rows]
        bars = ax_dice.barh(y + offset, values, height=0.38, label=label)
        ax_dice.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax_dice.set_xlim(0, 1.12)
    ax_dice.set_yticks(y, names)
    ax_dice.invert_yaxis()
    # below the axis and its tick labels (2 font sizes of 8 pt), never over a bar or its value
    ax_dice.legend(loc="upper center", bbox_to_anchor=(0.5, 0), borderaxespad=2.2, ncol=2, fontsize=8,
                   frameon=False)
    ax_dice.set_title(f"mean Dice {summary['mean_dice']:.3f} over {summary.get('n_cases', '?')} cases", fontsize=10)
    hd = [r["hd95_mean"] if r["hd95_mean"] is not None else np.nan for r in rows]
    bars = ax_hd.barh(y, hd, height=0.5, color="tab:gray")
    ax_hd.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax_hd.set_xlabel("HD95 (mm)")
    ax_hd.set_xlim(0, max([v for v in hd if np.isfinite(v)] or [1]) * 1.25)
    for ax in (ax_dice, ax_hd):
        ax.grid(axis="x", alpha=0.3)
    fig.subplots_adjust(left=0.16, right=0.98, top=1 - 0.35 / height, bottom=0.8 / height, wspace=0.08)
    return fig


def plot_evaluation(summary: dict, out: Path) -> Path:
    """``out`` (PNG, ``evaluation_figure``): mean Dice and surface Dice per class on one 0..1 axis
    and HD95 in mm, from an evaluation summary (``pipeline.evaluation.summarise``); MLflow draws
    each logged number as its own bar chart with its own scale, so 0.005 looks as long as 0.33 there."""
    fig = evaluation_figure(summary)
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
