"""Test-time augmentation of one window batch: flips (every subset of the chosen axes), shifts of the
window's content (mirror-filled) and the swap of left/right classes after a left-right flip. The
predictor (``pipeline.inference.window_predictor``) averages the passes; ``grouped_calls`` runs
several passes of a small window batch in one network call."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F


def flip_combinations(spatial_dims: int, axes: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of an (N, C, *spatial) tensor: 8 in 3D, 4 in 2D; () first.
    ``axes`` (spatial axis numbers, 0-based) limits the flips to those axes, e.g. ``[0]`` for a
    model trained with left-right flips only: 2 passes."""
    chosen = range(spatial_dims) if axes is None else sorted({int(a) for a in axes})
    if any(not 0 <= a < spatial_dims for a in chosen):
        raise ValueError(f"tta_axes {list(axes or [])}: spatial axes are 0..{spatial_dims - 1}")
    dims = [a + 2 for a in chosen]
    return [c for k in range(len(dims) + 1) for c in itertools.combinations(dims, k)]


def shift_offsets(spatial_dims: int, shift: int) -> list[tuple[int, int]]:
    """(spatial axis, signed voxels) of every shifted pass of shift TTA: (0, 0) (no shift) first,
    then +``shift`` and -``shift`` along each axis: 7 passes in 3D, 5 in 2D, 1 for ``shift`` 0."""
    if shift < 0:
        raise ValueError(f"tta_shift {shift}: must be 0 or more voxels")
    return [(0, 0)] + [(a, s) for a in range(spatial_dims) for s in (shift, -shift) if shift]


def shift_window(x: torch.Tensor, axis: int, s: int) -> torch.Tensor:
    """``x`` (N, C, *spatial) with its content moved ``s`` voxels along spatial ``axis`` (towards
    higher indices for ``s`` > 0), the uncovered side mirror-filled: same shape as ``x``."""
    if s == 0:
        return x
    d, k, n = axis + 2, abs(s), x.shape[axis + 2]
    if k >= n:
        raise ValueError(f"tta_shift {k}: the window has only {n} voxels along axis {axis}")
    spec = [0] * (2 * (x.ndim - 2))
    spec[2 * (x.ndim - 3 - axis) + (0 if s > 0 else 1)] = k
    return F.pad(x, spec, mode="reflect").narrow(d, 0 if s > 0 else k, n)


def unshift_add(acc: torch.Tensor, count: torch.Tensor, p: torch.Tensor, axis: int, s: int) -> None:
    """Add ``p``, predicted on ``shift_window(x, axis, s)``, back into ``acc`` at the voxels it
    covers (all but the ``|s|`` moved out) and count them in ``count``."""
    d, k, n = axis + 2, abs(s), acc.shape[axis + 2]
    dst, src = (0, k) if s >= 0 else (k, 0)
    acc.narrow(d, dst, n - k).add_(p.narrow(d, src, n - k))
    count.narrow(d, dst, n - k).add_(1)


def swap_channels(p: torch.Tensor, pairs: Sequence[Sequence[int]]) -> torch.Tensor:
    """``p`` (N, K, *spatial) with the channels of each ``(a, b)`` pair exchanged."""
    order = list(range(p.shape[1]))
    for a, b in pairs:
        order[int(a)], order[int(b)] = int(b), int(a)
    return p[:, order]


def grouped_calls(fn: Callable[[torch.Tensor], torch.Tensor], inputs: Iterable[torch.Tensor],
                  per_call: int) -> Iterator[torch.Tensor]:
    """``fn(x)`` for each ``x`` of ``inputs`` (window batches of one size: the TTA passes of one
    batch), in order, computing ``per_call`` of them at a time as one concatenated batch. On a CPU
    one call of 4 windows costs less than 4 calls of 1 (BENCHMARKS.md); the windows do not
    interact (instance normalisation is per window), so each output is what its own call gives, up
    to float rounding."""
    group: list[torch.Tensor] = []
    for x in inputs:
        group.append(x)
        if len(group) == per_call:
            yield from _one_call(fn, group)
            group = []
    if group:
        yield from _one_call(fn, group)


def _one_call(fn: Callable[[torch.Tensor], torch.Tensor], group: list[torch.Tensor]) -> list[torch.Tensor]:
    if len(group) == 1:
        return [fn(group[0])]
    return list(fn(torch.cat(group)).split(group[0].shape[0]))
