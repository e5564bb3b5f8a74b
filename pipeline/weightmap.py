"""The U-Net paper's boundary weight map (Ronneberger et al. 2015, eq. 2) as plain numpy/scipy.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

Objects are the connected components (full connectivity: 8 in 2D, 26 in 3D) of each foreground
class separately; d1 and d2 are the Euclidean distances, in physical units (``spacing``), from x
to the nearest and the second-nearest object (0 from an object that contains x, so inside object
A, d1 = 0 and d2 is the distance to the nearest other object).

Speed: beyond d1 + d2 >= R = sigma * sqrt(2 ln(w0 / 1e-4)) the border term is below 1e-4, so each
object's distance field is computed only on a crop: the boxes where it and a neighbour closer
than R can both be within R (per axis at most R/2 beyond the pair on its outer sides), plus the
part of the object within R of them; objects with no neighbour within R are skipped. A running
pair of smallest distances is kept per voxel. Where the border term matters the distances are
exact, elsewhere they can only come out larger, so the map differs from the direct computation
(one full ``distance_transform_edt`` per object, ``exact=True``) by less than 1e-4. The speed-up
grows with the array's size over R in voxels (see benchmarks/bench_weightmap.py).

Example::

    >>> lab = np.zeros((32, 32), np.uint8); lab[4:15, 4:30] = 1; lab[16:28, 4:30] = 1
    >>> w = boundary_weight_map(lab, spacing=(0.5, 0.5), w0=10, sigma=2, border_on="background")
    >>> round(float(w[15, 10]), 3)  # in the 1-voxel gap: d1 = d2 = 0.5, so 1 + 10 exp(-1/8)
    9.825
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage import measure

log = logging.getLogger(__name__)

#: the border term is dropped where it is below this (so the fast map is within it of the exact one)
NEGLIGIBLE = 1e-4


def check_label(label: np.ndarray, allow_empty: bool = False) -> np.ndarray:
    """Return ``label`` as a non-negative integer array, or raise ValueError naming the problem.

    A 2D or 3D array with no channel axis; floats are accepted only if every value is a whole
    number (MONAI loads labels as float32); a 3D array whose first axis has length 1 is taken as a
    channel axis and refused; all background is refused unless ``allow_empty``.
    """
    label = np.asarray(label)
    if label.ndim not in (2, 3):
        raise ValueError(f"label must be 2D or 3D with no channel axis, got shape {label.shape}")
    if label.ndim == 3 and label.shape[0] == 1:
        raise ValueError(f"label shape {label.shape} looks channel-first; pass label[0]")
    if label.dtype == bool:
        label = label.astype(np.uint8)
    elif np.issubdtype(label.dtype, np.floating):
        if not np.all(np.isfinite(label)) or np.any(label != np.round(label)):
            raise ValueError(f"label has non-integer values (dtype {label.dtype}): an image, or a label "
                             "resampled with an interpolating mode instead of 'nearest'?")
        label = label.astype(np.int64)
    elif not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label must hold integers, got dtype {label.dtype}")
    if label.size and label.min() < 0:
        raise ValueError(f"label has negative values (min {label.min()})")
    if not allow_empty and not label.any():
        raise ValueError("label is all background: no objects to weight")
    return label


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    s = np.asarray(spacing, dtype=np.float64).ravel()
    if s.size != ndim:
        raise ValueError(f"spacing {tuple(s)} has {s.size} values for a {ndim}D label")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing must be positive, got {tuple(s)}")
    return s


def iter_objects(label: np.ndarray) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """Yield ``(bounding box, mask within that box)`` for every object: each connected component,
    with full connectivity, of each foreground class separately (touching voxels of two classes
    belong to two objects)."""
    components = measure.label(label, background=0, connectivity=label.ndim)
    for index, box in enumerate(ndi.find_objects(components), start=1):
        if box is not None:
            yield box, components[box] == index


def cutoff_radius(w0: float, sigma: float) -> float:
    """Distance d1 + d2 beyond which ``w0 * exp(-(d1 + d2)**2 / (2 sigma**2))`` < NEGLIGIBLE."""
    return sigma * math.sqrt(2.0 * math.log(w0 / NEGLIGIBLE)) if w0 > NEGLIGIBLE else 0.0


def _grow(box: tuple[slice, ...], margin: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(b.start - m, 0), min(b.stop + m, n)) for b, m, n in zip(box, margin, shape, strict=True))


def _meet(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...] | None:
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b, strict=True))
    return out if all(s.start < s.stop for s in out) else None


def _hull(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(s.start for s in axis), max(s.stop for s in axis)) for axis in zip(*boxes, strict=True))


def _gap(a: tuple[slice, ...], b: tuple[slice, ...], spacing: np.ndarray) -> float:
    """A lower bound of the distance between any voxel of box a and any voxel of box b."""
    return math.hypot(*(max(0, y.start - x.stop + 1, x.start - y.stop + 1) * float(step)
                        for x, y, step in zip(a, b, spacing, strict=True)))


def _between(a: tuple[slice, ...], b: tuple[slice, ...], radius: float, spacing: np.ndarray,
             shape: Sequence[int]) -> tuple[slice, ...] | None:
    """A box holding every x with dist(x, box a) + dist(x, box b) < radius, or None if there is none.

    Per axis the 1D distances to the two intervals sum to less than the radius there, which bounds
    x to within radius/2 of the pair on their outer sides.
    """
    if _gap(a, b, spacing) >= radius:
        return None
    out = []
    for x, y, step, n in zip(a, b, spacing, shape, strict=True):
        reach = radius / step
        lo = math.ceil((x.start + y.start - reach) / 2)
        hi = math.floor((x.stop - 1 + y.stop - 1 + reach) / 2) + 1
        lo = max(lo, x.start - math.floor(reach), y.start - math.floor(reach), 0)
        hi = min(hi, x.stop + math.floor(reach), y.stop + math.floor(reach), n)
        if lo >= hi:
            return None
        out.append(slice(lo, hi))
    return tuple(out)


def _needed_crops(boxes: list[tuple[slice, ...]], spacing: np.ndarray, radius: float,
                  shape: Sequence[int]) -> list[tuple[slice, ...] | None]:
    """Per object, the box on which its distance must be exact, or None where it never matters.

    The border term exceeds NEGLIGIBLE only where d_k + d_j < radius for two objects k and j, so
    only for pairs closer than the radius and only in the box ``_between`` them. The crop holds
    those boxes and every part of object k within the radius of them; elsewhere the distance
    computed is larger than the true one (up to inf), which can only lower a border term that is
    negligible there anyway, so the map is within NEGLIGIBLE of the exact one.
    """
    margin = [math.floor(radius / s) for s in spacing]  # one voxel further is beyond the radius
    crops: list[tuple[slice, ...] | None] = []
    for k, box in enumerate(boxes):
        parts = [_between(box, other, radius, spacing, shape) for j, other in enumerate(boxes) if j != k]
        parts = [p for p in parts if p is not None]
        if not parts:
            crops.append(None)
            continue
        region = _hull(parts)
        reach = _meet(box, _grow(region, margin, shape))
        crops.append(_hull([region, reach]) if reach is not None else region)
    return crops


def _local(box: tuple[slice, ...], within: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(b.start - w.start, b.stop - w.start) for b, w in zip(box, within, strict=True))


def two_nearest(label: np.ndarray, spacing: np.ndarray, radius: float | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Distances to the nearest and second-nearest object per voxel (float32), and the number of objects.

    ``radius=None`` is the direct computation: one ``distance_transform_edt`` over the whole array
    per object. A number computes each object's distance only where a border term above
    NEGLIGIBLE can arise (see ``_needed_crops``) and leaves values too large (up to inf) elsewhere.
    """
    objects = list(iter_objects(label))
    if radius is None:
        crops: list[tuple[slice, ...] | None] = [tuple(slice(0, n) for n in label.shape)] * len(objects)
    else:
        crops = _needed_crops([box for box, _ in objects], spacing, radius, label.shape)
    d1 = np.full(label.shape, np.inf, dtype=np.float32)
    d2 = np.full(label.shape, np.inf, dtype=np.float32)
    for (box, mask), crop in zip(objects, crops, strict=True):
        if crop is None:
            continue
        outside = np.ones(tuple(c.stop - c.start for c in crop), dtype=bool)
        part = _meet(box, crop)
        if part is not None:
            outside[_local(part, crop)] &= ~mask[_local(part, box)]
        if radius is None:
            dist = ndi.distance_transform_edt(outside, sampling=spacing).astype(np.float32)
        else:
            dist = _edt32(outside, spacing)
        near, second = d1[crop], d2[crop]
        np.minimum(second, np.maximum(near, dist), out=second)
        np.minimum(near, dist, out=near)
    return d1, d2, len(objects)


