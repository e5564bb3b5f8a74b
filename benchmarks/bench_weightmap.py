"""Boundary weight map: fast (cutoff-cropped) vs direct (one full EDT per object), and the cost of
the weighted loss in a 3D training step.

    .venv/bin/python benchmarks/bench_weightmap.py            # everything (~2 min on 2 cores)
    .venv/bin/python benchmarks/bench_weightmap.py --no-train # weight maps only

Both methods run in one process on the same labels; times are medians of repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from monai.engines.utils import default_prepare_batch
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet

from pipeline.losses import BoundaryWeightedDiceCELoss, prepare_batch_with_weight
from pipeline.synthetic_cells import cells_image, random_blobs
from pipeline.weightmap import boundary_weight_map, iter_objects


def blobs(shape: tuple[int, ...], n: int, seed: int, radius: tuple[float, float], classes: int = 3) -> np.ndarray:
    """Random ellipsoids of ``classes`` classes, overlapping and touching at random."""
    return random_blobs(shape, n, np.random.default_rng(seed), radius, classes)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_maps(w0: float, sigma: float) -> None:
    cases = [
        ("2D 256^2 few blobs", blobs((256, 256), 6, 0, (10, 30)), (1.0, 1.0), 3),
        ("2D 512^2 cells (synthetic)", cells_image((512, 512), np.random.default_rng(0))[1], (1.0, 1.0), 3),
        ("2D 512^2 many blobs", blobs((512, 512), 160, 1, (4, 14)), (1.0, 1.0), 3),
        ("3D 96^3 few blobs", blobs((96, 96, 96), 6, 2, (8, 20)), (1.0, 1.0, 1.0), 3),
        ("3D 128^3 ~40 blobs, 1 mm", blobs((128, 128, 128), 48, 0, (5, 14)), (1.0, 1.0, 1.0), 2),
        ("3D 128^3 ~40 blobs, 1.6x1.6x2.5 mm", blobs((128, 128, 128), 48, 0, (5, 14)), (1.6, 1.6, 2.5), 2),
    ]
    print(f"weight maps, w0={w0:g} sigma={sigma:g} (spacing units), border_on='all'")
    print(f"{'case':38s} {'objects':>7s} {'direct s':>9s} {'fast s':>8s} {'ratio':>7s} {'max |diff|':>11s}")
    for name, label, spacing, repeats in cases:
        objects = sum(1 for _ in iter_objects(label))
        run = partial(boundary_weight_map, label, spacing, w0, sigma)
        t_direct, t_fast = [], []
        for _ in range(repeats):  # interleaved, so load from other processes hits both alike
            seconds, direct = timed(partial(run, exact=True))
            t_direct.append(seconds)
            for _ in range(3):
                seconds, fast = timed(run)
                t_fast.append(seconds)
        t_d, t_f = statistics.median(t_direct), statistics.median(t_fast)
        diff = float(np.abs(fast - direct).max())
        print(f"{name:38s} {objects:7d} {t_d:9.3f} {t_f:8.3f} {t_d / t_f:6.1f}x {diff:11.2e}", flush=True)


def bench_train_step(repeats: int) -> None:
    """One optimiser step of the phantom bundle's 3D BasicUNet on a 2x1x48x48x32 batch: plain
    DiceCE vs the boundary-weighted loss with a cached weight map (prepare_batch included)."""
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    label = torch.from_numpy(blobs((2, 48, 48, 32), 12, 3, (4, 10), classes=3)[:, None].astype(np.float32))
    weight = torch.stack([torch.from_numpy(boundary_weight_map(lab[0].numpy(), (1.6, 1.6, 2.5)))[None] for lab in label])
    batch = {"image": label / 3 + 0.1 * torch.rand_like(label), "label": label, "weight": weight}
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=4, features=(16, 16, 32, 64, 128, 16))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    setups = {
        "DiceCELoss": (default_prepare_batch, DiceCELoss(to_onehot_y=True, softmax=True)),
        "BoundaryWeightedDiceCELoss": (prepare_batch_with_weight, BoundaryWeightedDiceCELoss()),
    }

    def step(prepare, loss_fn):
        image, target = prepare(batch, torch.device("cpu"))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(image), target)
        loss.backward()
        opt.step()

    def loss_only(prepare, loss_fn, logits):
        _, target = prepare(batch, torch.device("cpu"))
        x = logits.clone().requires_grad_()
        loss_fn(x, target).backward()

    times: dict[str, list[float]] = {k: [] for k in setups}
    loss_times: dict[str, list[float]] = {k: [] for k in setups}
    logits = torch.randn(2, 4, 48, 48, 32)
    for setup in setups.values():  # warm-up
        step(*setup)
    for i in range(repeats):  # interleaved in alternating order, so load hits both alike
        for name in list(setups)[:: 1 if i % 2 == 0 else -1]:
            times[name].append(timed(partial(step, *setups[name]))[0])
            loss_times[name].append(timed(partial(loss_only, *setups[name], logits))[0])
    plain, weighted = (statistics.median(times[k]) for k in setups)
    plain_loss, weighted_loss = (statistics.median(loss_times[k]) for k in setups)
    paired = statistics.median(w / p for p, w in zip(*times.values(), strict=True))
    print(f"\ntraining step, 3D BasicUNet, batch 2x1x48x48x32, {torch.get_num_threads()} threads, median of {repeats}")
    print(f"  DiceCELoss                  step {plain:.3f} s   prepare_batch + loss fwd+bwd {plain_loss * 1e3:.1f} ms")
    print(f"  BoundaryWeightedDiceCELoss  step {weighted:.3f} s   prepare_batch + loss fwd+bwd {weighted_loss * 1e3:.1f} ms")
    print(f"  weighted/plain step time, median of paired ratios: {100 * (paired - 1):+.1f}%")
    print(f"  extra work of the weighted loss (prepare + loss) over a plain step: "
          f"{100 * (weighted_loss - plain_loss) / plain:+.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--w0", type=float, default=10.0)
    parser.add_argument("--sigma", type=float, default=5.0)
    parser.add_argument("--no-train", action="store_true", help="skip the training-step benchmark")
    parser.add_argument("--repeats", type=int, default=9, help="training steps per loss")
    a = parser.parse_args()
    bench_maps(a.w0, a.sigma)
    if not a.no_train:
        bench_train_step(a.repeats)


if __name__ == "__main__":
    main()
