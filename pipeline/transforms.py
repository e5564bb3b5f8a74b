"""Thin MONAI transforms for what MONAI lacks: the U-Net boundary weight map, and left-right flips
that swap lateral labels (a flipped left parotid is a right parotid).

The logic is one function, :func:`weight_map_like`; ``BoundaryWeightMap`` (array) and
``BoundaryWeightMapd`` (dictionary) wrap it, MONAI's pattern.

Place ``BoundaryWeightMapd`` among the deterministic transforms, after ``Spacingd`` (the spacing
is read from the label's affine, so it must be the spacing the network sees) and before the first
random transform, so ``CacheDataset``/``PersistentDataset`` compute it once per case. Every random
spatial transform after it must list the weight key too, or the map no longer lines up with the
label::

    Compose([
        LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"]),
        Orientationd(keys=["image", "label"], axcodes="RAS"),
        Spacingd(keys=["image", "label"], pixdim=(1.6, 1.6, 2.5), mode=("bilinear", "nearest")),
        BoundaryWeightMapd(keys="label", weight_key="weight", w0=10.0, sigma=5.0),  # cached up to here
        RandCropByPosNegLabeld(keys=["image", "label", "weight"], label_key="label",
                               spatial_size=(48, 48, 32), num_samples=2),
        RandFlipd(keys=["image", "label", "weight"], prob=0.5, spatial_axis=0),
        RandAffined(keys=["image", "label", "weight"], prob=0.2, rotate_range=0.2,
                    mode=("bilinear", "nearest", "bilinear")),
    ])

The weight map may be interpolated bilinearly or by nearest neighbour; both are fine. In training,
:func:`pipeline.losses.prepare_batch_with_weight` hands the map to the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandFlipd, RandomizableTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_numpy, ensure_tuple_rep

from pipeline.laterality import lateral_pairs  # noqa: F401 - the pairs a lateral flip swaps, by name
from pipeline.weightmap import boundary_weight_map, check_label, class_weight_map

log = logging.getLogger(__name__)


def weight_map_like(
    label: torch.Tensor | np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: str | Sequence[float] | None = None,
    border_on: str = "all",
) -> torch.Tensor | np.ndarray:
    """The boundary weight map of a channel-first label (1, *spatial), same type, shape and meta.

    The spacing is the label's ``MetaTensor.pixdim`` (from its affine, so after ``Spacingd`` it is
    the resampled spacing); a plain tensor or array is taken to have unit spacing. The result is
    float32, and a MetaTensor carries a copy of the label's meta (affine, filename...) and applied
    operations. A label with no foreground (a negative case) gets the class weights alone (ones by
    default) rather than :func:`boundary_weight_map`'s ValueError, so such cases can still train.

    Raises:
        ValueError: more than one channel, or what :func:`boundary_weight_map` refuses.
    """
    if label.ndim not in (3, 4) or label.shape[0] != 1:
        raise ValueError(f"label must be channel-first with one channel, (1, *spatial), got shape {tuple(label.shape)}")
    spacing = [float(s) for s in label.pixdim[: label.ndim - 1]] if isinstance(label, MetaTensor) else None
    array = convert_to_numpy(label[0])
    if array.ndim == 3 and array.shape[0] == 1:  # one-slice volume: its 2D map, not a channel axis
        array, spacing = array[0], spacing and spacing[1:]
    if np.issubdtype(array.dtype, np.number) and not array.any():
        log.debug("weight map of an all-background label (%s): class weights only",
                  getattr(label, "meta", {}).get("filename_or_obj", "array"))
        weights = class_weight_map(check_label(array, allow_empty=True), class_weights)
    else:
        weights = boundary_weight_map(array, spacing, w0=w0, sigma=sigma, class_weights=class_weights,
                                      border_on=border_on)
    dtype = torch.float32 if isinstance(label, torch.Tensor) else np.float32
    out, *_ = convert_to_dst_type(weights.reshape(label.shape), label, dtype=dtype)
    return out


class BoundaryWeightMap(Transform):
    """Array transform: ``label (1, *spatial) -> weight map (1, *spatial)``; see :func:`weight_map_like`.

    Example::

        BoundaryWeightMap(w0=10.0, sigma=5.0)(label)  # label a MetaTensor after Spacing
    """

    def __init__(self, w0: float = 10.0, sigma: float = 5.0, class_weights: str | Sequence[float] | None = None,
                 border_on: str = "all") -> None:
        self.kwargs: dict[str, Any] = {"w0": w0, "sigma": sigma, "class_weights": class_weights,
                                       "border_on": border_on}

    def __call__(self, label: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        return weight_map_like(label, **self.kwargs)


class BoundaryWeightMapd(MapTransform):
    """Dictionary transform: add the boundary weight map of ``data[key]`` as ``data[weight_key]``.

    Args:
        keys: the label key(s).
        weight_key: output key(s), one per label key.
        w0, sigma, class_weights, border_on: see :func:`pipeline.weightmap.boundary_weight_map`;
            ``sigma`` is in the units of the label's affine (mm).
        allow_missing_keys: skip label keys not in the sample.

    Deterministic, so cacheable; see this module's docstring for where it goes in a Compose.
    """

    def __init__(self, keys: KeysCollection = "label", weight_key: str | Sequence[str] = "weight",
                 w0: float = 10.0, sigma: float = 5.0, class_weights: str | Sequence[float] | None = None,
                 border_on: str = "all", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.weight_keys = ensure_tuple_rep(weight_key, len(self.keys))
        self.converter = BoundaryWeightMap(w0=w0, sigma=sigma, class_weights=class_weights, border_on=border_on)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, weight_key in self.key_iterator(d, self.weight_keys):
            d[weight_key] = self.converter(d[key])
        return d


# -- lateral labels (which pairs: pipeline.laterality) ----------------------------------------------
def swap_labels(label: torch.Tensor | np.ndarray, pairs: Sequence[Sequence[int]]) -> torch.Tensor | np.ndarray:
    """``label`` with the values of each ``(a, b)`` pair exchanged (a copy)."""
    out = label.clone() if isinstance(label, torch.Tensor) else np.array(label, copy=True)
    for a, b in pairs:
        out[label == a], out[label == b] = b, a
    return out


class RandLateralFlipd(RandomizableTransform, MapTransform):
    """Dictionary transform: with probability ``prob`` flip every key along ``spatial_axis`` (the
    patient's left-right axis: 0 after ``Orientationd(axcodes="RAS")``) and swap the ``pairs`` of
    lateral labels in ``label_keys``, so a flipped left organ keeps being called what it now is.
    For training augmentation (not recorded for inversion). With no pairs it is a plain flip.

    Example::

        RandLateralFlipd(["image", "label", "weight"], pairs=lateral_pairs(names), prob=0.5)
    """

    def __init__(self, keys: KeysCollection, pairs: Sequence[Sequence[int]] = (), label_keys: KeysCollection = "label",
                 prob: float = 0.5, spatial_axis: int = 0, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.pairs = [tuple(int(v) for v in p) for p in pairs]
        self.label_keys = set(ensure_tuple_rep(label_keys, 1) if isinstance(label_keys, str) else label_keys)
        self.spatial_axis = int(spatial_axis)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            flipped = torch.flip(torch.as_tensor(d[key]), dims=[self.spatial_axis + 1])
            if key in self.label_keys and self.pairs:
                flipped = swap_labels(flipped, self.pairs)
            d[key] = flipped if isinstance(d[key], torch.Tensor) else flipped.numpy()
        return d


def flip_transforms(keys: KeysCollection, axes: Sequence[int], prob: float = 0.5, lateral_axis: int | None = None,
                    pairs: Sequence[Sequence[int]] = (), label_keys: KeysCollection = "label") -> list[MapTransform]:
    """One random flip per spatial axis in ``axes``: ``RandFlipd``, except along ``lateral_axis``
    (the patient's left-right axis) when there are lateral ``pairs``, where ``RandLateralFlipd``
    flips and swaps them. Planned bundles build their flips with it (``train.json``
    ``flip_transforms``), so ``--set flip_axes=[1,2]`` still removes the left-right flip.

    >>> [type(t).__name__ for t in flip_transforms(["image", "label"], [0, 1], 0.5, 0, [(3, 4)])]
    ['RandLateralFlipd', 'RandFlipd']
    """
    out: list[MapTransform] = []
    for a in axes:
        if lateral_axis is not None and int(a) == int(lateral_axis) and pairs:
            out.append(RandLateralFlipd(keys, pairs=pairs, label_keys=label_keys, prob=prob, spatial_axis=int(a)))
        else:
            out.append(RandFlipd(keys=keys, prob=prob, spatial_axis=int(a)))
    return out
