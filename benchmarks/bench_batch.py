"""Batch prediction throughput: ``pipeline.predict.predict`` against a plain loop.

A folder of phantom CT studies (``pipeline.synthetic.write_dataset("ct3d", n, dir)``) and the
phantom_ct_3d bundle with random weights (a copy in a temp folder) are segmented

- ``pipeline``: ``pipeline.predict.predict`` (reader and writer threads, bounded queues),
- ``loop``: the same model, preprocessing, inferer and writer called study after study
  (read -> preprocess -> predict -> invert -> save), nothing in the background,

each in a fresh subprocess (so peak resident memory is that run's own), alternating the two in
each repeat. Prints studies per minute and peak RSS (medians).

    .venv/bin/python benchmarks/bench_batch.py --n 12 --repeats 3
    .venv/bin/python benchmarks/bench_batch.py --quick
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_bundle(dst: Path) -> Path:
    import torch

    from pipeline.bundle import get, load_bundle

    shutil.copytree(ROOT / "bundles" / "phantom_ct_3d" / "configs", dst / "configs")
    (dst / "models").mkdir()
    torch.manual_seed(0)
    net = get(load_bundle(dst, ("common.json", "inference.json")), "network_def")
    torch.save(net.state_dict(), dst / "models" / "model.pt")
    return dst


def run_one(mode: str, bundle: Path, studies: Path, out: Path) -> dict:
    """One timed run in this process: returns studies, seconds and peak RSS in MiB."""
    from pipeline import predict, predict_io

    t0 = time.perf_counter()
    if mode == "pipeline":
        rows = predict.predict(bundle, studies, out, progress=False)
        n = sum(r["status"] == "ok" for r in rows)
    else:
        out.mkdir(parents=True, exist_ok=True)
        model = predict.load_model(bundle, None, None)
        n = 0
        with tempfile.TemporaryDirectory() as scratch:
            for s in predict_io.list_studies(studies):
                data = predict.read_study(s, model, Path(scratch))
                predict.write_study(s, data, predict.run_model(model, data["image"]), model)
                n += 1
    seconds = time.perf_counter() - t0
    return {"mode": mode, "studies": n, "seconds": seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12, help="number of studies")
    ap.add_argument("--shape", type=int, nargs=3, default=[160, 160, 48])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="6 studies of 96x96x32, 1 repeat")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "BUNDLE", "STUDIES", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        mode, bundle, studies, out = a.child
        print(json.dumps(run_one(mode, Path(bundle), Path(studies), Path(out))))
        return
    if a.quick:
        a.n, a.shape, a.repeats = 6, [96, 96, 32], 1
    from pipeline.synthetic import write_dataset

    with tempfile.TemporaryDirectory(prefix="bench_batch-") as tmp:
        tmp_path = Path(tmp)
        bundle = make_bundle(tmp_path / "bundle")
        write_dataset("ct3d", a.n, tmp_path / "data", seed=0, shape=a.shape)
        studies = tmp_path / "data" / "imagesTr"
        results: dict[str, list[dict]] = {"pipeline": [], "loop": []}
        for r in range(a.repeats):
            for mode in (["pipeline", "loop"] if r % 2 == 0 else ["loop", "pipeline"]):
                out = tmp_path / f"out-{mode}-{r}"
                p = subprocess.run([sys.executable, __file__, "--child", mode, str(bundle), str(studies), str(out)],
                                   capture_output=True, text=True, cwd=ROOT, check=True)
                res = json.loads(p.stdout.strip().splitlines()[-1])
                results[mode].append(res)
                print(f"repeat {r} {mode:<9} {res['studies']} studies {res['seconds']:.1f} s "
                      f"peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
    print(f"\n{a.n} ct3d studies {tuple(a.shape)}, bundle phantom_ct_3d (random weights), "
          f"medians of {a.repeats} alternating repeats")
    print(f"{'method':<10}{'studies/min':>12}{'peak RSS MiB':>14}")
    for mode, rs in results.items():
        spm = statistics.median(x["studies"] / x["seconds"] * 60 for x in rs)
        rss = statistics.median(x["peak_rss_mib"] for x in rs)
        print(f"{mode:<10}{spm:>12.1f}{rss:>14.0f}")


if __name__ == "__main__":
    main()
