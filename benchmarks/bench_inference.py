"""Our overlap-tile predictor against MONAI's sliding_window_inference, same network and volume.

A 3D U-Net (monai UNet, channels 16-256, ROI 96^3) is trained for a few steps on a CT phantom so
its argmax is not trivial, then the same phantom volume (256x256x128) is segmented by

- ``monai``: ``sliding_window_inference`` in fp32, overlap 0.5, Gaussian blending, under
  ``torch.no_grad`` (sw_batch_size as ours, and MONAI's default of 1),
- ``ours m=0``: ``pipeline.inference.predict_tiles`` with its defaults but no context margin,
- ``ours``: ``predict_tiles`` with its defaults (margin "auto": mirrored context up to a quarter
  of the ROI where it adds no windows; 16x16x8 voxels here),
- ``ours quarter`` (``--quarter``): margin a quarter of the ROI on every side (more windows),

alternating the methods in each repeat, each on its own copy of the network. Prints Mvox/s
(medians), the speed ratio to MONAI and the argmax agreement with MONAI.

    .venv/bin/python benchmarks/bench_inference.py            # full size
    .venv/bin/python benchmarks/bench_inference.py --quick    # 128x128x64, ROI 64^3
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from pipeline.amp import cpu_has_bf16
from pipeline.inference import predict_tiles
from pipeline.synthetic import ct_phantom

log = logging.getLogger("bench_inference")


def phantom(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    image, label = ct_phantom(shape, np.random.default_rng(seed))
    x = np.clip((image.astype(np.float32) + 160) / 400, 0, 1)
    return torch.from_numpy(x)[None, None], torch.from_numpy(label.astype(np.int64))[None]


def train_briefly(net: torch.nn.Module, roi: int, steps: int, seed: int) -> None:
    """A few Adam steps on random crops of another phantom: enough for a non-trivial argmax."""
    x, y = phantom((roi * 3, roi * 3, roi), seed + 1)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    rng = np.random.default_rng(seed)
    net.train()
    for _ in range(steps):
        i, j = rng.integers(0, 2 * roi + 1, 2)
        xb, yb = x[..., i:i + roi, j:j + roi, :], y[..., i:i + roi, j:j + roi, :]
        loss = torch.nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    log.info("trained %d steps, last loss %.3f", steps, loss.item())


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128x128x64 volume, ROI 64^3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--train-crop", type=int, default=64, help="training crop size (voxels per side)")
    ap.add_argument("--sw-batch-size", type=int, default=4)
    ap.add_argument("--no-monai-bs1", action="store_true", help="skip MONAI with sw_batch_size=1")
    ap.add_argument("--compile", action="store_true", help="also ours with compile=True (margin 0 and default)")
    ap.add_argument("--no-cl", action="store_true", help="also ours at margin 0 without channels-last")
    ap.add_argument("--quarter", action="store_true", help="also ours with a quarter-ROI margin")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                    help="ours with the precision policy (bf16 on CPUs that compute it natively); --no-amp: fp32")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shape, roi = ((128, 128, 64), 64) if a.quick else ((256, 256, 128), 96)
    torch.manual_seed(a.seed)
    net = UNet(3, 1, 4, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))
    train_briefly(net, min(a.train_crop, roi), a.train_steps, a.seed)
    x, _ = phantom(shape, a.seed)
    rois = (roi,) * 3
    nets = {k: copy.deepcopy(net) for k in ("monai", "monai bs1", "ours m=0", "ours", "ours quarter", "compiled", "ours noCL")}

    def monai(name: str, bs: int) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return sliding_window_inference(x, rois, bs, nets[name], overlap=0.5, mode="gaussian")
        return run

    methods: dict[str, Callable[[], torch.Tensor]] = {
        "monai": monai("monai", a.sw_batch_size),
        "ours m=0": lambda: predict_tiles(nets["ours m=0"], x, rois, amp=a.amp, margin=0, sw_batch_size=a.sw_batch_size),
        "ours": lambda: predict_tiles(nets["ours"], x, rois, amp=a.amp, sw_batch_size=a.sw_batch_size),
    }
    if not a.no_monai_bs1:
        methods["monai bs1"] = monai("monai bs1", 1)
    if a.quarter:
        methods["ours quarter"] = lambda: predict_tiles(nets["ours quarter"], x, rois, amp=a.amp, margin="quarter",
                                                        sw_batch_size=a.sw_batch_size)
    if a.no_cl:
        methods["ours noCL"] = lambda: predict_tiles(nets["ours noCL"], x, rois, amp=a.amp, margin=0,
                                                     sw_batch_size=a.sw_batch_size, channels_last=False)
    if a.compile:  # one compiled network (same shapes) for both margins
        methods["ours+c m=0"] = lambda: predict_tiles(nets["compiled"], x, rois, amp=a.amp, margin=0,
                                                      sw_batch_size=a.sw_batch_size, compile=True)
        methods["ours+c"] = lambda: predict_tiles(nets["compiled"], x, rois, amp=a.amp, sw_batch_size=a.sw_batch_size,
                                                  compile=True)
    crop = x[..., :roi, :roi, :roi]
    for k in methods:  # warm-up on one window: oneDNN primitives, channels-last weights, compilation
        if k.startswith("ours+c"):
            t0 = time.perf_counter()
            predict_tiles(nets["compiled"], crop, rois, amp=a.amp, margin=0, sw_batch_size=a.sw_batch_size, compile=True)
            log.info("%s: compiled in %.1f s (not counted below)", k, time.perf_counter() - t0)
        elif k.startswith("ours"):
            predict_tiles(nets[k], crop, rois, amp=a.amp, margin=0, channels_last=False if k == "ours noCL" else None)
        else:
            with torch.no_grad():
                nets[k](crop)
    times: dict[str, list[float]] = {k: [] for k in methods}
    outs: dict[str, torch.Tensor] = {}
    for r in range(a.repeats):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for k in order:
            t, out = timed(methods[k])
            times[k].append(t)
            outs[k] = out.argmax(1)
            log.info("repeat %d %-10s %.2f s", r, k, t)
    nvox = x.numel()
    ref = statistics.median(times["monai"])
    print(f"\nvolume {tuple(shape)}, ROI {rois}, overlap 0.5 gaussian, sw_batch_size {a.sw_batch_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}, "
          f"bf16 native: {cpu_has_bf16()}")
    print(f"{'method':<12}{'median s':>10}{'Mvox/s':>9}{'vs monai':>10}{'argmax agree':>14}{'fg agree':>10}")
    for k, ts in times.items():
        med = statistics.median(ts)
        agree = float((outs[k] == outs["monai"]).float().mean())
        either = (outs[k] > 0) | (outs["monai"] > 0)  # agreement where either predicts foreground
        fg = float((outs[k] == outs["monai"])[either].float().mean()) if either.any() else 1.0
        print(f"{k:<12}{med:>10.2f}{nvox / med / 1e6:>9.2f}{ref / med:>9.2f}x{100 * agree:>13.3f}%{100 * fg:>9.2f}%")
    fg = float((outs["monai"] > 0).float().mean())
    print(f"foreground (argmax > 0) in MONAI's output: {100 * fg:.1f}% of voxels")


if __name__ == "__main__":
    main()
