"""Evidence for ``segpipe plan`` (issue #17): validate -> plan -> train (a wall-time budget) ->
predict held-out cases -> Dice computed here from the mask files, with no hand edit anywhere.

Prints the plan's decisions as a markdown table row with the held-out Dice, and writes
``OUT/evidence.json`` (the row's fields, Dice per case and class, the training summary).

Datasets (``KIND``):

- ``hippocampus``: the shared MSD Task04 data (``../shared/data/Task04_Hippocampus``), trained on
  folds 1-4 of the patient-grouped 5-fold split with seed 0, held out: the fold-0 cases (the
  hand-made bundle's split; its budget, 28.5 min, is the default here);
- synthetic (``pipeline.synthetic``): ``ct-cohort`` (adult CT in mm, ``--voxel-scale`` for small
  volumes), ``mr3d``, ``mr2ch-4d`` and ``mr2ch-files`` (two-channel MR, one 4D file or one file per
  channel), ``cells2d``: ``--n`` training cases (seed ``--seed``) and ``--n-test`` held-out cases of
  new patients (seed ``--seed + 1000``), each set with its own ``dataset.json``;
- ``manifest:PATH``: a labelled manifest of your own, held out: its fold-0 cases, like hippocampus.

Against a hand-made bundle on the same cases: ``--compare BUNDLE`` trains that bundle on the same
training manifest in the same wall-time budget (its own recipe otherwise; ``max_epochs`` lifted so
the budget ends it) and predicts the same held-out cases; ``--compare-masks DIR`` scores masks
another model already wrote for them (e.g. a cross-validation's out-of-fold masks). Either adds a
second row, scored by the same code.

    .venv/bin/python benchmarks/plan_evidence.py mr2ch-files --budget-min 1 --out /tmp/ev/mr2ch
    .venv/bin/python benchmarks/plan_evidence.py hippocampus --out runs/evidence/hippocampus  # 28.5 min
    .venv/bin/python benchmarks/plan_evidence.py ct3d --compare bundles/phantom_ct_3d --budget-min 3 --out /tmp/ev/ct3d
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "Task04_Hippocampus" / "dataset.json"
HIPPOCAMPUS_BUDGET_MIN = 28.5  # bundles/hippocampus_mri_3d: time_budget_min
SYNTHETIC = {"ct3d": ("ct3d", {}), "ct-cohort": ("ct-cohort", {}), "mr3d": ("mr3d", {}), "mr2ch-4d": ("mr2ch", {"channel_layout": "4d"}),
             "mr2ch-files": ("mr2ch", {"channel_layout": "files"}), "cells2d": ("cells2d", {})}
log = logging.getLogger("plan_evidence")


def synthetic_data(kind: str, out: Path, n: int, n_test: int, seed: int, shape: list[int] | None,
                   voxel_scale: float) -> tuple[Path, Path]:
    """(training manifest, held-out manifest): new patients, written with another seed."""
    from pipeline.synthetic import write_dataset

    name, extra = SYNTHETIC[kind]
    if name == "ct-cohort":
        extra = {**extra, "voxel_scale": voxel_scale}
    train = write_dataset(name, n, out / "data", seed=seed, shape=shape, **extra)
    test = write_dataset(name, n_test, out / "heldout", seed=seed + 1000, shape=shape, **extra)
    return train, test


def fold0_heldout(manifest: Path, out: Path) -> Path:
    """A manifest of the fold-0 cases of ``manifest``'s 5-fold split (seed 0), the files where they are."""
    from pipeline.manifest import load_manifest
    from pipeline.splits import saved_or_computed_splits

    data = load_manifest(manifest)
    val = set(saved_or_computed_splits(manifest, 5, 0)["folds"][0]["val"])
    keep = ("image", "label", "id")
    entries = [{k: e[k] for k in keep} for e in data["training"] if e["id"] in val]
    doc = {k: data[k] for k in ("name", "labels", "modality", "channel_names", "tensorImageSize") if k in data}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "heldout.json"
    path.write_text(json.dumps({**doc, "allow_outside": True, "training": entries, "test": []}, indent=1))
    return path


