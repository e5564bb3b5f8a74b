"""Phantom drawing for the synthetic studies (``pipeline.synthetic`` writes them as datasets): CT and
MR abdominal phantoms (3D) and the geometry the other generators share.

Random parameters are drawn apart from the deterministic drawing, as in TorchIO: ``draw_anatomy``
picks organ sizes, positions and rotations; ``anatomy_maps`` turns them into a tissue map and a
label map for any shape; ``ct_phantom`` / ``mr_phantom`` / ``mr2ch_phantom`` add intensities, bias,
blur and noise. Their geometry is in normalised voxel coordinates (-1..1 per axis), so everything
scales with the shape (a 77 mm phantom at the default 96x96x32, 0.8x0.8x2.5 mm).

Example::

    >>> import numpy as np
    >>> image, label = ct_phantom((32, 32, 12), np.random.default_rng(0))
    >>> image.dtype, label.dtype, sorted(np.unique(label).tolist())
    (dtype('int16'), dtype('uint8'), [0, 1, 2, 3])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

CT_SPACING = (0.8, 0.8, 2.5)
CT_ORIGIN = (120.0, 95.0, -300.0)
CELL_SPACING = (0.5, 0.5)
CELL_ORIGIN = (32.0, 32.0)

# tissue codes of ``anatomy_maps`` and ``cohort_maps``; organs map to labels 1..3 (cohort: 1..4)
AIR, FAT, SOFT, BONE, LIVER, KIDNEY, SPLEEN, KIDNEY_L, DISC, MUSCLE = range(10)
ORGAN_LABEL = {LIVER: 1, KIDNEY: 2, SPLEEN: 3}


def lps_affine(spacing: Sequence[float] = CT_SPACING, origin: Sequence[float] = CT_ORIGIN) -> np.ndarray:
    """4x4 voxel-to-world (RAS mm) affine of a DICOM-derived volume stored in LPS voxel order:
    ``diag(-sx, -sy, sz)`` plus ``origin``. 2D spacings/origins get a 1 mm third axis at z=0."""
    sp = list(spacing) + [1.0] * (3 - len(spacing))
    org = list(origin) + [0.0] * (3 - len(origin))
    aff = np.diag([-sp[0], -sp[1], sp[2], 1.0])
    aff[:3, 3] = org
    return aff


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix from angles (degrees) about axes 0, 1, 2, applied in that order."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _grid(shape: Sequence[int]) -> list[np.ndarray]:
    """Normalised voxel-centre coordinates in (-1, 1) per axis, broadcastable (sparse)."""
    return np.meshgrid(*[(np.arange(s) + 0.5) / s * 2 - 1 for s in shape], indexing="ij", sparse=True)


def ellipsoid_mask(shape: Sequence[int], center: Sequence[float], semi_axes: Sequence[float],
                   angles_deg: Sequence[float] = (0, 0, 0)) -> np.ndarray:
    """Boolean mask of a rotated ellipsoid given in normalised coordinates."""
    rot = rotation_matrix(angles_deg)
    d = [g - c for g, c in zip(_grid(shape), center, strict=True)]
    q = 0.0
    for k in range(3):  # coordinates in the ellipsoid's own frame: rot.T @ d
        local = rot[0, k] * d[0] + rot[1, k] * d[1] + rot[2, k] * d[2]
        q = q + (local / semi_axes[k]) ** 2
    return q <= 1.0


def _extent(semi_axes: Sequence[float], angles_deg: Sequence[float], direction: np.ndarray) -> float:
    """Distance from an ellipsoid's centre to its surface along a unit ``direction``."""
    local = rotation_matrix(angles_deg).T @ direction
    return float(1.0 / np.sqrt(np.sum((local / np.asarray(semi_axes)) ** 2)))


