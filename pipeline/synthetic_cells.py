"""Synthetic 2D studies and labels: microscopy-like touching cells (the ``cells2d`` kind of
``pipeline.synthetic.write_dataset``) and random ellipsoid labels for tests and benchmarks of the
boundary weight map."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from pipeline.phantoms import smooth_field


def cells_image(shape: Sequence[int], rng: np.random.Generator, fill: float = 0.45,
                touch_fraction: float = 0.35, gap_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2D microscopy-like image of many cells: (image float32, semantic uint8, instance uint16).
    A share of cells is placed against an earlier cell: touching it (``touch_fraction``) or separated
    by a 1-2 pixel gap (``gap_fraction``); the rest lie free. Cells have dim rims and a texture."""
    from skimage.draw import ellipse
    from skimage.segmentation import find_boundaries

    h, w = shape
    radius = min(h, w) / 16
    target = int(fill * h * w / (np.pi * radius**2) * rng.uniform(0.8, 1.2))
    instance = np.zeros(shape, dtype=np.uint16)
    ring = np.ones((3, 3), bool)  # 8-connected dilation: gaps count diagonals too
    k = 0
    for _ in range(20 * target):
        if k >= target:
            break
        a, b = radius * rng.uniform(0.75, 1.3), radius * rng.uniform(0.6, 1.0)
        mode = rng.choice(3, p=[touch_fraction, gap_fraction, 1 - touch_fraction - gap_fraction]) if k else 2
        if mode == 2:
            center = rng.uniform([a, a], [h - a, w - a])
        else:  # against a random earlier cell, overlapping its outline before clipping
            ys, xs = np.nonzero(instance == rng.integers(1, k + 1))
            cy, cx = ys.mean(), xs.mean()
            angle = rng.uniform(0, 2 * np.pi)
            reach = np.sqrt(len(ys) / np.pi)
            center = np.array([cy, cx]) + (reach + 0.7 * b) * np.array([np.sin(angle), np.cos(angle)])
        cell = np.zeros(shape, bool)
        cell[ellipse(center[0], center[1], a, b, shape=shape, rotation=rng.uniform(0, np.pi))] = True
        occupied = instance > 0
        if mode == 2:
            if (cell & ndimage.binary_dilation(occupied, ring, iterations=3)).any():
                continue
        else:
            gap = int(mode)  # 0 touching, 1 or 2 px
            gap += int(gap and rng.random() < 0.5)
            forbidden = ndimage.binary_dilation(occupied, ring, iterations=gap) if gap else occupied
            full = cell.sum()
            cell &= ~forbidden
            parts, count = ndimage.label(cell)
            if count == 0:
                continue
            cell = parts == 1 + np.argmax(ndimage.sum(cell, parts, range(1, count + 1)))
            if cell.sum() < 0.5 * full:
                continue
        k += 1
        instance[cell] = k
    semantic = (instance > 0).astype(np.uint8)

    rim = find_boundaries(instance, mode="inner")
    depth = ndimage.distance_transform_edt(~rim)
    level = np.concatenate([[0.0], rng.uniform(0.55, 0.95, k)]).astype(np.float32)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.5) * 0.25
    image = level[instance] * (1 - 0.4 * np.exp(-depth / 1.5)) * (1 + texture)
    image = np.where(semantic > 0, image, 0.1) + smooth_field(shape, rng, 0.05)
    image = ndimage.gaussian_filter(image, 0.7) + rng.normal(0, 0.03, shape)
    return image.astype(np.float32), semantic, instance


def random_blobs(shape: Sequence[int], n: int, rng: np.random.Generator, radius: tuple[float, float] = (1.5, 4.0),
                 classes: int = 2) -> np.ndarray:
    """A uint8 label of ``n`` random axis-aligned ellipsoids (radii drawn from ``radius``) of
    classes 1..``classes``, overlapping and touching at random: test and benchmark labels."""
    lab = np.zeros(tuple(shape), np.uint8)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    for _ in range(n):
        c, r = rng.uniform(0, shape), rng.uniform(*radius, len(shape))
        lab[sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r, strict=True)) <= 1] = rng.integers(1, classes + 1)
    return lab
