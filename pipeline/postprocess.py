"""Optional per-label clean-up of a predicted label map, with MONAI's transforms.

The bundle's ``postprocess`` id names the labels: ``{"keep_largest": [1, 3], "fill_holes": [1]}``
keeps only the largest connected component of labels 1 and 3 and fills the holes of label 1.
Empty lists (the default) change nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import Compose, FillHoles, KeepLargestConnectedComponent


def label_cleanup(options: Mapping[str, Sequence[int]] | None) -> Callable[[Any], Any]:
    """A callable on a (1, *spatial) label map applying ``options`` (see the module docstring);
    the identity when no labels are named. Unknown option names are a ValueError (typos)."""
    options = dict(options or {})
    unknown = set(options) - {"keep_largest", "fill_holes"}
    if unknown:
        raise ValueError(f"postprocess: unknown option(s) {sorted(unknown)}; use keep_largest, fill_holes")
    steps: list[Callable] = []
    if options.get("keep_largest"):
        steps.append(KeepLargestConnectedComponent(applied_labels=list(options["keep_largest"]),
                                                   is_onehot=False, independent=True))
    if options.get("fill_holes"):
        steps.append(FillHoles(applied_labels=list(options["fill_holes"])))
    return Compose(steps) if steps else (lambda x: x)


def label_volumes(labels: torch.Tensor | Any, names: Sequence[str], voxel_ml: float) -> dict[str, float | int]:
    """``voxels_<name>`` and ``ml_<name>`` for every label but background (index 0)."""
    flat = torch.as_tensor(labels).reshape(-1)
    flat = flat if flat.dtype == torch.uint8 else flat.long()  # no int64 copy of a uint8 mask
    counts = torch.bincount(flat, minlength=len(names))
    out: dict[str, float | int] = {}
    for i, name in enumerate(names):
        if i == 0:
            continue
        out[f"voxels_{name}"] = int(counts[i])
        out[f"ml_{name}"] = round(int(counts[i]) * voxel_ml, 3)
    return out
