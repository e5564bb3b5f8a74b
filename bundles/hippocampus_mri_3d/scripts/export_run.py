"""Export one MLflow training run of this bundle to files that can be committed.

The MLflow store (``mlflow.db`` in the repository root, what ``segpipe ui`` opens) is not part of
the repository, so the run that made ``models/model.pt`` is also kept as
``docs/training_run.json`` (tags, params, every metric's history) and ``docs/training_curve.png``
(training loss per epoch, validation Dice per class per validation epoch).

    .venv/bin/python bundles/hippocampus_mri_3d/scripts/export_run.py RUN_ID \
        [--tracking-uri sqlite:///mlflow.db] [--out bundles/hippocampus_mri_3d/docs]

The run id is in the training summary and in ``runs/checkpoints/mlflow_run.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("export_run")
CURVE_KEYS = ("val_dice_anterior", "val_dice_posterior", "val_mean_dice")


def export_run(run_id: str, tracking_uri: str, out_dir: Path) -> Path:
    """Write ``training_run.json`` and ``training_curve.png`` for ``run_id``; return the JSON path."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    history = {key: [{"step": m.step, "value": m.value, "timestamp": m.timestamp}
                     for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]
               for key in sorted(run.data.metrics)}
    record = {"run_id": run_id, "run_name": run.info.run_name, "experiment_id": run.info.experiment_id,
              "status": run.info.status, "start_time_ms": run.info.start_time, "end_time_ms": run.info.end_time,
              "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
              "params": dict(sorted(run.data.params.items())), "final_metrics": run.data.metrics,
              "metric_history": history}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "training_run.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    fold = run.data.params.get("fold", "?") if int(run.data.params.get("num_folds", "5")) > 1 else None
    plot_curve(history, out_dir / "training_curve.png", run.info.run_name, fold)
    log.info("wrote %s and %s", path, out_dir / "training_curve.png")
    return path


def _xy(points: list[dict]) -> tuple[list, list]:
    return [m["step"] for m in points], [m["value"] for m in points]


def plot_curve(history: dict[str, list[dict]], path: Path, title: str, fold: str | None) -> None:
    """Training loss per epoch (left) and validation Dice of ``fold`` per validation epoch (right;
    ``fold`` None: a run on every case, with no validation, so the right panel shows what the
    wall-time budget did instead: learning rate and samples/s per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_right) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(*_xy(history.get("train_loss_epoch", [])), marker=".")
    ax_loss.set(xlabel="epoch", ylabel="training loss (Dice + weighted CE)", title="training loss")
    if fold is not None:
        for key in CURVE_KEYS:
            ax_right.plot(*_xy(history.get(key, [])), marker="o", label=key)
        ax_right.set(xlabel="epoch", ylabel="Dice", title=f"validation (fold {fold}, no TTA)")
        ax_right.legend()
    else:
        ax_right.plot(*_xy(history.get("lr", [])), marker=".", color="tab:blue")
        ax_right.set(xlabel="epoch", ylabel="learning rate", title="no validation cases (trained on all)")
        ax_speed = ax_right.twinx()
        ax_speed.plot(*_xy(history.get("samples_per_s", [])), marker=".", color="tab:orange")
        ax_speed.set_ylabel("samples/s", color="tab:orange")
    ax_right.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_id")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    export_run(args.run_id, args.tracking_uri, args.out)


if __name__ == "__main__":
    main()
