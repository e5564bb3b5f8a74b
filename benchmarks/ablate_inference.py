"""Inference ablation on held-out cases: mirror margin (0, "auto", "quarter") x flip TTA.

Each setting runs ``pipeline.predict.predict`` (the bundle's own inference config, one override
set per row) on a manifest of unseen cases, then ``pipeline.evaluation.evaluate`` against their
labels, and prints one markdown table row: per-class Dice and HD95, the mean Dice, and the
predict wall time. ``--model`` evaluates other weights with the same configs (e.g. an ablation
run's ``runs/.../model.pt``).

    .venv/bin/python benchmarks/ablate_inference.py --bundle bundles/hippocampus_mri_3d \
        --manifest data_manifests/hippocampus_fold0_test.json [--model PATH] [--margins 0 auto quarter]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(bundle: Path, model: Path | None, manifest: Path, margin: str, tta: bool, tmp: Path,
        extra: dict | None = None) -> dict:
    from pipeline.evaluation import evaluate
    from pipeline.predict import predict

    margin_value: int | str = int(margin) if margin.isdigit() else margin
    overrides = {"margin": margin_value, "tta": tta, **({"model_path": str(model)} if model else {}), **(extra or {})}
    out = tmp / f"m{margin}_tta{int(tta)}"
    t0 = time.perf_counter()
    rows = predict(bundle, manifest, out, overrides=overrides, progress=False)
    wall = time.perf_counter() - t0
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"{len(failed)} studies failed, e.g. {failed[0]['study_id']}: {failed[0]['error']}")
    s = evaluate(out, manifest)
    per_class = {name: {"dice": c["dice_mean"], "hd95": c["hd95_mean"], "n": c["n"]}
                 for name, c in s["per_class"].items()}
    return {"margin": margin, "tta": tta, "per_class": per_class, "mean_dice": s["mean_dice"],
            "mean_hd95": s["mean_hd95_mm"], "predict_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "hippocampus_mri_3d")
    ap.add_argument("--model", type=Path, default=None, help="weights (default: the bundle's models/model.pt)")
    ap.add_argument("--manifest", type=Path, default=ROOT / "data_manifests" / "hippocampus_fold0_test.json")
    ap.add_argument("--margins", nargs="+", default=["0", "auto", "quarter"])
    ap.add_argument("--tta", nargs="+", type=int, default=[1, 0], help="1 flip TTA on, 0 off")
    ap.add_argument("--set", nargs="*", action="extend", default=[], metavar="ID=JSON",
                    help="more bundle overrides for every row (repeatable)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    extra = {k: json.loads(v) for k, _, v in (s.partition("=") for s in a.set)}
    results = []
    with tempfile.TemporaryDirectory(prefix="ablate-inference-") as d:
        for margin in a.margins:
            for tta in a.tta:
                r = run(a.bundle, a.model, a.manifest, margin, bool(tta), Path(d), extra)
                if not results:
                    names = list(r["per_class"])
                    print("| margin | flip TTA | " + " | ".join(f"Dice {n}" for n in names) + " | mean Dice | "
                          + " | ".join(f"HD95 {n} mm" for n in names) + " | predict s |")
                    print("|---|---|" + "---:|" * (2 * len(names) + 2))
                results.append(r)
                pc = r["per_class"]
                print(f"| {margin} | {'on' if tta else 'off'} | " + " | ".join(f"{c['dice']:.4f}" for c in pc.values())
                      + f" | {r['mean_dice']:.4f} | " + " | ".join(f"{c['hd95']:.2f}" for c in pc.values())
                      + f" | {r['predict_s']:.0f} |", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
