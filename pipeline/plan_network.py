"""Planning rules 2-4 (:mod:`pipeline.plan`): patch size, U-Net topology, width and batch size
from the median image at the target spacing and a device budget, as nnU-Net v2's planner does.

2. Patch: the median image at target spacing (at most 256^3 / 2048^2 voxels in the spacing's aspect
   ratio), padded to multiples of 2**poolings per axis; while over the device budget, the axis
   largest relative to the median shape shrinks. Budgets are voxels per iteration (batch x patch,
   ``ITERATION_VOXELS``), a patch at most half. cuda: nnU-Net's 8 GB references (2 x 128^3 in 3D,
   12 x 512^2 in 2D). cpu: 2^18 = 64^3 in 3D, so patches up to 2^17 (~50^3): the hippocampus
   recipe (40x56x40, batch 2, 16 wide) ran 3.2-3.6 samples/s on a 2-core CPU (~3e5 voxels/s), so a
   patch at the cap still trains >= 2 samples/s, >= 3,000 samples in 30 min, past where that recipe
   stopped gaining (BENCHMARKS session 5); 2D cpu: 3x (a 3x3 kernel costs a third of a 3x3x3).
3. Depth (``get_pool_and_conv_props``): pool an axis while its feature map stays >= 4 voxels and its
   spacing is < 2x the finest (fine axes first when anisotropic); kernel 1 along axes still > 2x
   coarser than the finest, else 3; DynUNet's per-level ``kernel_size``/``strides`` (first level 1s).
4. Width: 32 filters doubling, at most 320 (3D) / 512 (2D); 16 on cpu, where 32-wide cost 2.7x per
   sample and scored 0.8761 vs 0.8786 in 28.5 min (BENCHMARKS session 4). Batch: budget / patch,
   at most 5% of the dataset's voxels, at least 2.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.errors import InputError

MIN_FEATURE_MAP = 4  # nnU-Net: no bottleneck edge under 4 voxels
MIN_BATCH = 2
MAX_DATASET_FRACTION = 0.05  # nnU-Net: one batch sees at most 5% of the dataset's voxels
ITERATION_VOXELS = {("cpu", 3): 2**18, ("cpu", 2): 3 * 2**18,
                    ("cuda", 3): 2 * 128**3, ("cuda", 2): 12 * 512**2}
INITIAL_PATCH = {3: 256**3, 2: 2048**2}  # nnU-Net's starting volume, before clipping to the median shape
BASE_FEATURES = {"cpu": 16, "cuda": 32}
MAX_FEATURES = {3: 320, 2: 512}


def rounded(x: Any, nd: int = 4) -> Any:
    return [rounded(v, nd) for v in x] if isinstance(x, (list, tuple, np.ndarray)) else round(float(x), nd)


def pool_and_conv(spacing: list[float], patch: list[float]
                  ) -> tuple[list[int], list, list, list[int], list[int]]:
    """nnU-Net's ``get_pool_and_conv_props``: (poolings per axis, strides and kernel sizes per level
    in DynUNet's format, the patch padded to multiples of 2**poolings, those multiples)."""
    dim, sp, size = len(spacing), list(spacing), list(patch)
    strides, kernels, npool, kernel = [[1] * dim], [], [0] * dim, [1] * dim
    while valid := [i for i in range(dim) if size[i] >= 2 * MIN_FEATURE_MAP]:
        finest = min(sp[i] for i in valid)
        valid = [i for i in valid if sp[i] / finest < 2]
        if len(valid) == 1 and size[valid[0]] < 3 * MIN_FEATURE_MAP:
            break
        kernel = [3 if kernel[d] == 3 or sp[d] / min(sp) < 2 else 1 for d in range(dim)]
        strides.append([2 if i in valid else 1 for i in range(dim)])
        kernels.append(kernel)
        for i in valid:
            npool[i], sp[i], size[i] = npool[i] + 1, sp[i] * 2, math.ceil(size[i] / 2)
    kernels.append([3] * dim)
    div = [2**n for n in npool]
    return npool, strides, kernels, [int(math.ceil(p / d) * d) for p, d in zip(patch, div, strict=True)], div


def patch_and_topology(spacing: list[float], median_shape: list[float], device: str, n_cases: int
                       ) -> tuple[dict, str]:
    """Rules 2-4: roi_size, the DynUNet topology and widths, and the batch size, within the device budget."""
    dim = len(spacing)
    inv = 1 / np.array(spacing)
    start = np.round(inv * (INITIAL_PATCH[dim] / np.prod(inv)) ** (1 / dim))
    npool, strides, kernels, patch, div = pool_and_conv(spacing, np.minimum(start, median_shape).tolist())
    budget, shrunk = ITERATION_VOXELS[(device, dim)], set()
    while np.prod(patch, dtype=float) > budget / MIN_BATCH:
        axis = int(np.argmax(np.array(patch) / np.array(median_shape)))
        trial = list(patch)
        trial[axis] -= div[axis]  # nnU-Net: step by the divisor the smaller patch will have
        patch[axis] -= pool_and_conv(spacing, trial)[4][axis]
        shrunk.add(axis)
        npool, strides, kernels, patch, div = pool_and_conv(spacing, patch)
    if len(strides) < 2:
        raise InputError(f"dataset.median_shape_at_target_spacing: {rounded(median_shape, 1)} is too small for a "
                         f"U-Net (no axis of {2 * MIN_FEATURE_MAP} voxels or more)")
    voxels, dataset_voxels = int(np.prod(patch)), float(np.prod(median_shape)) * n_cases
    cap = max(MIN_BATCH, int(MAX_DATASET_FRACTION * dataset_voxels // voxels))
    batch = max(MIN_BATCH, min(budget // voxels, cap))
    levels = len(strides)
    filters = [min(MAX_FEATURES[dim], BASE_FEATURES[device] * 2**i) for i in range(levels)]
    net = {"name": "dynunet", "spatial_dims": dim, "filters": filters, "kernel_size": kernels,
           "strides": strides, "upsample_kernel_size": strides[1:], "deep_supervision": levels >= 3,
           "deep_supr_num": max(1, min(2, levels - 2)), "res_block": False}
    why = (f"median image at target spacing {rounded(median_shape, 1)} voxels; patch {patch} = {voxels} voxels, "
           f"multiples of {div} ({npool} poolings per axis, feature maps >= {MIN_FEATURE_MAP} voxels); "
           f"{device} {dim}D budget {budget} voxels per iteration "
           + (f"(shrunk along axes {sorted(shrunk)})" if shrunk else "(not reached: patch = median image)")
           + f"; batch {batch} = budget / patch, at most 5% of the {dataset_voxels:.3g} dataset voxels "
           f"({cap}), >= {MIN_BATCH}; filters {filters}: {BASE_FEATURES[device]} doubling, at most "
           f"{MAX_FEATURES[dim]}"
           + (" (16 on cpu: 32-wide cost 2.7x per sample, 0.0025 Dice less in 28.5 min)"
              if device == "cpu" else ""))
    return {"roi_size": patch, "pools_per_axis": npool, "batch_size": int(batch), "patch_voxels": voxels,
            "iteration_voxels_budget": budget, "network": net}, why
