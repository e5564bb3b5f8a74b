"""Ablation: does the U-Net boundary weight map help separate touching cells?

Trains the same small 2D U-Net (monai UNet) twice on synthetic touching cells (pipeline.synthetic, cells2d)
with the same seed, initial weights, data order, augmentations and number of iterations, through
monai.engines.SupervisedTrainer with prepare_batch_with_weight and BoundaryWeightedDiceCELoss:
once with the weight map (BoundaryWeightMapd, the paper's setting for cells: border on background,
balanced class weights) and once without (w = 1). Reports on held-out images the pixel Dice of
the cell class and the instance separation: F1 of predicted connected components (8-connected)
matched one-to-one to true instances at IoU >= 0.5.

    .venv/bin/python benchmarks/ablate_boundary_loss.py                 # 2 x 200 steps: ~9 min at load 5 on 2 cores
    .venv/bin/python benchmarks/ablate_boundary_loss.py --iterations 50 # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader
from monai.engines import SupervisedTrainer
from monai.networks.nets import UNet
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandFlipd, RandRotate90d
from monai.utils import set_determinism
from skimage.measure import label as connected_components

from pipeline.losses import BoundaryWeightedDiceCELoss, prepare_batch_with_weight
from pipeline.synthetic import write_dataset
from pipeline.transforms import BoundaryWeightMapd

log = logging.getLogger("ablate_boundary_loss")


def instance_f1(pred: np.ndarray, instances: np.ndarray, iou: float = 0.5) -> tuple[int, int, int]:
    """(true positives, predicted components, true instances): components of ``pred > 0``
    (8-connected) matched one-to-one to ``instances`` at IoU >= ``iou``."""
    comps = connected_components(pred > 0, connectivity=pred.ndim)
    n_pred, n_true = int(comps.max()), int(instances.max())
    if n_pred == 0 or n_true == 0:
        return 0, n_pred, n_true
    inter = np.bincount(comps.ravel() * (n_true + 1) + instances.ravel(),
                        minlength=(n_pred + 1) * (n_true + 1)).reshape(n_pred + 1, n_true + 1)[1:, 1:]
    area_p, area_t = np.bincount(comps.ravel())[1:], np.bincount(instances.ravel(), minlength=n_true + 1)[1:]
    match = inter / (area_p[:, None] + area_t[None, :] - inter) >= iou
    return int(min(match.any(0).sum(), match.any(1).sum())), n_pred, n_true


def scores(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Pixel Dice of the cell class (pooled over images) and instance F1 (pooled counts)."""
    inter = sum(int(((p > 0) & (i > 0)).sum()) for p, i in pairs)
    total = sum(int((p > 0).sum() + (i > 0).sum()) for p, i in pairs)
    tp, n_pred, n_true = (sum(c) for c in zip(*(instance_f1(p, i) for p, i in pairs), strict=True))
    return {"dice": 2 * inter / max(total, 1), "instance_f1": 2 * tp / max(n_pred + n_true, 1),
            "tp": tp, "predicted": n_pred, "instances": n_true}


def small_unet(channels: Sequence[int]) -> UNet:
    return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=tuple(channels),
                strides=(2,) * (len(channels) - 1), num_res_units=1)


