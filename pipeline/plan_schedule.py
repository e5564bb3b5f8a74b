"""Planning rules 9 and 10 (see :mod:`pipeline.plan`): the training schedule within a wall-time
budget, and the inference window, tiling and test-time augmentation, as data."""

from __future__ import annotations

import math

DEVICES = ("cpu", "cuda")
#: training voxels/s in 3D (2D: 3x), only for the validation interval. cpu: measured (hippocampus,
#: 2-core, compiled, 16 wide); cuda: assumed (nnU-Net-like 32-wide 3D with AMP on one recent GPU)
THROUGHPUT = {"cpu": 3.0e5, "cuda": 1.0e7}
SAMPLE_OVERHEAD_S = {"cpu": 0.02, "cuda": 0.002}  # per sample whatever its size: transforms, Python
VALIDATIONS = 6
VALIDATION_SHARE = 0.15  # of the budget, at most, spent validating (large images: fewer validations)
MIN_EPOCH_ITERATIONS = 50  # tiny datasets: an epoch of a few steps would checkpoint every few steps
COMPILE_MIN_BUDGET = 5.0  # minutes; torch.compile takes about 50 s before the first CPU step
NUM_FOLDS = 5


def schedule(device: str, budget_min: float, n_cases: int, patch_voxels: int, batch_size: int,
             spatial_dims: int, compiler: bool = True, image_voxels: float = 0.0) -> tuple[dict, str]:
    """Rule 9: optimiser, learning rate, wall-time budget, epoch length and cap, validation interval.
    ``compiler``: a C++ compiler is at hand (torch.compile on a CPU needs one); ``image_voxels``: the
    median image at target spacing, which each validation predicts for every fold-0 case."""
    voxel_rate = THROUGHPUT[device] * (3 if spatial_dims == 2 else 1)
    rate = 1 / (patch_voxels / voxel_rate + SAMPLE_OVERHEAD_S[device])  # samples/s
    train = max(1, round(n_cases * (NUM_FOLDS - 1) / NUM_FOLDS))
    drop_last = train >= batch_size  # one batch shape: a compiled step is not compiled again
    one_pass = max(1, train // batch_size if drop_last else math.ceil(train / batch_size))
    iterations = max(one_pass, MIN_EPOCH_ITERATIONS)
    epochs = 60 * budget_min / (iterations * batch_size / rate)
    # a validation predicts the fold-0 cases whole (windows overlapping by a quarter, forward only: ~3x
    # the training rate); at most VALIDATION_SHARE of the budget goes to validating
    val_s = max(1, round(n_cases / NUM_FOLDS)) * image_voxels * (4 / 3) ** spatial_dims / (3 * voxel_rate)
    validations = max(1, min(VALIDATIONS, int(VALIDATION_SHARE * 60 * budget_min / max(val_s, 1e-9))))
    interval = max(1, round(epochs / validations))
    compile_ = budget_min >= COMPILE_MIN_BUDGET and (compiler or device != "cpu")
    out = {"optimizer": "AdamW", "learning_rate": 2e-3, "weight_decay": 1e-5,
           "lr_schedule": "cosine_wall_time",
           "time_budget_min": float(budget_min), "max_epochs": max(100, math.ceil(10 * epochs)),
           "epoch_length": iterations if iterations > one_pass else None, "drop_last": drop_last,
           "val_interval": interval, "estimated_epochs": round(epochs, 1), "num_folds": NUM_FOLDS,
           "grad_clip_norm": 12.0, "model_selection": "last", "compile": compile_, "amp": True}
    why = (f"{budget_min:g} min at about {rate:.3g} samples/s ({voxel_rate:.3g} voxels/s and "
           f"{SAMPLE_OVERHEAD_S[device]:g} s per sample, {device} estimate) over {train} training cases "
           f"({NUM_FOLDS} folds) is about {epochs:.0f} epochs of {iterations} iterations"
           + (f" (one pass is {one_pass}: an epoch of at least {MIN_EPOCH_ITERATIONS} iterations keeps the "
              "per-epoch checkpoint and log a small cost)" if iterations > one_pass else "")
           + f": validation every {interval} epochs (about {validations} validation(s) of about "
           f"{val_s:.2g} s: at most {VALIDATION_SHARE:.0%} of the budget); max_epochs "
           f"{out['max_epochs']} (10x) only a cap; AdamW 2e-3, cosine over wall time (the CPU hippocampus "
           "recipe; nnU-Net's SGD 1e-2 with a poly schedule is tuned for 250k steps, a budget of minutes "
           "gives thousands); the last weights are kept (validation monitors, it does not select); "
           + ("training step compiled (torch.compile: +55% samples/s on the CPU hippocampus recipe)" if compile_
              else f"not compiled: compiling takes about a minute, more than a {budget_min:g}-min budget "
              f"(< {COMPILE_MIN_BUDGET:g}) can repay" if budget_min < COMPILE_MIN_BUDGET
              else "not compiled: no C++ compiler (g++, clang++ or $CXX) for torch.compile on this CPU"))
    return out, why


OVERLAP = 0.5  # inference windows (MONAI's model-zoo default)


def inference(roi_size: list[int], median_shape: list[float], flip_axes: list[int], slice_axis: int | None,
              lateral_axis: int | None = None, lateral_pairs: list[list[int]] | None = None) -> tuple[dict, str]:
    """Rule 10: window, overlap, mirror margin and TTA axes; a TTA flip along ``lateral_axis``
    swaps the ``lateral_pairs``' probabilities after flipping back."""
    covers = all(r >= m for r, m in zip(roi_size, median_shape, strict=True))
    pairs = [list(p) for p in lateral_pairs or []]
    windows = math.prod(1 if m <= r else math.ceil((m - r) / (r * (1 - OVERLAP))) + 1
                        for r, m in zip(roi_size, median_shape, strict=True))
    # every TTA axis doubles the passes over every window: all flips where the median image is one
    # window, one flip (the patient's left-right where the data has it) where it takes many
    tta_axes = list(flip_axes) if windows == 1 else (
        [lateral_axis] if lateral_axis in flip_axes else list(flip_axes[:1]))
    out = {"inferer": "SliceTileInferer" if slice_axis is not None else "OverlapTileInferer",
           "slice_axis": slice_axis,
           "roi_size": roi_size, "overlap": OVERLAP, "margin": 0 if covers else "auto", "tta": bool(flip_axes),
           "tta_axes": tta_axes, "tta_shift": 0, "lateral_axis": lateral_axis, "lateral_pairs": pairs,
           "sw_batch_size": 4, "val_overlap": 0.25, "tiling": "blend"}
    swaps = pairs and lateral_axis in tta_axes
    why = (f"window = patch {roi_size} (the training patch: a 128^3 window on the head-and-neck CT model "
           f"lost 0.17 Dice, instance normalisation sees other statistics), overlap {OVERLAP}, Gaussian blending; "
           + (f"flip TTA on {tta_axes}: the median image is one window, {2 ** len(tta_axes)} passes"
              if windows == 1 else
              f"flip TTA on {tta_axes} only: the median image takes {windows} windows, and each TTA axis doubles "
              f"the passes over all of them (head-and-neck CT, 100 windows: flips on [0, 1, 2] 0.7276 Dice at "
              f"52 s per case, on [0] 0.7305 at 13 s)")
           + (f" (the flip along axis {lateral_axis} swaps the probabilities of the lateral pairs {pairs} "
              "after flipping back)" if swaps else "") + "; margin "
           + ("0: the patch covers the median image (hippocampus: 'auto' cost 0.0014 Dice)" if covers
              else "'auto': mirrored context at the image borders within the last window's slack"))
    return out, why
