"""The bundle's predictor against MONAI's sliding_window_inference: same shipped weights, same
preprocessed volumes, alternating in one process; seconds, Mvox/s, ratio and Dice against true labels.

Methods, each on its own copy of the network:

- ``monai``: ``monai.inferers.sliding_window_inference`` in fp32, overlap 0.5, Gaussian blending,
  the bundle's roi_size and sw_batch_size, under ``torch.no_grad`` (zero padding for volumes
  smaller than the ROI, as MONAI does);
- ``monai+tta`` (with ``--monai-tta``, for a bundle with TTA on): the same loop, fp32, each window
  predicted with the bundle's flip/shift TTA (``pipeline.inference.window_predictor``);
- variants of the bundle's own ``inferer`` (``configs/common.json``), each a name and overrides:
  ``--variant NAME ID=VALUE ...`` (VALUE is JSON, or a plain string), e.g.
  ``--variant ot-96 tiling=overlap-tile tile_window=[96,96,64]``. ``policy=fp32`` in a variant
  sets ``SEGPIPE_CPU_BF16=0`` while it runs: ``amp`` then computes in fp32, which is what a CPU
  without native bf16 runs. ``inferer.ARG=VALUE`` sets an argument of the predictor that is no
  bundle id (e.g. ``inferer.reuse_constant=false``: every constant window computed, not reused).
  Default variants: ``bundle`` (as shipped) and ``bundle/fp32``.

For every case the methods run in turn, the order rotating from case to case and repeat to repeat;
a method's time is the sum over the cases (median over repeats). Dice is per case and foreground
class against the preprocessed true label (argmax of the output), then averaged over classes and
cases. The load average is printed with every repeat.

Once a bundle variant has run (the warm-up), the whole process keeps freed memory for reuse
(``pipeline.cpu_memory``), MONAI's loop included, so the ratios are at equal malloc settings. A
plain MONAI script keeps glibc's defaults: ``--only-monai`` in one process and ``--no-monai`` in
another measure each side as its users run it.

    .venv/bin/python benchmarks/bench_inference.py --bundle phantom_ct_3d --cases ct-mosaic
    .venv/bin/python benchmarks/bench_inference.py --bundle hippocampus_mri_3d --cases hippocampus --monai-tta
    .venv/bin/python benchmarks/bench_inference.py --bundle cells_2d --cases cells-mosaic --grid 4 4
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from inference_cases import ROOT, add_threads_option, bundle_network, dice_per_class, load_cases, set_threads
from monai.inferers import sliding_window_inference

from pipeline.amp import CPU_BF16_ENV, cpu_has_bf16
from pipeline.bundle import get, load_bundle
from pipeline.inference import window_predictor

log = logging.getLogger("bench_inference")
Method = Callable[[torch.Tensor], torch.Tensor]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@contextmanager
def policy(name: str | None):
    """``fp32``: the precision policy of a CPU without native bf16 (SEGPIPE_CPU_BF16=0)."""
    old = os.environ.get(CPU_BF16_ENV)
    if name == "fp32":
        os.environ[CPU_BF16_ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(CPU_BF16_ENV, None)
        else:
            os.environ[CPU_BF16_ENV] = old


def bundle_variant(bundle: str, net: torch.nn.Module, overrides: dict[str, Any]) -> tuple[Method, str]:
    settings = {k: v for k, v in overrides.items() if k != "policy" and not k.startswith("inferer.")}
    parser = load_bundle(ROOT / "bundles" / bundle, ("common.json", "inference.json"), settings)
    inferer = get(parser, "inferer")
    kw = inferer.kwargs
    for k, v in overrides.items():  # predictor arguments that are no bundle id, e.g. inferer.reuse_constant=false
        if k.startswith("inferer."):
            if k[len("inferer."):] not in kw:
                raise SystemExit(f"variant {k}: the inferer has no argument {k[len('inferer.'):]!r}")
            kw[k[len("inferer."):]] = v
    what = (f"tiling {kw['tiling']}, " + (f"margin {kw['margin']}, overlap {kw['overlap']}" if kw["tiling"] == "blend"
            else f"tile_margin {kw['tile_margin']}, tile_window {kw['tile_window']}")
            + f", tta {kw['tta']}" + (f" (axes {kw['tta_axes']}, shift {kw['tta_shift']})" if kw["tta"] else "")
            + f", amp {kw['amp']}, policy {overrides.get('policy', 'cpu')}"
            + ("" if kw.get("reuse_constant", True) else ", every constant window computed"))
    label = overrides.get("policy")

    def run(x: torch.Tensor) -> torch.Tensor:
        with policy(label):
            return inferer(x, net)
    return run, what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="phantom_ct_3d")
    ap.add_argument("--cases", default="ct-mosaic", help="ct-mosaic, ct-cohort, hippocampus, cells-mosaic, manifest:PATH, split:SPLITS_JSON:FOLD")
    ap.add_argument("--n", type=int, default=None, help="number of cases (hippocampus: default all 42)")
    ap.add_argument("--grid", type=int, nargs="+", default=None, help="mosaic grid (default 5 5 4 / 4 4)")
    ap.add_argument("--seed", type=int, nargs="+", default=[0], help="mosaic / cohort seed(s): one case each")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variant", nargs="+", action="append", default=None, metavar=("NAME", "ID=VALUE"),
                    help="a bundle inferer variant: name, then overrides (repeatable)")
    ap.add_argument("--monai-tta", action="store_true", help="also MONAI's loop with the bundle's TTA (fp32)")
    ap.add_argument("--no-monai", action="store_true")
    ap.add_argument("--only-monai", action="store_true",
                    help="MONAI alone: segpipe's predictor never runs in this process, so malloc keeps its "
                         "defaults (pipeline.cpu_memory), as in a plain MONAI script; compare with a --no-monai run")
    ap.add_argument("--monai-batch", type=int, nargs="+", default=None, metavar="N",
                    help="also MONAI at these sw_batch_size values (the reference stays at the bundle's)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--weights", default=None, help="model.pt to use instead of the bundle's models/model.pt "
                    "(e.g. runs_cv/fold_0/model.pt for fold 0's held-out cases)")
    add_threads_option(ap)
    a = ap.parse_args()
    set_threads(a.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    variants = [] if a.only_monai else a.variant or [["bundle"], ["bundle/fp32", "policy=fp32"]]
    net, parser = bundle_network(a.bundle, weights=a.weights)
    roi = tuple(int(r) for r in parser.get_parsed_content("roi_size"))
    bs = int(parser.get_parsed_content("sw_batch_size"))
    n_classes = int(parser.get_parsed_content("out_channels"))
    cases = [c for s in a.seed for c in load_cases(a.cases, parser, n=a.n, grid=a.grid, seed=s)]
    methods: dict[str, Method] = {}
    about: dict[str, str] = {}
    if not a.no_monai:
        monai_net = copy.deepcopy(net)

        def monai(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return sliding_window_inference(x, roi, bs, monai_net, overlap=0.5, mode="gaussian")
        methods["monai"], about["monai"] = monai, f"sliding_window_inference fp32, roi {roi}, overlap 0.5, gaussian, bs {bs}"
        for other in a.monai_batch or []:
            def monai_bs(x: torch.Tensor, n: int = other) -> torch.Tensor:
                with torch.no_grad():
                    return sliding_window_inference(x, roi, n, monai_net, overlap=0.5, mode="gaussian")
            methods[f"monai bs{other}"], about[f"monai bs{other}"] = monai_bs, f"the same at sw_batch_size {other}"
    if a.monai_tta:
        tta_net = copy.deepcopy(net)
        spatial = len(roi)
        tta_fn = window_predictor(tta_net, spatial, True, False, torch.device("cpu"), None,
                                  tta_axes=parser.get_parsed_content("tta_axes") if "tta_axes" in parser else None,
                                  tta_shift=int(parser.get_parsed_content("tta_shift")) if "tta_shift" in parser else 0,
                                  reuse_constant=False)

        def monai_tta(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return sliding_window_inference(x, roi, bs, tta_fn, overlap=0.5, mode="gaussian")
        methods["monai+tta"], about["monai+tta"] = monai_tta, "the same, each window with the bundle's TTA, fp32"
    for name, *sets in variants:
        overrides = {k: parse_value(v) for k, _, v in (s.partition("=") for s in sets)}
        methods[name], about[name] = bundle_variant(a.bundle, copy.deepcopy(net), overrides)
    for k, v in about.items():
        print(f"{k:<14} {v}")
    nvox = sum(x[0, 0].numel() for _, x, _ in cases)
    print(f"{len(cases)} case(s) of {a.cases}, {nvox / 1e6:.2f} Mvox preprocessed, shapes "
          f"{sorted({tuple(x.shape[2:]) for _, x, _ in cases})[:4]}{'...' if len(cases) > 4 else ''}")
    x0 = cases[0][1]
    crop = x0[(slice(None), slice(None), *(slice(0, min(n, 2 * r)) for n, r in zip(x0.shape[2:], roi, strict=True)))]
    for fn in methods.values():  # warm-up on a crop: oneDNN primitives, channels-last weights
        fn(crop)
    times: dict[str, list[float]] = {k: [] for k in methods}
    dice: dict[str, list[list[float]]] = {k: [] for k in methods}
    agree: dict[str, list[float]] = {k: [] for k in methods}
    loads = []
    order = list(methods)
    for r in range(a.repeats):
        loads.append(os.getloadavg()[0])
        spent = dict.fromkeys(methods, 0.0)
        for i, (_, x, y) in enumerate(cases):
            shift = (r * len(cases) + i) % len(order)
            ref_arg = None
            for k in order[shift:] + order[:shift]:
                t0 = time.perf_counter()
                out = methods[k](x)
                spent[k] += time.perf_counter() - t0
                if r == 0:
                    arg = out.argmax(1)[0]
                    dice[k].append(dice_per_class(arg, y, n_classes))
                    if k == order[0]:
                        ref_arg = arg
                    elif ref_arg is not None:
                        agree[k].append(float((arg == ref_arg).float().mean()))
            if ref_arg is not None:
                agree[order[0]].append(1.0)
        for k in methods:
            times[k].append(spent[k])
        log.info("repeat %d (load %.1f): %s", r, loads[-1], ", ".join(f"{k} {v:.1f} s" for k, v in spent.items()))
    loads.append(os.getloadavg()[0])
    ref = statistics.median(times[order[0]])
    print(f"\n{a.bundle} on {a.cases}; {cpu_model()}, native bf16: {cpu_has_bf16()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {min(loads):.1f}-{max(loads):.1f}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"| method | median s | Mvox/s | vs {order[0]} | mean Dice | Dice per class | argmax agreement with {order[0]} |")
    print("|---|---:|---:|---:|---:|---|---:|")
    rows = {}
    for k in methods:
        med = statistics.median(times[k])
        per_class = [statistics.mean(c[j] for c in dice[k]) for j in range(n_classes - 1)]
        mean_dice = statistics.mean(statistics.mean(c) for c in dice[k])
        ag = statistics.mean(agree[k]) if agree[k] else float("nan")
        rows[k] = {"seconds": times[k], "median_s": med, "mvox_s": nvox / med / 1e6, "ratio": ref / med,
                   "mean_dice": mean_dice, "dice_per_class": per_class, "agreement": ag, "about": about[k],
                   "dice_per_case": dict(zip((c[0] for c in cases), dice[k], strict=True))}
        print(f"| {k} | {med:.2f} | {nvox / med / 1e6:.2f} | {ref / med:.2f}x | {mean_dice:.4f} | "
              f"{' / '.join(f'{d:.4f}' for d in per_class)} | {100 * ag:.2f}% |")
    if len(cases) > 1:  # per case, mean Dice over classes: the paired difference is what decides a variant
        base = [statistics.mean(c) for c in dice[order[0]]]
        for k in order[1:]:
            diff = [statistics.mean(c) - b for c, b in zip(dice[k], base, strict=True)]
            print(f"{k} - {order[0]}: mean Dice {statistics.mean(diff):+.4f} +- {statistics.stdev(diff) / len(diff) ** 0.5:.4f} "
                  f"(standard error), better on {sum(d > 0 for d in diff)} / {len(diff)} cases")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"bundle": a.bundle, "cases": a.cases, "n_cases": len(cases), "mvox": nvox / 1e6,
                       "loads": loads, "cpu": cpu_model(), "bf16_native": cpu_has_bf16(), "methods": rows}, f, indent=1)


if __name__ == "__main__":
    main()
