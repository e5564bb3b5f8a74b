"""2D/3D U-Net builders on MONAI's own networks; bundles name one with ``build_network``.

- ``unet``: the classic U-Net of Ronneberger et al. (2015): per level two 3x3 convolutions, each
  followed by a norm and ReLU; 2x max-pool down; 2x transposed convolution up; skip
  concatenation; 1x1 head. MONAI's ``BasicUNet`` is exactly this (``Down`` = max-pool + two
  convs, ``UpCat`` = transposed conv + concat + two convs) with a fixed depth of 4; other depths
  are assembled here from the same MONAI blocks, so both give identical layers.
- ``resunet``: MONAI ``UNet`` with residual units (strided convolutions instead of pooling).
- ``dynunet``: MONAI ``DynUNet`` (nnU-Net style) with optional deep supervision; in training mode
  its output is ``[B, 1 + deep_supr_num, C, *spatial]``, which
  ``pipeline.losses.BoundaryWeightedDiceCELoss`` takes as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.networks.layers import Conv
from monai.networks.nets import BasicUNet, DynUNet, UNet
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn

from pipeline.errors import UsageError

log = logging.getLogger(__name__)

CLASSIC_ACT: Any = ("relu", {"inplace": True})
CLASSIC_NORM: Any = ("instance", {"affine": True})


class _ClassicUNet(nn.Module):
    """BasicUNet's layout at any depth: ``features[0..depth]`` encoder widths, ``features[-1]``
    the width after the last up-sampling (BasicUNet's sixth number)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: Sequence[int],
                 act: Any, norm: Any, bias: bool, dropout: float, upsample: str) -> None:
        super().__init__()
        enc, top = list(features[:-1]), features[-1]
        args = (act, norm, bias, dropout)
        self.stem = TwoConv(spatial_dims, in_channels, enc[0], *args)
        self.downs = nn.ModuleList(Down(spatial_dims, a, b, *args) for a, b in zip(enc[:-1], enc[1:], strict=True))
        ups = [UpCat(spatial_dims, enc[i + 1], enc[i], enc[i], *args, upsample) for i in range(len(enc) - 2, 0, -1)]
        ups.append(UpCat(spatial_dims, enc[1], enc[0], top, *args, upsample, halves=False))
        self.ups = nn.ModuleList(ups)
        self.head = Conv["conv", spatial_dims](top, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)


def classic_unet(spatial_dims: int, in_channels: int, out_channels: int,
                 features: Sequence[int] = (32, 32, 64, 128, 256, 32), act: Any = CLASSIC_ACT,
                 norm: Any = CLASSIC_NORM, bias: bool = True, dropout: float = 0.0,
                 upsample: str = "deconv") -> nn.Module:
    """The classic U-Net; ``len(features) - 2`` pooling steps (BasicUNet itself for 4)."""
    if len(features) < 3:
        raise UsageError(f"unet features {list(features)}: need at least 3 numbers (depth >= 1)")
    if len(features) == 6:
        return BasicUNet(spatial_dims, in_channels, out_channels, features, act, norm, bias, dropout, upsample)
    return _ClassicUNet(spatial_dims, in_channels, out_channels, features, act, norm, bias, dropout, upsample)


def residual_unet(spatial_dims: int, in_channels: int, out_channels: int,
                  channels: Sequence[int] = (16, 32, 64, 128, 256), num_res_units: int = 2,
                  norm: Any = "instance", **kwargs: Any) -> nn.Module:
    """MONAI ``UNet`` with residual units; one stride-2 step between consecutive ``channels``."""
    strides = kwargs.pop("strides", [2] * (len(channels) - 1))
    return UNet(spatial_dims, in_channels, out_channels, channels=channels, strides=strides,
                num_res_units=num_res_units, norm=norm, **kwargs)


def dyn_unet(spatial_dims: int, in_channels: int, out_channels: int,
             filters: Sequence[int] = (32, 64, 128, 256, 320), deep_supervision: bool = True,
             deep_supr_num: int = 2, **kwargs: Any) -> nn.Module:
    """MONAI ``DynUNet``: 3x3 kernels and stride 2 per level unless ``kernel_size``/``strides`` given."""
    levels = len(filters)
    kernel_size = kwargs.pop("kernel_size", [[3] * spatial_dims] * levels)
    strides = kwargs.pop("strides", [[1] * spatial_dims] + [[2] * spatial_dims] * (levels - 1))
    return DynUNet(spatial_dims, in_channels, out_channels, kernel_size=kernel_size, strides=strides,
                   upsample_kernel_size=kwargs.pop("upsample_kernel_size", strides[1:]), filters=filters,
                   deep_supervision=deep_supervision, deep_supr_num=deep_supr_num, res_block=kwargs.pop("res_block", True),
                   **kwargs)


NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "unet": classic_unet,
    "resunet": residual_unet,
    "dynunet": dyn_unet,
}


def build_network(name: str, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    """Build network ``name`` (one of ``NETWORKS``); ``kwargs`` go to its builder."""
    if name not in NETWORKS:
        raise UsageError(f"network {name!r}: unknown; choose one of {', '.join(NETWORKS)}")
    if spatial_dims not in (2, 3):
        raise UsageError(f"network {name!r}: spatial_dims must be 2 or 3, got {spatial_dims}")
    net = NETWORKS[name](spatial_dims, in_channels, out_channels, **kwargs)
    log.debug("built %s (%dD, %d -> %d channels, %d parameters)", name, spatial_dims, in_channels,
              out_channels, count_parameters(net))
    return net


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)

