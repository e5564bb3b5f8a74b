"""What a training run is called and tagged in MLflow: its key hyperparameters as params (read
from the parsed bundle), the code's git commit, MLflow's standard tags (user, source, commit) and
the run name. ``pipeline.train`` sets them on the ``pipeline.tracking`` run."""

from __future__ import annotations

import getpass
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# MLflow param name -> bundle id; ids a bundle lacks are skipped.
PARAM_IDS = {
    "network": "network_def#name", "features": "network_def#features", "spatial_dims": "spatial_dims",
    "in_channels": "in_channels", "out_channels": "out_channels", "loss": "loss#_target_", "w0": "w0", "sigma_mm": "sigma_mm",
    "optimizer": "optimizer#_target_", "lr": "learning_rate", "weight_decay": "weight_decay",
    "lr_scheduler": "lr_scheduler#_target_", "batch_size": "batch_size", "num_samples": "num_samples",
    "roi_size": "roi_size", "pixdim": "pixdim", "amp": "amp", "amp_dtype": "amp_dtype", "max_epochs": "max_epochs",
    "val_interval": "val_interval", "grad_clip_norm": "grad_clip_norm", "seed": "seed", "fold": "fold",
    "num_folds": "num_folds", "dice_include_background": "loss#include_background", "batch_dice": "loss#batch",
    "compile": "compile", "time_budget_min": "time_budget_min", "init_weights": "init_weights",
}


def bundle_params(parser: Any) -> dict[str, Any]:
    """The key hyperparameters of a parsed bundle, resolved (references and expressions evaluated)."""
    out = {}
    for name, id in PARAM_IDS.items():
        if id not in parser:
            continue
        raw = parser.get(id)
        out[name] = parser.get_parsed_content(id, instantiate=False) if isinstance(raw, str) and raw[:1] in "@$" else raw
    return out


def git_commit(folder: Path | None = None) -> str:
    """The commit of the code running (``unknown`` outside a git checkout)."""
    folder = folder or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def standard_tags(commit: str) -> dict[str, str]:
    """MLflow's own run tags (user, source, commit), which its client sets only for fluent runs."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = "unknown"
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    source = f"segpipe {sys.argv[1]}" if argv0 in ("segpipe", "__main__.py") and len(sys.argv) > 1 else argv0
    tags = {"mlflow.user": user, "mlflow.source.name": source, "mlflow.source.type": "LOCAL"}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def run_name(output_name: str, fold: Any, when: float | None = None) -> str:
    """``<output folder>-fold<k>-<date-time>`` (the fold left out when the folder names it)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    named = f"fold_{fold}" in output_name or f"fold{fold}" in output_name or fold is None
    return f"{output_name}-{stamp}" if named else f"{output_name}-fold{fold}-{stamp}"