def draw_anatomy(rng: np.random.Generator, touch_probability: float = 0.85) -> dict[str, Any]:
    """Random abdominal anatomy in normalised coordinates (axis 0 -> patient left, 1 -> posterior,
    2 -> superior, as in an LPS-stored volume). The kidney is placed against the liver so that the two
    overlap (the kidney is painted over the liver: they share a boundary) with ``touch_probability``,
    else a small gap apart."""
    u = rng.uniform
    body = {"center": [rng.normal(0, 0.02), rng.normal(0, 0.02), 0.0],
            "semi_axes": [u(0.84, 0.93), u(0.68, 0.8), 4.0], "angles": [0, 0, u(-5, 5)],
            "fat": u(0.08, 0.14)}
    liver = {"center": [-0.25 + rng.normal(0, 0.03), -0.12 + rng.normal(0, 0.03), 0.15 + rng.normal(0, 0.05)],
             "semi_axes": [u(0.36, 0.44), u(0.30, 0.38), u(0.5, 0.7)],
             "angles": [u(-10, 10), u(-10, 10), u(-25, 25)]}
    kidney = {"semi_axes": [u(0.15, 0.19), u(0.12, 0.16), u(0.3, 0.4)],
              "angles": [u(-10, 10), u(-10, 10), u(-30, 30)]}
    direction = np.array([u(-0.15, 0.15), u(0.6, 0.9), u(-0.5, -0.2)])
    direction /= np.linalg.norm(direction)
    touching = bool(rng.random() < touch_probability)
    reach = _extent(liver["semi_axes"], liver["angles"], direction)
    k_reach = _extent(kidney["semi_axes"], kidney["angles"], -direction)
    dist = reach + k_reach * (1 - u(0.2, 0.4)) if touching else reach + k_reach + u(0.08, 0.15)
    kidney["center"] = (np.asarray(liver["center"]) + dist * direction).tolist()
    spleen = {"center": [0.45 + rng.normal(0, 0.03), 0.25 + rng.normal(0, 0.03), 0.2 + rng.normal(0, 0.05)],
              "semi_axes": [u(0.16, 0.21), u(0.12, 0.16), u(0.3, 0.4)],
              "angles": [u(-10, 10), u(-10, 10), u(-30, 30)]}
    spine = {"center": [rng.normal(0, 0.02), 0.45 + rng.normal(0, 0.02), 0.0], "radius": u(0.08, 0.11)}
    return {"body": body, "liver": liver, "kidney": kidney, "spleen": spleen, "spine": spine,
            "touching": touching, "shift": [0.0, 0.0, 0.0]}


def shift_anatomy(anatomy: dict[str, Any], rng: np.random.Generator, scale: float = 0.03) -> dict[str, Any]:
    """The same anatomy positioned differently on the table (a second study of one patient)."""
    out = json.loads(json.dumps(anatomy))
    out["shift"] = [rng.normal(0, scale), rng.normal(0, scale), rng.normal(0, 2 * scale)]
    return out


