"""Training throughput of the phantom_ct_3d bundle: samples/s, voxels/s, data-wait fraction and
peak memory, for fp32 vs bf16 autocast and the boundary-weighted loss vs plain Dice+CE.

Each configuration trains in its own process (so peak RSS is its own) for a few epochs on
synthetic CT phantoms; the first epoch is warm-up and left out of the averages. bf16 on a CPU
without AVX512-BF16/AMX is emulated: the bundle would not pick it (``amp`` falls back to fp32),
the benchmark forces it to show the cost.

    .venv/bin/python benchmarks/bench_train.py [--epochs 4] [--cases 8] [--shape 96 96 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "phantom_ct_3d"
PLAIN_LOSS = {"loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
              "train#trainer#prepare_batch": "$monai.engines.default_prepare_batch",
              "train#weight_transforms": [], "crop_keys": ["image", "label"]}
CONFIGS = {
    "fp32, boundary-weighted loss": {},
    "bf16 autocast, boundary-weighted loss": {"amp_dtype": "$torch.bfloat16"},
    "fp32, plain Dice+CE": PLAIN_LOSS,
    "fp32, boundary-weighted, channels-first": {"channels_last": False},
}


def run_one(name: str, manifest: str, epochs: int, workdir: str) -> dict:
    """Train configuration ``name``; return its per-epoch averages and peak memory."""
    import torch

    from pipeline.amp import cpu_has_bf16
    from pipeline.train import train_bundle

    out = Path(workdir) / name.replace(",", "").replace(" ", "_")
    overrides = {**CONFIGS[name], "output_dir": str(out), "val_interval": 1000, "num_folds": 4}
    t0 = time.perf_counter()
    summary = train_bundle(BUNDLE, manifest=Path(manifest), epochs=epochs, device="cpu",
                           tracking_uri=f"sqlite:///{Path(workdir) / 'mlflow.db'}", overrides=overrides)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in Path(summary["metrics_jsonl"]).read_text().splitlines()]
    per_epoch: dict[str, list[float]] = {}
    for r in records:
        if r["kind"] == "metric" and r["key"] != "train_loss" and r["step"] > 1:
            per_epoch.setdefault(r["key"], []).append(r["value"])
    mean = {k: sum(v) / len(v) for k, v in per_epoch.items()}
    return {"config": name, "samples_per_s": mean["samples_per_s"], "voxels_per_s": mean["voxels_per_s"],
            "data_wait_fraction": mean["data_wait_fraction"], "epoch_time_s": mean["epoch_time_s"],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "wall_s": wall,
            "threads": torch.get_num_threads(), "cpu_bf16": cpu_has_bf16()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 32])
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one config in this process
    p.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if a.only:
        print(json.dumps(run_one(a.only, a.manifest, a.epochs, a.workdir)))
        return 0

    from pipeline.synthetic import write_dataset

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_dataset("ct3d", a.cases, Path(tmp) / "data", seed=0, shape=a.shape)
        for name in CONFIGS:
            proc = subprocess.run([sys.executable, __file__, "--only", name, "--manifest", str(manifest),
                                   "--workdir", tmp, "--epochs", str(a.epochs)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode:
                print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"done: {name}", file=sys.stderr)
    load = os.getloadavg()[0]
    print(f"\n{a.cases} phantoms {tuple(a.shape)} -> pixdim 1.6x1.6x2.5, roi 48x48x32, batch 2 x 2 crops, "
          f"{a.epochs} epochs (first is warm-up), {os.cpu_count()} CPUs, load average {load:.1f}\n")
    print("| configuration | samples/s | voxels/s | data-wait | epoch s | peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['samples_per_s']:.2f} | {r['voxels_per_s']:.3g} | "
              f"{r['data_wait_fraction']:.1%} | {r['epoch_time_s']:.1f} | {r['peak_rss_gib']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
