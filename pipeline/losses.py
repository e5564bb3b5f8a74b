"""The U-Net paper's boundary-weighted cross-entropy plus soft Dice, usable inside monai.engines.

``SupervisedTrainer._iteration`` calls ``loss_function(pred, targets)`` with two arguments, so the
weight map travels in the target: :func:`prepare_batch_with_weight` returns
``(image, cat([label, weight], dim=1))`` and :class:`BoundaryWeightedDiceCELoss` splits target
channel 0 (label) from channel 1 (weight). A one-channel target means w = 1 everywhere, so the
same loss serves validation and data without weight maps::

    trainer = SupervisedTrainer(
        device=device, max_epochs=100, train_data_loader=loader, network=net, optimizer=opt,
        loss_function=BoundaryWeightedDiceCELoss(lambda_dice=1.0, lambda_ce=1.0),
        prepare_batch=prepare_batch_with_weight, amp=True,
    )

The trainer's ``engine.state.output["label"]`` then holds both channels (label, weight): a train
metric or post-transform must take channel 0 (``label[:1]`` per decollated sample, or
:func:`split_target` on the batch). The evaluator needs nothing: validation data has no weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines.utils import default_prepare_batch
from monai.losses import DiceLoss
from monai.utils import convert_to_tensor
from torch.nn.modules.loss import _Loss


def split_target(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(label B×1×spatial, weight B×1×spatial or None)`` from a B×1 or B×2 target."""
    if target.shape[1] == 1:
        return target, None
    if target.shape[1] == 2:
        return target[:, :1], target[:, 1:]
    raise ValueError(f"target must have 1 channel (label) or 2 (label, weight), got shape {tuple(target.shape)}")