def dice_per_case(masks: Path, heldout: Path) -> dict[str, dict[str, float]]:
    """Dice per case and foreground class, from the mask files and the reference labels (numpy,
    independent of segpipe's own evaluation); both empty counts as 1."""
    from pipeline.manifest import load_manifest

    data = load_manifest(heldout)
    names = {int(k): v for k, v in data["labels"].items() if int(k)}
    out = {}
    for e in data["training"]:
        ref = np.asarray(nib.load(e["label"]).dataobj).squeeze()
        pred = np.asarray(nib.load(masks / f"{e['id']}.nii.gz").dataobj).squeeze()
        if pred.shape != ref.shape:
            raise SystemExit(f"{e['id']}: mask shape {pred.shape} != label shape {ref.shape}")
        out[e["id"]] = {}
        for k, name in names.items():
            a, b = pred == k, ref == k
            total = int(a.sum() + b.sum())
            out[e["id"]][name] = 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
    return out


def compare_row(label: str, summary: dict | None, dice: dict[str, dict[str, float]]) -> dict:
    """The hand-made side: what was measured the same way (its recipe is its own bundle's)."""
    classes = list(next(iter(dice.values())))
    per_class = {c: float(np.mean([d[c] for d in dice.values()])) for c in classes}
    return {"dataset": label, "cases": f"- / {len(dice)}", "epochs": (summary or {}).get("epochs", "-"),
            "wall_min": round((summary or {}).get("wall_s", 0) / 60, 1) if summary else "-",
            "dice_mean": float(np.mean(list(per_class.values()))), "dice": per_class}


def train_handmade(bundle: Path, manifest: Path, heldout: Path, out: Path, budget_min: float, device: str) -> tuple[dict, Path]:
    """Train a hand-made ``bundle`` on ``manifest`` in the same wall-time budget; its masks for ``heldout``."""
    from pipeline.predict import predict
    from pipeline.train import train_bundle

    run = out / "run"
    summary = train_bundle(bundle, manifest=manifest, device=device, tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}",
                           overrides={"output_dir": str(run), "time_budget_min": budget_min, "max_epochs": 100000})
    rows = predict(bundle, heldout, out / "masks", device=device, progress=False,
                   overrides={"model_path": summary["model_path"], "folds": []})
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        raise SystemExit(f"hand-made {bundle}: {len(failed)} held-out case(s) failed, first: {failed[0]['error']}")
    return summary, out / "masks"


def table_row(label: str, plan: dict, summary: dict, dice: dict[str, dict[str, float]], n_train: int) -> dict:
    classes = list(next(iter(dice.values())))
    per_class = {c: float(np.mean([d[c] for d in dice.values()])) for c in classes}
    norm = "+".join(sorted({"CT window" if c["scheme"] == "ct" else "z-score" for c in plan["normalisation"]["channels"]}))
    return {
        "dataset": label, "cases": f"{n_train} / {len(dice)}", "channels": plan["in_channels"],
        "dims": f"{plan['spatial_dims']}D" + (f" (slices across axis {plan['slice_axis']})"
                                              if plan["slice_axis"] is not None else ""),
        "pixdim": plan["spacing"]["pixdim"], "patch": plan["patch"]["roi_size"],
        "batch": plan["sampling"]["batch_size"], "filters": plan["network"]["filters"], "norm": norm,
        "sigma_mm": plan["loss"]["sigma_mm"], "flips": plan["augmentation"]["flip_axes"],
        "budget_min": plan["schedule"]["time_budget_min"], "epochs": summary.get("epochs"),
        "wall_min": round(summary.get("wall_s", 0) / 60, 1),
        "dice_mean": float(np.mean(list(per_class.values()))), "dice": per_class,
    }


COLUMNS = ["dataset", "cases", "channels", "dims", "pixdim", "patch", "batch", "filters", "norm", "sigma_mm",
           "flips", "budget_min", "epochs", "wall_min", "dice_mean", "dice"]


def markdown(*rows: dict) -> str:
    def cell(key: str, v: object) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} {x:.4f}" for k, x in v.items())
        return f"{v:.4f}" if key == "dice_mean" else f"{v:g}" if isinstance(v, float) else str(v)

    return ("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "".join(
        "\n| " + " | ".join(cell(c, row.get(c, "-")) for c in COLUMNS) + " |" for row in rows))