def train(files: list[dict[str, str]], weighted: bool, init: dict[str, torch.Tensor], a: argparse.Namespace) -> UNet:
    set_determinism(seed=a.seed)
    keys = ["image", "label"] + (["weight"] if weighted else [])
    deterministic: list[Any] = [LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"])]
    if weighted:
        deterministic.append(BoundaryWeightMapd(keys="label", weight_key="weight", w0=a.w0, sigma=a.sigma,
                                                class_weights="balanced", border_on="background"))
    rand = [RandFlipd(keys=keys, prob=0.5, spatial_axis=0), RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandRotate90d(keys=keys, prob=0.5)]
    transform = Compose(deterministic + rand).set_random_state(seed=a.seed)
    data = [{"image": f["image"], "label": f["label"]} for f in files]
    loader = DataLoader(CacheDataset(data, transform, progress=False), batch_size=a.batch, shuffle=True,
                        generator=torch.Generator().manual_seed(a.seed), num_workers=0)
    net = small_unet(a.channels)
    net.load_state_dict(init)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=-(-a.iterations // len(loader)), epoch_length=len(loader),
        train_data_loader=loader, network=net, optimizer=torch.optim.Adam(net.parameters(), lr=a.lr),
        loss_function=BoundaryWeightedDiceCELoss(), prepare_batch=prepare_batch_with_weight, decollate=False,
    )
    # the same number of steps in both runs, even when it is not a whole number of epochs
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=a.iterations), lambda e: e.terminate())
    start = time.perf_counter()
    trainer.run()
    log.info("%s: %d iterations in %.0f s, last loss %.4f", "weighted" if weighted else "plain",
             trainer.state.iteration, time.perf_counter() - start, trainer.state.output["loss"].item())
    return net


@torch.no_grad()
def predict(net: UNet, files: list[dict[str, str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    load = Compose([LoadImaged(keys=["image", "instance"]), EnsureChannelFirstd(keys=["image", "instance"])])
    net.eval()
    out = []
    for f in files:
        d = load({"image": f["image"], "instance": f["instance"]})
        pred = net(d["image"][None].as_tensor()).argmax(1)[0].numpy()
        out.append((pred, d["instance"][0].numpy().astype(np.int64)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--train", type=int, default=16, help="training images")
    p.add_argument("--test", type=int, default=12, help="held-out images")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--w0", type=float, default=10.0)
    p.add_argument("--sigma", type=float, default=1.0, help="mm; the cells have 0.5 mm pixels")
    p.add_argument("--channels", type=int, nargs="+", default=(16, 32, 64, 128))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ignite").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        sets = {}
        for name, n, seed in (("train", a.train, a.seed), ("test", a.test, a.seed + 1000)):
            manifest = write_dataset("cells2d", n, Path(tmp) / name, seed=seed, shape=(a.size, a.size))
            sets[name] = [{k: str(manifest.parent / v) for k, v in e.items() if k != "patient"}
                          for e in json.loads(manifest.read_text())["training"]]
        torch.manual_seed(a.seed)
        init = copy.deepcopy(small_unet(a.channels).state_dict())
        results: dict[str, Any] = {}
        truth = predict_truth(sets["test"])
        results["ceiling (true semantic label)"] = scores(truth)
        for weighted in (False, True):
            net = train(sets["train"], weighted, init, a)
            results["weight map" if weighted else "no weight map"] = scores(predict(net, sets["test"]))

    print(f"\n2D UNet {tuple(a.channels)} (1 residual unit), {a.iterations} iterations, batch {a.batch}, Adam lr {a.lr}, "
          f"seed {a.seed}; {a.train} train / {a.test} held-out {a.size}x{a.size} cells2d images")
    print(f"weight map: w0={a.w0:g}, sigma={a.sigma:g} mm ({a.sigma / 0.5:g} px), border_on=background, "
          "class_weights=balanced")
    print(f"{'':30s} {'pixel Dice':>10s} {'instance F1':>11s}  (matched / predicted / true)")
    for name, r in results.items():
        print(f"{name:30s} {r['dice']:10.4f} {r['instance_f1']:11.4f}  ({r['tp']} / {r['predicted']} / {r['instances']})")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=2, default=list))


def predict_truth(files: list[dict[str, str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The true semantic labels scored like predictions: touching cells merge, so this is the
    best instance F1 any semantic segmentation can reach."""
    load = Compose([LoadImaged(keys=["label", "instance"])])
    return [(d["label"].numpy(), d["instance"].numpy().astype(np.int64))
            for d in (load({"label": f["label"], "instance": f["instance"]}) for f in files)]


if __name__ == "__main__":
    main()
