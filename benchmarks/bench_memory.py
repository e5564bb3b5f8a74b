"""Resident memory of batch prediction: flat over many studies, bounded on one large volume.

- ``flat``: ``pipeline.predict.predict`` over N small phantom CT studies (default 200 of 64x64x24)
  with the phantom_ct_3d bundle and its shipped weights; a thread samples the process's
  resident set (VmRSS) every 20 ms against the number of masks written. Prints RSS after
  10, 25, 50, 100, ... studies, the peak, and the growth from the 25th study to the last (flat
  means it does not grow with the number of studies).
- ``large``: one CT-sized phantom (default 512x512x300, 0.8x0.8x2.5 mm, LPS) predicted through
  ``pipeline.predict.predict`` in a fresh subprocess; prints wall time and the subprocess's peak
  RSS (``ru_maxrss``: the volume is written by the parent, so its generation is not counted).

    .venv/bin/python benchmarks/bench_memory.py                  # both parts
    .venv/bin/python benchmarks/bench_memory.py --part flat --n 50 --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_memory")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def eager_bundle(dst: Path) -> Path:
    """A copy of phantom_ct_3d (configs and shipped weights) with compile off, for fair memory."""
    shutil.copytree(ROOT / "bundles" / "phantom_ct_3d" / "configs", dst / "configs")
    shutil.copytree(ROOT / "bundles" / "phantom_ct_3d" / "models", dst / "models")
    cfg = json.loads((dst / "configs" / "inference.json").read_text())
    (dst / "configs" / "inference.json").write_text(json.dumps({**cfg, "compile": False}))
    return dst


def flat(n: int, shape: tuple[int, ...], tmp: Path) -> dict:
    from pipeline.predict import predict
    from pipeline.synthetic import write_dataset

    write_dataset("ct3d", n, tmp / "ds", seed=0, shape=shape)
    bundle, out = eager_bundle(tmp / "bundle"), tmp / "out"
    samples: list[tuple[int, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            done = sum(1 for _ in out.glob("ct_*.nii.gz")) if out.exists() else 0
            samples.append((done, rss_mb()))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    base = rss_mb()
    t0 = time.perf_counter()
    t.start()
    rows = predict(bundle, tmp / "ds" / "imagesTr", out, progress=False)
    stop.set()
    t.join()
    wall = time.perf_counter() - t0
    assert sum(r["status"] == "ok" for r in rows) == n, [r for r in rows if r["status"] != "ok"][:3]
    by_done: dict[int, float] = {}
    for done, mb in samples:
        by_done[done] = max(by_done.get(done, 0.0), mb)
    marks = [m for m in (10, 25, 50, 100, 150, 200, 400, 1000) if m < n] + [n]
    at = {m: max(v for d, v in by_done.items() if d <= m) for m in marks}
    first = 25 if n > 25 else marks[0]
    return {"n": n, "shape": list(shape), "wall_s": round(wall, 1), "studies_per_min": round(60 * n / wall, 1),
            "rss_before_mb": round(base), "rss_at_mb": {str(k): round(v) for k, v in at.items()},
            "peak_mb": round(max(v for _, v in samples)),
            f"growth_mb_from_{first}_to_{n}": round(at[n] - at[first], 1)}


def large(shape: tuple[int, ...], tmp: Path) -> dict:
    from pipeline.synthetic import write_dataset

    t0 = time.perf_counter()
    write_dataset("ct3d", 1, tmp / "big", seed=0, shape=shape)
    log.info("wrote the %s phantom in %.0f s", shape, time.perf_counter() - t0)
    bundle = eager_bundle(tmp / "bundle")
    code = ("import json,resource,sys,time;from pathlib import Path;from pipeline.predict import predict;"
            "t=time.perf_counter();rows=predict(Path(sys.argv[1]),Path(sys.argv[2]),Path(sys.argv[3]),progress=False);"
            "print(json.dumps({'wall_s':round(time.perf_counter()-t,1),'status':rows[0]['status'],"
            "'error':rows[0]['error'],'peak_mb':round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)}))")
    r = subprocess.run([sys.executable, "-c", code, str(bundle), str(tmp / "big" / "imagesTr"), str(tmp / "bigout")],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"large-volume prediction failed: {r.stderr.strip().splitlines()[-1:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    voxels = shape[0] * shape[1] * shape[2]
    return {"shape": list(shape), "voxels_M": round(voxels / 1e6, 1), **res,
            "input_float32_mb": round(voxels * 4 / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["flat", "large", "both"], default="both")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--shape", type=int, nargs=3, default=(64, 64, 24), help="flat: each study's shape")
    ap.add_argument("--large-shape", type=int, nargs=3, default=(512, 512, 300))
    ap.add_argument("--quick", action="store_true", help="flat 40 studies of 32x32x12, large 256x256x100")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if a.quick:
        a.n, a.shape, a.large_shape = min(a.n, 40), (32, 32, 12), (256, 256, 100)
    print(f"# {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs, "
          f"python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as d:
        tmp = Path(d)
        if a.part in ("flat", "both"):
            print("flat:", json.dumps(flat(a.n, tuple(a.shape), tmp / "flat")), flush=True)
        if a.part in ("large", "both"):
            print("large:", json.dumps(large(tuple(a.large_shape), tmp / "large")), flush=True)


if __name__ == "__main__":
    main()