def run(kind: str, out: Path, budget_min: float | None, device: str, n: int, n_test: int, seed: int,
        shape: list[int] | None, voxel_scale: float, compare: Path | None = None,
        compare_masks: Path | None = None) -> dict:
    from pipeline.manifest import load_manifest
    from pipeline.plan_bundle import plan_bundle
    from pipeline.predict import predict
    from pipeline.train import train_bundle
    from pipeline.validation import validate_manifest

    t0 = time.perf_counter()
    name = None
    if kind == "hippocampus" or kind.startswith("manifest:"):
        manifest = HIPPOCAMPUS if kind == "hippocampus" else Path(kind.split(":", 1)[1])
        heldout = fold0_heldout(manifest, out)
        budget_min = budget_min or (HIPPOCAMPUS_BUDGET_MIN if kind == "hippocampus" else 30.0)
        name = "hippocampus_planned" if kind == "hippocampus" else None
        n_train = len(load_manifest(manifest)["training"]) - len(load_manifest(heldout)["training"])
    else:
        manifest, heldout = synthetic_data(kind, out, n, n_test, seed, shape, voxel_scale)
        budget_min, n_train = budget_min or 30.0, n
    problems = validate_manifest(manifest)
    if problems:
        raise SystemExit(f"{manifest}: {len(problems)} problem(s), first: {problems[0]}")
    bundle = out / "bundle"
    plan = plan_bundle(manifest, bundle, name=name, device=device, budget_min=budget_min)
    # hippocampus/manifest: fold 0 is validation, so the model trains on folds 1-4; synthetic:
    # the held-out set is other patients, fold 0 of the training set only monitors
    summary = train_bundle(bundle, device=device, tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    rows = predict(bundle, heldout, out / "masks", device=device, progress=False)
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        raise SystemExit(f"{len(failed)} held-out case(s) failed, first: {failed[0]['error']}")
    dice = dice_per_case(out / "masks", heldout)
    row = table_row(kind.split(":")[0] if ":" not in kind else Path(kind.split(":", 1)[1]).parent.name, plan,
                    summary, dice, n_train)
    result = {"row": row, "dice_per_case": dice, "train": summary, "plan": str(bundle / "plan.json")}
    if compare is not None or compare_masks is not None:
        other_summary = None
        if compare is not None:
            other_summary, compare_masks = train_handmade(compare, manifest, heldout, out / "handmade", budget_min, device)
        other = dice_per_case(compare_masks, heldout)
        result["compare"] = {"row": compare_row(f"{compare.name if compare else compare_masks} (hand-made)",
                                                other_summary, other),
                             "dice_per_case": other, "train": other_summary}
    result["total_min"] = round((time.perf_counter() - t0) / 60, 1)
    (out / "evidence.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", help=f"hippocampus, {', '.join(SYNTHETIC)} or manifest:PATH")
    p.add_argument("--out", required=True, help="a new folder for data, bundle, masks and evidence.json")
    p.add_argument("--budget-min", type=float, default=None,
                   help=f"training budget (default: {HIPPOCAMPUS_BUDGET_MIN} for hippocampus, else 30)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--n", type=int, default=20, help="synthetic: training cases (20)")
    p.add_argument("--n-test", type=int, default=10, help="synthetic: held-out cases (10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs="+", default=None, help="synthetic: volume shape")
    p.add_argument("--compare", type=Path, default=None,
                   help="a hand-made bundle to train on the same cases in the same budget, scored alike")
    p.add_argument("--compare-masks", type=Path, default=None,
                   help="masks another model wrote for the held-out cases (<id>.nii.gz), scored alike")
    p.add_argument("--voxel-scale", type=float, default=2.0, help="ct-cohort: coarser voxels (2: ~256x256)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if a.kind not in SYNTHETIC and a.kind != "hippocampus" and not a.kind.startswith("manifest:"):
        p.error(f"unknown kind {a.kind!r}")
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        p.error(f"--out {out}: exists and is not empty")
    result = run(a.kind, out, a.budget_min, a.device, a.n, a.n_test, a.seed, a.shape, a.voxel_scale,
                 a.compare, a.compare_masks)
    print(markdown(result["row"], *([result["compare"]["row"]] if "compare" in result else [])))
    print(f"total {result['total_min']} min; {out / 'evidence.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
