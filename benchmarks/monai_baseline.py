"""A plain MONAI baseline, as MONAI's tutorials train one, on the same split and CPU budget as a
segpipe cross-validation: UNet 16-32-64-128-256 with residual units, DiceCE, Adam 1e-4, a CT window,
random crops, flips on the axes given (default: the two non-lateral ones), fp32, a plain PyTorch
loop; then the fold's validation cases predicted with ``sliding_window_inference`` (overlap 0.25,
as the tutorials), returned to each study's own grid and scored with segpipe's metrics (Dice and
HD95 per class against the true labels).

    .venv/bin/python benchmarks/monai_baseline.py --manifest ../shared/data/OpenKBP_HN_CT/dataset.json \\
        --folds 5 --fold 0 --budget-min 15 --out runs/baseline_hn

Logs each epoch's mean loss; prints one JSON line per fold (per-class Dice/HD95, epochs, samples,
wall time) and writes ``OUT/fold_<k>/metrics.json``, ``OUT/fold_<k>/model.pt`` and ``OUT/oof/<id>.nii.gz``. The split is pipeline.manifest.datalist's,
the one ``segpipe crossval`` trains (seed 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    ScaleIntensityRanged,
)

from pipeline.evaluation import case_metrics
from pipeline.fileio import read_label
from pipeline.manifest import datalist, load_manifest
from pipeline.predict_io import write_mask

log = logging.getLogger("monai_baseline")


def run_fold(a: argparse.Namespace, k: int) -> dict:
    torch.manual_seed(a.seed)
    labels = load_manifest(a.manifest)["labels"]
    n_classes = len(labels)
    train_items = datalist(a.manifest, "train", k, a.folds, a.seed)
    val_items = datalist(a.manifest, "val", k, a.folds, a.seed)
    keys = ["image", "label"]
    base = [LoadImaged(keys, allow_missing_keys=True), EnsureChannelFirstd(keys, allow_missing_keys=True),
            Orientationd(keys, axcodes="RAS", allow_missing_keys=True),
            ScaleIntensityRanged("image", a_min=a.window[0], a_max=a.window[1], b_min=0.0, b_max=1.0, clip=True)]
    rand = [RandCropByPosNegLabeld(keys, "label", spatial_size=a.roi, pos=1, neg=1, num_samples=a.num_samples)]
    rand += [RandFlipd(keys, prob=0.5, spatial_axis=ax) for ax in a.flip_axes]
    train_ds = CacheDataset([{k2: e[k2] for k2 in keys} for e in train_items], Compose(base + rand), progress=False)
    loader = DataLoader(train_ds, batch_size=a.batch_size, shuffle=True, num_workers=0)
    net = UNet(3, 1, n_classes, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="batch")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), a.lr)
    t0, epochs, samples, losses = time.perf_counter(), 0, 0, []
    while time.perf_counter() - t0 < 60 * a.budget_min:
        net.train()
        total, steps = 0.0, 0
        for batch in loader:
            opt.zero_grad()
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            opt.step()
            samples += len(batch["image"])
            total, steps = total + loss.item(), steps + 1
            if time.perf_counter() - t0 >= 60 * a.budget_min:
                break
        epochs += 1
        losses.append(round(total / max(steps, 1), 4))
        log.info("fold %d epoch %d: mean loss %.4f, %d samples, %.0f s", k, epochs, losses[-1], samples,
                 time.perf_counter() - t0)
    train_s = time.perf_counter() - t0
    fold_dir = a.out / f"fold_{k}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), fold_dir / "model.pt")

    net.eval()
    pre = Compose(base)
    out_dir = a.out / "oof"
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [labels[str(i)] for i in range(n_classes)]
    per_case = {}
    for e in val_items:
        data = pre({"image": e["image"]})
        with torch.inference_mode():
            logits = sliding_window_inference(data["image"][None], a.roi, 4, net, overlap=0.25)[0]
        data["pred"] = logits.argmax(0, keepdim=True).float()
        inv = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(data)
        mask = np.asarray(inv["pred"][0]).round().astype(np.uint8)
        write_mask(mask, Path(e["image"]), out_dir / f"{e['id']}.nii.gz")
        ref, _, spacing = read_label(e["label"])
        m = case_metrics(mask, ref, spacing, labels)
        per_case[e["id"]] = {n: {"dice": m[n]["dice"], "hd95_mm": m[n]["hd95_mm"]} for n in names[1:]}
    summary = {n: {"dice": float(np.mean([c[n]["dice"] for c in per_case.values()])),
                   "hd95_mm": float(np.nanmean([c[n]["hd95_mm"] for c in per_case.values()]))} for n in names[1:]}
    result = {"fold": k, "cases": len(per_case), "epochs": epochs, "samples": samples, "train_s": round(train_s, 1),
              "mean_dice": float(np.mean([v["dice"] for v in summary.values()])), "per_class": summary,
              "per_case": per_case, "budget_min": a.budget_min, "threads": torch.get_num_threads(),
              "lr": a.lr, "epoch_loss": losses, "samples_per_s": round(samples / max(train_s, 1e-9), 3)}
    (fold_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--fold", type=int, action="append", help="fold(s) to run (default: all)")
    ap.add_argument("--budget-min", type=float, default=15.0, help="training wall time per fold")
    ap.add_argument("--window", type=float, nargs=2, default=[-500.0, 1000.0], help="CT window (HU)")
    ap.add_argument("--roi", type=int, nargs=3, default=[96, 96, 64])
    ap.add_argument("--flip-axes", type=int, nargs="*", default=[1, 2], help="RAS axes to flip (0 is left-right)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--num-samples", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (MONAI's spleen tutorial: 1e-4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for k in a.fold or range(a.folds):
        r = run_fold(a, k)
        print(json.dumps({key: v for key, v in r.items() if key != "per_case"}), flush=True)


if __name__ == "__main__":
    main()