def _edt32(outside: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """``distance_transform_edt`` in float32: from scipy's feature transform, without its float64
    temporaries (a third of its time on small crops)."""
    nearest = ndi.distance_transform_edt(outside, sampling=spacing, return_distances=False, return_indices=True)
    out = np.zeros(outside.shape, dtype=np.float32)
    for axis, (index, step) in enumerate(zip(nearest, spacing, strict=True)):
        position = np.arange(outside.shape[axis], dtype=np.int32).reshape((-1,) + (1,) * (outside.ndim - axis - 1))
        delta = np.multiply(index - position, np.float32(step), dtype=np.float32)
        out += delta * delta
    return np.sqrt(out, out=out)


def class_weight_map(label: np.ndarray, class_weights: str | Sequence[float] | None) -> np.ndarray:
    """w_c: ones (None), inverse class frequency with mean 1 over the array ("balanced"), or one
    weight per class value (a sequence indexed by the label value)."""
    if class_weights is None:
        return np.ones(label.shape, dtype=np.float32)
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(f"class_weights must be None, 'balanced' or a sequence, got {class_weights!r}")
        counts = np.bincount(label.ravel()).astype(np.float64)
        present = counts > 0
        table = np.zeros_like(counts)
        table[present] = label.size / (present.sum() * counts[present])
    else:
        table = np.asarray(class_weights, dtype=np.float64).ravel()
        if table.size <= label.max():
            raise ValueError(f"class_weights has {table.size} values but the label has class {label.max()}")
        if not np.all(np.isfinite(table)) or np.any(table < 0):
            raise ValueError(f"class_weights must be finite and non-negative, got {tuple(table)}")
    return table.astype(np.float32)[label]


def boundary_weight_map(
    label: np.ndarray,
    spacing: Sequence[float] | None = None,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: str | Sequence[float] | None = None,
    border_on: str = "all",
    exact: bool = False,
) -> np.ndarray:
    """The U-Net weight map of a 2D or 3D integer label array (no channel axis), float32, label's shape.

    Args:
        label: class index per voxel, 0 = background.
        spacing: voxel size per axis in physical units (default 1); ``sigma`` is in the same units.
        w0, sigma: height and width of the border term.
        class_weights: None (w_c = 1), "balanced" (inverse class frequency, mean 1 over the array)
            or one weight per class value.
        border_on: "all" adds the border term at every voxel (so organs touching organs are
            weighted too); "background" only where label == 0 (the paper's setting for cells).
        exact: compute each object's distance over the whole array (the direct method, slow);
            by default only within the cutoff radius, which changes the result by < 1e-4.

    Raises:
        ValueError: non-integer, negative, all-background or channel-first label; spacing of the
            wrong length or not positive; sigma <= 0; w0 < 0; an unknown border_on or class_weights.
    """
    label = check_label(label)
    spacing = _check_spacing(spacing, label.ndim)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if not w0 >= 0:
        raise ValueError(f"w0 must be >= 0, got {w0}")
    if border_on not in ("all", "background"):
        raise ValueError(f"border_on must be 'all' or 'background', got {border_on!r}")
    weights = class_weight_map(label, class_weights)
    radius = cutoff_radius(w0, sigma)
    if radius == 0.0 and not exact:
        return weights
    d1, d2, count = two_nearest(label, spacing, None if exact else radius)
    log.debug("weight map: %d objects, shape %s, spacing %s, cutoff %.3g", count, label.shape, spacing, radius)
    if count < 2:
        return weights
    total = d1 + d2
    border = np.exp(-(total * total) / np.float32(2.0 * sigma * sigma)) * np.float32(w0)
    if border_on == "background":
        border[label != 0] = 0.0
    weights += border
    return weights