def prepare_batch_with_weight(
    batchdata: Mapping[str, Any] | torch.Tensor | Sequence[torch.Tensor],
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    *,
    image_key: str = "image",
    label_key: str = "label",
    weight_key: str = "weight",
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``prepare_batch`` for monai.engines that puts the weight map in the target's second channel.

    Same signature and behaviour as ``monai.engines.utils.default_prepare_batch`` (which it calls
    for anything but a dictionary with a weight), plus keyword-only key names.

    Args:
        batchdata: a collated dictionary with ``image`` B×C×spatial, ``label`` B×1×spatial and,
            optionally, ``weight`` B×1×spatial (from :class:`pipeline.transforms.BoundaryWeightMapd`).
        device, non_blocking, kwargs: passed to ``Tensor.to`` as by the default.

    Returns:
        ``(image, target)``: without a weight, as ``default_prepare_batch``; with one, image is a
        plain tensor (no MetaTensor) and target a plain float32 tensor ``torch.cat([label, weight],
        dim=1)`` of shape B×2×spatial.

    Raises:
        ValueError: the weight's shape differs from the label's.
    """
    if not isinstance(batchdata, Mapping) or batchdata.get(weight_key) is None:
        if isinstance(batchdata, Mapping) and (image_key, label_key) != ("image", "label"):
            batchdata = {"image": batchdata[image_key], "label": batchdata.get(label_key)}
        return default_prepare_batch(batchdata, device, non_blocking, **kwargs)  # type: ignore[return-value]
    label, weight = batchdata[label_key], batchdata[weight_key]
    if label.shape != weight.shape or label.shape[1] != 1:
        raise ValueError(f"{label_key!r} {tuple(label.shape)} and {weight_key!r} {tuple(weight.shape)} "
                         "must both be B×1×spatial")
    target = torch.cat([convert_to_tensor(label, dtype=torch.float32, track_meta=False),
                        convert_to_tensor(weight, dtype=torch.float32, track_meta=False)], dim=1)
    # plain tensors: MetaTensor's per-op bookkeeping costs ~8% of a small 3D training step on CPU
    image = convert_to_tensor(batchdata[image_key], track_meta=False)
    return (image.to(device=device, non_blocking=non_blocking, **kwargs),
            target.to(device=device, non_blocking=non_blocking, **kwargs))


class BoundaryWeightedDiceCELoss(_Loss):
    """``lambda_dice * soft Dice + lambda_ce * boundary-weighted cross-entropy`` for softmax outputs.

    Cross-entropy is reduced as the weighted mean over all voxels of the batch,
    ``sum(w * ce) / sum(w)``; with w = 1 everywhere this is the plain mean, so the loss equals
    ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True, include_background=...)``.
    Dice is ``monai.losses.DiceLoss(softmax=True, to_onehot_y=True)``, mean over batch and classes.
    Both are computed in float32 (float64 stays float64) with autocast off, so the loss is safe
    under CUDA fp16 and CPU bf16 autocast.

    Args:
        lambda_dice, lambda_ce: weights of the two terms (>= 0).
        include_background: whether Dice includes channel 0 (cross-entropy always does).
        smooth_nr, smooth_dr, batch, squared_pred, jaccard: passed to ``DiceLoss``.
        deep_supervision_weights: weights of the output levels (full resolution first) for deep
            supervision; default 1, 1/2, 1/4, ... Normalised to sum 1.

    Shapes of ``forward(input, target)``:
        input: logits B×C×spatial (2D or 3D, C >= 2); or, for deep supervision, a list/tuple of
            such tensors (smaller ones get the target resized by nearest neighbour) or a stacked
            B×S×C×spatial tensor (DynUNet with ``deep_supervision=True``).
        target: B×1×spatial label, or B×2×spatial label and weight map (see
            :func:`prepare_batch_with_weight`).
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, include_background: bool = True,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch: bool = False,
                 squared_pred: bool = False, jaccard: bool = False,
                 deep_supervision_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0:
            raise ValueError(f"lambda_dice and lambda_ce must be >= 0, got {lambda_dice}, {lambda_ce}")
        self.lambda_dice, self.lambda_ce = float(lambda_dice), float(lambda_ce)
        self.dice = DiceLoss(include_background=include_background, to_onehot_y=True, softmax=True,
                             squared_pred=squared_pred, jaccard=jaccard, smooth_nr=smooth_nr,
                             smooth_dr=smooth_dr, batch=batch)
        self.deep_supervision_weights = deep_supervision_weights

    def forward(self, input: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.Tensor) and input.dim() == target.dim():
            return self._one_level(input, target)
        if isinstance(input, torch.Tensor) and input.dim() == target.dim() + 1:
            input = input.unbind(dim=1)
        if not isinstance(input, (list, tuple)):
            raise ValueError(f"input must be B×C×spatial, B×S×C×spatial or a list; got shape "
                             f"{tuple(input.shape)} for target {tuple(target.shape)}")
        levels = list(self.deep_supervision_weights or [0.5**i for i in range(len(input))])
        if len(levels) != len(input) or sum(levels) <= 0:
            raise ValueError(f"{len(input)} deep supervision outputs need as many weights with a positive sum, "
                             f"got {levels}")
        terms = [weight * self._one_level(head, _resized(target, head.shape[2:]))
                 for head, weight in zip(input, levels, strict=True) if weight]
        return torch.stack(terms).sum() / sum(levels)

    def _one_level(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.dim() not in (4, 5) or input.shape[1] < 2:
            raise ValueError(f"input must be B×C×H×W[×D] logits with C >= 2, got shape {tuple(input.shape)}")
        if target.shape[0] != input.shape[0] or target.shape[2:] != input.shape[2:]:
            raise ValueError(f"target {tuple(target.shape)} does not match input {tuple(input.shape)}")
        label, weight = split_target(convert_to_tensor(target, track_meta=False))
        dtype = torch.promote_types(input.dtype, torch.float32)
        with torch.autocast(device_type=input.device.type, enabled=False):
            logits = input.to(dtype)
            dice = self.dice(logits, label) if self.lambda_dice else logits.new_zeros(())
            ce = F.cross_entropy(logits, label[:, 0].long(), reduction="none")
            if weight is None:
                ce = ce.mean()
            else:
                w = weight[:, 0].to(dtype)
                ce = (w * ce).sum() / w.sum().clamp_min(torch.finfo(dtype).tiny)
        return self.lambda_dice * dice + self.lambda_ce * ce


def _resized(target: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """The target (label, weight) at a deep-supervision output's size, by nearest neighbour."""
    return target if target.shape[2:] == size else F.interpolate(target.float(), size=size, mode="nearest")
