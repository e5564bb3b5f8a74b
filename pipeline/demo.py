"""`segpipe demo`: the main job end to end on synthetic CT phantoms, on any machine, in minutes.

synthesise -> validate -> train phantom_ct_3d (boundary-weighted loss, MLflow) -> batch-predict
held-out studies with the overlap-tile predictor -> evaluate -> print a summary. A second demo into
the same folder trains a new model, and its masks replace the first model's (``segpipe predict``
predicts again what another model made), so the Dice it prints and logs is the new model's.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import InputError
from pipeline.tracking_store import segpipe_command

log = logging.getLogger(__name__)

BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "phantom_ct_3d"
N_TRAIN = 16
N_TEST = 4
TEST_SEED = 1000


def run_demo(out: Path, epochs: int | None = None, bundle: Path = BUNDLE,
             echo: Callable[[str], None] = log.info, verbose: bool = False, progress: bool = False) -> int:
    """Run the demo into ``out``; return the exit code (0 ok, 1 a stage failed). Progress and the
    summary go to ``echo`` (the CLI passes ``print``; the default is the log); ``verbose`` and
    ``progress`` are ``train_bundle``'s (progress bars for training and prediction)."""
    from pipeline.evaluation import evaluate
    from pipeline.predict import predict
    from pipeline.synthetic import write_dataset
    from pipeline.train import train_bundle
    from pipeline.validation import validate_manifest as validate

    out = Path(out).resolve()
    t0 = time.perf_counter()
    train_manifest = write_dataset("ct3d", N_TRAIN, out / "data" / "train", seed=0)
    test_manifest = write_dataset("ct3d", N_TEST, out / "data" / "test", seed=TEST_SEED)
    echo(f"[1/5] synthesised {N_TRAIN} training and {N_TEST} held-out CT phantoms under {out / 'data'}")

    problems = validate(train_manifest) + validate(test_manifest)
    if problems:
        for p in problems:
            echo(p)
        raise InputError(f"{train_manifest}: the synthetic manifest failed validation")
    echo(f"[2/5] validated {train_manifest}")

    summary = train_bundle(bundle, manifest=train_manifest, epochs=epochs, verbose=verbose, progress=progress,
                           overrides={"output_dir": str(out / "train")})
    echo(f"[3/5] trained {bundle.name}: best validation mean Dice "
          f"{summary.get('best_val_mean_dice', float('nan')):.3f} in {summary.get('wall_s', 0):.0f} s")

    weights = Path(summary["model_path"])
    rows = predict(bundle, out / "data" / "test" / "imagesTr", out / "masks", overrides={"model_path": str(weights)},
                   progress=progress)
    failed = [r for r in rows if r["status"] == "failed"]
    done, kept = (sum(r["status"] == s for r in rows) for s in ("ok", "skipped"))
    echo(f"[4/5] predicted {done} held-out studies into {out / 'masks'}"
         + (f" ({kept} more kept: masks of this model from an earlier run)" if kept else ""))
    if failed:
        for r in failed:
            echo(f"  failed: {r['study_id']}: {r['error']}")
        return 1

    ev = evaluate(out / "masks", test_manifest, out_csv=out / "masks" / "metrics.csv",
                  run_id=summary.get("mlflow_run_id"))
    echo("[5/5] evaluated against the held-out labels")
    _print_summary(ev, out, summary, time.perf_counter() - t0, echo)
    (out / "demo_summary.json").write_text(json.dumps({"train": summary, "evaluation": ev}, indent=2, default=str))
    return 0


def _print_summary(ev: dict, out: Path, train: dict, seconds: float, echo: Callable[[str], None]) -> None:
    echo("\nsegpipe demo summary")
    echo("  held-out Dice per organ:")
    for name, stats in ev.get("per_class", {}).items():
        echo(f"    {name:<10} {stats['dice_mean']:.3f}  (HD95 {stats['hd95_mean']:.1f} mm)")
    echo(f"    {'mean':<10} {ev.get('mean_dice', float('nan')):.3f}")
    echo(f"  masks:   {out / 'masks'}")
    echo(f"  report:  {out / 'masks' / 'report.csv'} and {out / 'masks' / 'metrics.csv'}")
    echo(f"  model:   {train.get('model_path')}")
    echo(f"  MLflow run {train.get('mlflow_run_id')} in {train.get('tracking_uri')}")
    echo(f"  open the MLflow UI:  {segpipe_command()} ui --tracking-uri {shlex.quote(str(train.get('tracking_uri')))}")
    echo(f"  total time: {seconds / 60:.1f} min")
