"""What each `segpipe` command does once its arguments are parsed (``pipeline.cli`` parses them
and maps errors to exit codes): call one function, print its result for the console."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`--set key=value` pairs; values are JSON where they parse, strings otherwise."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError as e:
            if raw.lstrip()[:1] in ("[", "{", '"'):  # meant as JSON: a list, object or string cut short
                raise UsageError(f"--set {key}={raw}: not valid JSON ({e.msg}, character {e.pos + 1})") from None
            out[key] = raw
    return out


def check_device(device: str | None) -> None:
    """A CUDA device asked for on a machine without one is a usage error, said before any work."""
    if device and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is available on this machine (use --device cpu)")


def cmd_synth(a: argparse.Namespace) -> int:
    from pipeline.synthetic import write_dataset

    manifest = write_dataset(a.kind, a.n, Path(a.out), seed=a.seed, shape=a.shape, channel_layout=a.channel_layout,
                             voxel_scale=a.voxel_scale)
    print(f"wrote {a.n} {a.kind} studies and {manifest}")
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    from pipeline.splits import write_splits
    from pipeline.validation import validate_manifest as validate

    problems = validate(Path(a.manifest), allow_outside=a.allow_outside)
    for p in problems:
        print(p)
    if problems:
        print(f"{a.manifest}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{a.manifest}: ok")
    if a.folds:
        splits = write_splits(Path(a.manifest), k=a.folds, seed=a.seed)
        print(f"wrote {splits}")
    return 0


def cmd_fingerprint(a: argparse.Namespace) -> int:
    from pipeline.fingerprint import write_fingerprint

    fp_path = write_fingerprint(Path(a.manifest), Path(a.out) if a.out else None)
    fp = json.loads(Path(fp_path).read_text())
    print(f"wrote {fp_path}")
    for key, value in fp.get("suggested", {}).items():  # ids every bundle has: segpipe train --set KEY=VALUE
        print(f"  suggested {key}: {value}")
    if why := fp.get("normalisation", {}).get("rationale"):
        print(f"  normalisation segpipe plan writes: {why}")
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from pipeline.plan_bundle import plan_bundle

    plan = plan_bundle(Path(a.manifest), Path(a.out), name=a.name, device=a.device, budget_min=a.budget_min)
    net = plan["network"]
    print(f"wrote bundle {plan['name']} to {a.out}: {plan['spatial_dims']}D, pixdim {plan['spacing']['pixdim']}, "
          f"patch {plan['patch']['roi_size']}, batch {plan['sampling']['batch_size']}, filters {net['filters']}, "
          f"{plan['schedule']['time_budget_min']:g} min on {plan['device']}")
    for w in plan["warnings"]:
        print(f"  warning: {w}")
    print(f"next: segpipe train {a.out}")
    return 0


def cmd_weightmap(a: argparse.Namespace) -> int:
    from pipeline.figures import weightmap_figure

    out = weightmap_figure(
        Path(a.label), Path(a.out), w0=a.w0, sigma=a.sigma, border_on=a.border_on, slice_index=a.slice
    )
    print(f"wrote {out}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    overrides = parse_set(a.set)
    check_device(a.device)
    from pipeline.train import train_bundle

    summary = train_bundle(
        Path(a.bundle),
        manifest=Path(a.manifest) if a.manifest else None,
        epochs=a.epochs,
        resume=a.resume,
        tracking_uri=a.tracking_uri,
        device=a.device,
        amp=a.amp,
        overrides=overrides,
        verbose=a.verbose,
        progress=sys.stderr.isatty(),
        register=a.register,
    )
    if summary and os.environ.get("RANK", "0") == "0":  # under torchrun, one summary: rank 0's (with MLflow's)
        print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_crossval(a: argparse.Namespace) -> int:
    overrides = parse_set(a.set)
    check_device(a.device)
    from pipeline.crossval import crossval

    result = crossval(Path(a.bundle), Path(a.manifest), folds=a.folds, fold_ids=a.fold, epochs=a.epochs,
                      output_dir=Path(a.output) if a.output else None, tracking_uri=a.tracking_uri,
                      device=a.device, overrides=overrides, verbose=a.verbose, progress=sys.stderr.isatty(),
                      export=a.export)
    s = result["summary"]
    print(f"out-of-fold: {result['cases_scored']} of {result['cases_total']} cases, mean Dice {s['mean_dice']:.4f} ("
          + ", ".join(f"{c} {v['mean']:.4f} +- {v['sd']:.4f}" for c, v in s["dice"].items())
          + f"); post-processing: {postprocessing_line(result['postprocessing'])}")
    for path in result["exported"]:
        print(f"exported {path}")
    if a.export and not result["exported"]:  # e.g. one of several folds run side by side: the last one exports
        print(f"not exported yet: {result['cases_total'] - result['cases_scored']} cases still to be predicted by "
              f"unfinished folds; the last fold's --export (or segpipe export-ensemble) exports the ensemble")
    return 0


def postprocessing_line(pp: dict) -> str:
    """The chosen post-processing, with the classes keep-largest applies to when chosen per class."""
    from pipeline.crossval_score import SELECTED

    helps = pp.get("keep_largest_helps") or []
    return f"{pp['chosen']} ({', '.join(helps)})" if pp["chosen"] == SELECTED else pp["chosen"]


def cmd_export_ensemble(a: argparse.Namespace) -> int:
    from pipeline.crossval_export import export_ensemble

    for path in export_ensemble(Path(a.bundle), Path(a.crossval), folds=a.fold):
        print(f"exported {path}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    overrides = parse_set(a.set)
    check_device(a.device)
    from pipeline.predict import predict

    rows = predict(
        Path(a.bundle),
        Path(a.input),
        Path(a.output),
        shard=a.shard,
        device=a.device,
        overrides=overrides,
        progress=not a.no_progress and sys.stderr.isatty(),  # a log file gets lines, not a bar's redraws
        output_format=a.format,
        preview=a.preview,
    )
    failed = sum(r["status"] == "failed" for r in rows)
    ok = sum(r["status"] == "ok" for r in rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    print(f"{ok} ok, {skipped} skipped, {failed} failed; report: {Path(a.output) / 'report.csv'}"
          + (f"; previews: {Path(a.output) / 'index.html'}" if a.preview else ""))
    return 1 if failed else 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from pipeline.evaluation import evaluate, json_safe

    summary = evaluate(
        Path(a.pred), Path(a.ref), out_csv=Path(a.out) if a.out else None, run_id=a.run_id,
        tracking_uri=a.tracking_uri,
    )
    print(json.dumps(json_safe(summary), indent=2, default=str))  # null, not NaN: standard JSON for jq
    errors = summary.get("errors") or {}
    if errors:  # as predict: every other study scored and written, the run exits 1 (missing ones: a warning)
        sid, problem = next(iter(errors.items()))
        print(f"segpipe evaluate: {len(errors)} of {summary['n_reference']} studies could not be compared "
              f"(the first, {sid}: {problem}); their rows in {summary['csv']} say why", file=sys.stderr)
    return 1 if errors else 0


def cmd_demo(a: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    return run_demo(Path(a.out), epochs=a.epochs, echo=print, verbose=a.verbose, progress=sys.stderr.isatty())


def cmd_ui(a: argparse.Namespace) -> int:
    from pipeline.ui import serve_ui

    return serve_ui(host=a.host, port=a.port, tracking_uri=a.tracking_uri, allowed_hosts=a.allowed_hosts,
                    echo=lambda line: print(line, flush=True))
