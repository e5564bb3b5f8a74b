"""A 2D network on 3D volumes, slice by slice, with the overlap-tile predictor's TTA and margin.

``segpipe plan`` gives a 2D network to 3D data too anisotropic for a 3D one (few slices along a
coarse axis). Its bundles validate and predict with ``SliceTileInferer``: the volume's slices
along ``slice_axis`` become a batch of 2D images that ``pipeline.inference.predict_tiles`` runs
(mirror margin, flip TTA along the plane's axes, Gaussian-blended windows), and the results are
stacked back along that axis. MONAI's ``SliceInferer`` does the same with a plain sliding window,
without mirroring or TTA. ``chunk`` slices go through at a time, which bounds the memory of the
window bookkeeping for long volumes.

    >>> inferer = SliceTileInferer(slice_axis=2, roi_size=(128, 128), tta=True)  # doctest: +SKIP
    >>> probs = inferer(volume[None], network)  # (1, C, X, Y, Z) -> (1, K, X, Y, Z)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor

from pipeline.inference import OverlapTileInferer, predict_tiles


class SliceTileInferer(OverlapTileInferer):
    """``OverlapTileInferer`` for a 2D network on (N, C, *3D) volumes, slice by slice along
    ``slice_axis`` (0-2, a spatial axis); ``roi_size`` and ``tta_axes`` are those of the 2D slice
    (the two other spatial axes, in order), and so is ``lateral_axis``: by default 0 (RAS axis 0,
    the patient's left-right, is the slice's first axis) unless the slices run across it
    (``slice_axis`` 0: None, no in-plane flip is a left-right one and ``lateral_pairs`` never
    swap). Other arguments: ``OverlapTileInferer``."""

    def __init__(self, slice_axis: int, roi_size: Sequence[int] | int, chunk: int = 32, **kwargs: Any) -> None:
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis {slice_axis}: a spatial axis of a 3D volume, 0, 1 or 2")
        kwargs.setdefault("lateral_axis", None if slice_axis == 0 else 0)
        super().__init__(roi_size=roi_size, **kwargs)
        self.slice_axis, self.chunk = int(slice_axis), max(1, int(chunk))

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        if inputs.ndim != 5:
            raise ValueError(f"SliceTileInferer takes (N, C, X, Y, Z) volumes, got shape {tuple(inputs.shape)}")
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        axis = 2 + self.slice_axis
        slices = x.movedim(axis, 1)  # (N, S, C, a, b)
        n, s = slices.shape[:2]
        flat = slices.reshape(n * s, *slices.shape[2:])
        options = {**self.kwargs, **kwargs}
        parts = [predict_tiles(network, flat[i:i + self.chunk], **options) for i in range(0, n * s, self.chunk)]
        out = torch.cat(parts).reshape(n, s, -1, *flat.shape[2:]).movedim(1, axis)
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return out