def anatomy_maps(shape: Sequence[int], anatomy: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic drawing: (tissue codes, label uint8) of ``anatomy`` on a grid of ``shape``."""
    shift = np.asarray(anatomy["shift"])

    def ell(part: dict[str, Any], scale: float = 1.0) -> np.ndarray:
        axes = np.asarray(part["semi_axes"]) * np.array([scale, scale, 1.0])
        return ellipsoid_mask(shape, np.asarray(part["center"]) + shift, axes, part["angles"])

    b = anatomy["body"]
    body, inner = ell(b), ell(b, 1 - b["fat"])
    tissue = np.full(shape, AIR, dtype=np.uint8)
    tissue[body] = FAT
    tissue[inner] = SOFT
    for name, code in (("liver", LIVER), ("kidney", KIDNEY), ("spleen", SPLEEN)):
        tissue[ell(anatomy[name]) & inner] = code  # later organs are painted over earlier ones
    sp = anatomy["spine"]
    g = _grid(shape)
    cyl = ((g[0] - sp["center"][0] - shift[0]) ** 2 + (g[1] - sp["center"][1] - shift[1]) ** 2
           <= sp["radius"] ** 2)
    tissue[np.broadcast_to(cyl, shape) & (tissue == SOFT)] = BONE
    label = np.zeros(shape, dtype=np.uint8)
    for code, value in ORGAN_LABEL.items():
        label[tissue == code] = value
    return tissue, label


def smooth_field(shape: Sequence[int], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Low-frequency field, max |value| = amplitude: a linear ramp in a random direction (so every
    organ sees a gradient) plus random quadratic terms, in normalised coordinates."""
    g, dims = _grid(shape), len(shape)
    direction = rng.normal(size=dims)
    direction /= np.linalg.norm(direction)
    quadratic = [g[j] * g[k] for j in range(dims) for k in range(j, dims)]
    field = sum(d * x for d, x in zip(direction, g, strict=True)) + 0.5 * sum(
        c * t for c, t in zip(rng.uniform(-1, 1, len(quadratic)), quadratic, strict=True))
    field = np.broadcast_to(field, shape).astype(np.float32)
    return field * (amplitude / (float(np.abs(field).max()) or 1.0))


def ct_phantom(shape: Sequence[int], rng: np.random.Generator, anatomy: dict[str, Any] | None = None,
               noise_hu: float = 15.0, bias_hu: float = 15.0, blur: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """CT-like phantom in Hounsfield units: (image int16, label uint8 with 1 liver, 2 kidney, 3 spleen).
    Air -1000, fat ~-100, soft tissue ~40, liver ~60, kidney ~150, spleen ~100, bone ~400; partial-volume
    blur, a smooth additive bias and Gaussian noise."""
    anatomy = anatomy if anatomy is not None else draw_anatomy(rng)
    tissue, label = anatomy_maps(shape, anatomy)
    u = rng.uniform
    hu = np.array([-1000, u(-110, -90), u(35, 45), u(350, 450), u(55, 65), u(145, 160), u(95, 105)], np.float32)
    image = hu[tissue]
    if blur:
        image = ndimage.gaussian_filter(image, sigma=(0.6, 0.6, 0.3))
    image += smooth_field(shape, rng, bias_hu) + rng.normal(0, noise_hu, shape).astype(np.float32)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), label


def mr_phantom(shape: Sequence[int], rng: np.random.Generator, anatomy: dict[str, Any] | None = None,
               noise: float = 12.0, bias: float = 0.35, blur: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """T1-like MR phantom with arbitrary units: (image float32, label uint8). Tissue values of a few
    hundred, a multiplicative smooth bias field ``exp(+-bias)`` and Rician noise."""
    anatomy = anatomy if anatomy is not None else draw_anatomy(rng)
    tissue, label = anatomy_maps(shape, anatomy)
    u = rng.uniform
    values = np.array([0, u(380, 420), u(170, 190), u(90, 110), u(270, 290), u(130, 150), u(220, 240)], np.float32)
    return _mr_image(tissue, values, rng, noise, bias, blur), label


def _mr_image(tissue: np.ndarray, values: np.ndarray, rng: np.random.Generator, noise: float, bias: float,
              blur: bool) -> np.ndarray:
    """One MR contrast: tissue ``values``, blur, a multiplicative bias field and Rician noise."""
    shape = tissue.shape
    image = values[tissue]
    if blur:
        image = ndimage.gaussian_filter(image, sigma=(0.6, 0.6, 0.3))
    image *= np.exp(smooth_field(shape, rng, bias))
    real = image + rng.normal(0, noise, shape).astype(np.float32)
    imag = rng.normal(0, noise, shape).astype(np.float32)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


def mr2ch_phantom(shape: Sequence[int], rng: np.random.Generator, anatomy: dict[str, Any] | None = None,
                  noise: float = 12.0, bias: float = 0.35, blur: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Two-channel MR of one anatomy: (image float32 (X, Y, Z, 2), label uint8 as ``mr_phantom``).
    Channel 0 is T1-like (fat bright, liver > spleen > kidney), channel 1 T2-like (fat and kidney
    bright, spleen > liver, muscle dark); each has its own bias field and Rician noise."""
    anatomy = anatomy if anatomy is not None else draw_anatomy(rng)
    tissue, label = anatomy_maps(shape, anatomy)
    u = rng.uniform
    t1 = np.array([0, u(380, 420), u(170, 190), u(90, 110), u(270, 290), u(130, 150), u(220, 240)], np.float32)
    t2 = np.array([0, u(330, 370), u(70, 90), u(140, 160), u(90, 110), u(300, 340), u(220, 250)], np.float32)
    return np.stack([_mr_image(tissue, v, rng, noise, bias, blur) for v in (t1, t2)], axis=-1), label
