"""Ways of running one network forward in fp32 on the CPU: eager channels-first and channels-last,
TorchScript trace+freeze, ``torch.jit.optimize_for_inference`` and (``--compile``) torch.compile
with freezing, same weights and input (4 windows of 96³ through monai ``UNet`` 16-256 with 2
residual units). Prints the median of 4 timed calls after one warm-up, and the ratio to eager.

    .venv/bin/python benchmarks/bench_network_cpu.py [--compile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from monai.networks.nets import UNet


def median_time(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: int = 4) -> float:
    with torch.inference_mode():
        fn(x)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile", action="store_true", help="also torch.compile (about a minute to compile)")
    a = ap.parse_args()
    torch.manual_seed(0)
    net = UNet(3, 1, 4, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2).eval()
    x = torch.rand(4, 1, 96, 96, 96)
    cl = torch.channels_last_3d
    xcl = x.contiguous(memory_format=cl)
    with torch.no_grad():
        traced = torch.jit.freeze(torch.jit.trace(copy.deepcopy(net), x))
        optimized = torch.jit.optimize_for_inference(torch.jit.trace(copy.deepcopy(net), x))
    runs: dict[str, tuple[Callable, torch.Tensor]] = {
        "eager channels-first": (net, x),
        "eager channels-last": (copy.deepcopy(net).to(memory_format=cl), xcl),
        "jit trace+freeze": (traced, x),
        "jit optimize_for_inference": (optimized, x),
    }
    if a.compile:
        for name, (m, inp) in {"compile (freezing)": (copy.deepcopy(net), x),
                               "compile channels-last": (copy.deepcopy(net).to(memory_format=cl), xcl)}.items():
            c = torch.compile(m, dynamic=False, options={"freezing": True})
            t0 = time.perf_counter()
            with torch.inference_mode():
                c(inp)
            print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s")
            runs[name] = (c, inp)
    base = None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, (fn, inp) in runs.items():
        t = median_time(fn, inp)
        base = base or t
        print(f"{name:<28}{t:>8.2f} s{base / t:>7.2f}x")


if __name__ == "__main__":
    main()
