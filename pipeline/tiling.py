"""Overlap-tile windows (Ronneberger et al. 2015, Fig. 2): each window keeps only its centre.

The volume is cut, along every axis, into ``n`` consecutive *kept* intervals that cover it exactly;
each is predicted by one window that extends at least ``margin`` voxels beyond it on both sides.
Between tiles that context is the neighbouring image; at the volume's border it is mirror padding
(``pipeline.inference.mirror_pad``). Nothing is blended: every voxel's output comes from exactly
one window, the one in which it is at least ``margin`` voxels from every face.

Cost: a window of ``w`` voxels keeps about ``w - 2 * margin`` of them, so an axis costs
``w / (w - 2 * margin)`` network voxels per voxel (1.5 for a margin of a sixth of the window:
3.4 in 3D), where MONAI's Gaussian blending at overlap 0.5 costs about 2 per axis (8 in 3D).

Window size: at least the training patch ``roi``, at most ``window`` (which may be larger than the
patch where the network allows it and memory fits), a multiple of ``multiple`` (what the network's
poolings need: 2**levels) unless that passes ``window``. Per axis the tile count ``n`` and window
length are chosen to compute the fewest voxels (``n * w``), so a volume a little larger than a
window is cut into windows shrunk to fit, not into one full window and one mostly wasted one.

    >>> axis_tiles(100, roi=48, window=96, margin=8, multiple=16)  # two 80-voxel windows, not 96
    (80, [(-15, 0, 50, 65), (35, 50, 100, 115)])
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

#: one axis's tiles: (window start, kept start, kept stop, window stop), in volume coordinates
Tile = tuple[int, int, int, int]


def _round_up(n: int, q: int) -> int:
    return -(-n // q) * q


def axis_tiles(size: int, roi: int, window: int, margin: int, multiple: int = 1) -> tuple[int, list[Tile]]:
    """The window length and the tiles along one axis of ``size`` voxels (see the module docstring).
    Kept intervals are as even as possible; each window is centred on its kept interval, so it has
    at least ``margin`` voxels of context on each side (mirror padding before 0 and after ``size``)."""
    window = max(int(window), int(roi))
    if size < 1 or roi < 1 or margin < 0 or multiple < 1:
        raise ValueError(f"tiling: size {size}, roi {roi}, margin {margin}, multiple {multiple}: "
                         "need size, roi, multiple >= 1 and margin >= 0")
    if window - 2 * margin < 1:
        raise ValueError(f"tiling: a margin of {margin} voxels per side leaves nothing of a {window}-voxel window")
    best: tuple[int, int, int] | None = None  # (cost, n, w)
    for n in range(math.ceil(size / (window - 2 * margin)), size + 1):
        w = min(window, max(roi, _round_up(math.ceil(size / n) + 2 * margin, multiple)))
        if best is None or n * w < best[0]:
            best = (n * w, n, w)
        if w == roi:  # more tiles only add windows of the same size
            break
    assert best is not None
    _, n, w = best
    bounds = [i * size // n for i in range(n + 1)]
    tiles = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        start = lo - (w - (hi - lo)) // 2
        tiles.append((start, lo, hi, start + w))
    return w, tiles


def tile_plan(shape: Sequence[int], roi: Sequence[int], window: Sequence[int], margin: Sequence[int],
              multiple: Sequence[int]) -> tuple[tuple[int, ...], list[list[Tile]]]:
    """``axis_tiles`` for every spatial axis: the window shape and each axis's tiles."""
    per_axis = [axis_tiles(int(n), int(r), int(w), int(m), int(q))
                for n, r, w, m, q in zip(shape, roi, window, margin, multiple, strict=True)]
    return tuple(w for w, _ in per_axis), [t for _, t in per_axis]


def plan_padding(shape: Sequence[int], tiles: Sequence[Sequence[Tile]]) -> list[tuple[int, int]]:
    """(before, after) mirror padding per axis that every window of ``tiles`` needs."""
    return [(max(0, -t[0][0]), max(0, t[-1][3] - n)) for n, t in zip(shape, tiles, strict=True)]


def overlap_tile(predictor: Callable[[torch.Tensor], torch.Tensor], padded: torch.Tensor,
                 shape: Sequence[int], tiles: Sequence[Sequence[Tile]], pads: Sequence[tuple[int, int]],
                 batch_size: int, run_device: torch.device, out_device: torch.device) -> torch.Tensor:
    """Run ``predictor`` on every window of ``tiles`` over ``padded`` (N, C, *spatial: the volume of
    ``shape`` mirror-padded by ``pads``), ``batch_size`` windows per call, and write each window's
    kept centre into a (N, K, *shape) float32 tensor on ``out_device``."""
    n_images = padded.shape[0]
    boxes = list(itertools.product(*tiles))
    jobs = [(b, box) for b in range(n_images) for box in boxes]
    log.debug("overlap-tile: %d windows of %s for %d image(s) of %s", len(boxes),
              tuple(t[0][3] - t[0][0] for t in tiles), n_images, tuple(shape))
    out: torch.Tensor | None = None
    for i in range(0, len(jobs), max(1, int(batch_size))):
        chunk = jobs[i:i + max(1, int(batch_size))]
        windows = torch.cat([padded[(slice(b, b + 1), slice(None),
                                     *(slice(t[0] + p[0], t[3] + p[0]) for t, p in zip(box, pads, strict=True)))]
                             for b, box in chunk]).to(run_device)
        y = predictor(windows)
        if out is None:
            out = torch.empty((n_images, y.shape[1], *shape), dtype=torch.float32, device=out_device)
        y = y.to(out_device)
        for j, (b, box) in enumerate(chunk):
            kept = tuple(slice(t[1], t[2]) for t in box)
            in_window = tuple(slice(t[1] - t[0], t[2] - t[0]) for t in box)
            out[(b, slice(None), *kept)] = y[(j, slice(None), *in_window)]
    assert out is not None
    return out
