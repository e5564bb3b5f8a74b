"""The adult CT cohort of ``segpipe synth --kind ct-cohort``, drawn in millimetres.

``draw_cohort_anatomy`` draws an adult abdomen (body ~300x220 mm, liver, right/left kidneys in
perirenal fat, spleen, a vertebral column with discs), ``draw_ct_study`` an acquisition (512x512
matrix at 0.6-0.9 mm, slices 1.5-5 mm, a 200-250 mm scan range, table position, HU values,
noise), ``cohort_geometry`` the voxel grid and ``cohort_maps`` the drawing, painted in each
organ's bounding box; ``ct_cohort_phantom`` puts them together. The tissue codes, rotations and
smooth fields are ``pipeline.synthetic``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.phantoms import (
    AIR,
    BONE,
    DISC,
    FAT,
    KIDNEY,
    KIDNEY_L,
    LIVER,
    MUSCLE,
    SOFT,
    SPLEEN,
    lps_affine,
    rotation_matrix,
    smooth_field,
)

COHORT_MATRIX = 512


def _half_extent(semi_axes: Sequence[float], angles_deg: Sequence[float]) -> np.ndarray:
    """Half-size along each axis of a rotated ellipsoid's bounding box."""
    return np.sqrt(((rotation_matrix(angles_deg) * np.asarray(semi_axes)) ** 2).sum(axis=1))


def draw_cohort_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    """Random adult abdomen in mm, patient frame (x -> patient left, y -> posterior, z -> superior, as
    LPS), origin at the body's centre near the renal hila: body ~250-340 x 180-260 mm with 10-30 mm of
    subcutaneous fat; liver 150-190 mm wide (~1.1-2.2 L) in the right upper quadrant; kidneys ~110x60x50
    mm beside the spine, upper poles medial and posterior, the right one lower; spleen ~120x70x40 mm,
    posterolateral on the left; vertebral bodies (discs every ~35 mm), spinal canal and arch in a
    block of paraspinal muscle that liver and spleen stay out of."""
    u = rng.uniform
    inner, fat = [u(115, 140), u(80, 100)], u(10, 30)  # semi-axes inside the subcutaneous fat
    vb_y, vb = inner[1] - u(50, 60), [u(20, 24), u(15, 18)]
    spine = {"x": rng.normal(0, 2), "y": vb_y, "vb": vb, "canal_y": vb_y + vb[1] + 8, "canal_r": u(7, 9),
             "arch": [u(22, 28), u(10, 13)], "disc_period": u(33, 38), "disc_mm": u(7, 10),
             "muscle_y": vb_y + u(15, 25), "muscle": [u(50, 60), u(35, 45)]}  # psoas and back muscles
    spine["disc_phase"] = u(0, spine["disc_period"])
    liver_axes = [u(75, 95), u(55, 70), u(65, 80)]
    liver = {"center": [liver_axes[0] - inner[0] - u(0, 20), -u(0, 15), u(50, 65)], "semi_axes": liver_axes,
             "angles": [u(-10, 10), u(-10, 10), u(-15, 15)], "fat_mm": u(2, 5)}  # against the right wall
    z_right = u(-25, -5)
    kidneys = [{"center": [side * u(65, 78), vb_y + u(0, 10), z], "semi_axes": [u(27, 33), u(22, 27), u(50, 60)],
                "angles": [-u(5, 15), -side * u(10, 20), -side * u(15, 35)], "fat_mm": u(6, 12)}
               for side, z in ((-1, z_right), (1, z_right + u(10, 25)))]
    spleen = {"center": [inner[0] - u(25, 35), vb_y - u(0, 15), u(45, 65)],
              "semi_axes": [u(17, 23), u(30, 40), u(55, 65)], "angles": [-u(20, 40), 0.0, u(20, 40)], "fat_mm": u(2, 5)}
    organs = [liver, spleen, *kidneys]
    z_half = [float(_half_extent(o["semi_axes"], o["angles"])[2]) for o in organs]
    return {"body": {"semi_axes": [inner[0] + fat, inner[1] + fat], "fat": fat}, "liver": liver,
            "kidney_right": kidneys[0], "kidney_left": kidneys[1], "spleen": spleen, "spine": spine,
            "top": max(o["center"][2] + h for o, h in zip(organs, z_half, strict=True)),
            "bottom": min(o["center"][2] - h for o, h in zip(organs, z_half, strict=True))}


def draw_ct_study(rng: np.random.Generator, anatomy: dict[str, Any]) -> dict[str, Any]:
    """Random acquisition of ``anatomy``: the body's offset from the isocentre; in-plane spacing 0.6-0.9
    mm (wide enough for the body to fit the 512 matrix), slices of 1.5, 2, 2.5, 3 or 5 mm; a 200-250 mm
    scan range from 5-25 mm above the highest organ; table position; HU per tissue code (fat ~-100,
    soft tissue ~40, bone ~700, liver ~60, kidneys 30-150 by contrast phase, spleen ~50, discs ~80,
    muscle ~50); noise 10-18 HU at 2.5 mm (thinner slices noisier) and a 5-15 HU in-plane bias."""
    u = rng.uniform
    offset = [float(np.clip(rng.normal(0, 8), -20, 20)), float(np.clip(rng.normal(5, 10), -15, 25))]
    need = max(2 * (a + abs(o)) for a, o in zip(anatomy["body"]["semi_axes"], offset, strict=True)) + 20
    in_plane, thickness = u(max(0.6, need / COHORT_MATRIX), 0.9), float(rng.choice([1.5, 2.0, 2.5, 3.0, 5.0]))
    top = anatomy["top"] + u(5, 25)
    length = max(u(200, 250), top - anatomy["bottom"] + 10)
    hu = [-1000, u(-110, -90), u(35, 45), u(650, 750), u(55, 65), u(30, 150), u(45, 55), 0.0, u(70, 90), u(40, 55)]
    hu[KIDNEY_L] = hu[KIDNEY] + rng.normal(0, 3)
    return {"offset": offset, "table_z": u(-350, -150), "spacing": [in_plane, in_plane, thickness],
            "fov": [COHORT_MATRIX * in_plane, COHORT_MATRIX * in_plane, length], "top": top, "hu": hu,
            "noise_hu": u(10, 18) * np.sqrt(2.5 / thickness), "bias_hu": u(5, 15)}


def cohort_geometry(study: dict[str, Any], shape: Sequence[int] | None = None,
                    voxel_scale: float = 1.0) -> tuple[tuple[int, ...], np.ndarray, list[np.ndarray]]:
    """Voxel grid of ``study``: (shape, RAS affine of LPS-stored voxels, voxel-centre coordinates per axis
    in the anatomy frame, mm, ascending). The study's spacing and matrix by default; ``shape`` fixes the
    matrix over the same field of view, ``voxel_scale`` multiplies the spacing (coarser voxels)."""
    fov = np.asarray(study["fov"], float)
    if shape is None:
        spacing = np.asarray(study["spacing"], float) * voxel_scale
        shape = tuple(max(1, int(round(f / s))) for f, s in zip(fov, spacing, strict=True))
    else:
        shape = tuple(int(s) for s in shape)
        spacing = fov / np.asarray(shape)
    centre = np.array([0.0, 0.0, study["top"] - fov[2] / 2])  # isocentre in-plane; z in the anatomy frame
    first = centre - (np.asarray(shape) - 1) / 2 * spacing
    shift = [study["offset"][0], study["offset"][1], 0.0]
    axes = [(f + np.arange(n) * s - d).astype(np.float32) for f, n, s, d in zip(first, shape, spacing, shift, strict=True)]
    return shape, lps_affine(spacing, (-first[0], -first[1], first[2] + study["table_z"])), axes


def _paint(tissue: np.ndarray, axes: list[np.ndarray], inner: np.ndarray, part: dict[str, Any], code: int,
           onto: Sequence[int], grow: float = 0.0) -> None:
    """Set ``code`` where the rotated ellipsoid ``part`` (mm, semi-axes grown by ``grow``) covers tissue
    in ``onto`` inside the 2D ``inner`` mask, computed within its bounding box only."""
    semi = np.asarray(part["semi_axes"], np.float32) + np.float32(grow)
    rot, c = rotation_matrix(part["angles"]).astype(np.float32), part["center"]
    half = _half_extent(semi, part["angles"])
    box = tuple(slice(*np.searchsorted(a, [ci - h, ci + h])) for a, ci, h in zip(axes, c, half, strict=True))
    d = [(axes[j][box[j]] - c[j]).reshape([-1 if k == j else 1 for k in range(3)]) for j in range(3)]
    q = sum(((rot[0, k] * d[0] + rot[1, k] * d[1] + rot[2, k] * d[2]) / semi[k]) ** 2 for k in range(3))
    view = tissue[box]
    view[(q <= 1) & inner[box[0], box[1], None] & np.isin(view, onto)] = code


def cohort_maps(anatomy: dict[str, Any], axes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic drawing of a cohort anatomy on the grid ``axes`` (voxel-centre mm per axis, from
    ``cohort_geometry``): (tissue codes, label uint8 1 liver, 2 kidney_right, 3 spleen, 4 kidney_left).
    The body, spine and canal are z-invariant 2D maps (discs aside); organs lie in fat planes (kidneys
    in perirenal fat) and kidneys are painted over liver and spleen where they meet."""
    x, y = axes[0][:, None], axes[1][None, :]
    (a, b), fat, sp = anatomy["body"]["semi_axes"], anatomy["body"]["fat"], anatomy["spine"]
    inner = (x / (a - fat)) ** 2 + (y / (b - fat)) ** 2 <= 1
    plane = np.where(inner, SOFT, np.where((x / a) ** 2 + (y / b) ** 2 <= 1, FAT, AIR)).astype(np.uint8)

    def ellipse(cy: float, semi: Sequence[float]) -> np.ndarray:
        return inner & (((x - sp["x"]) / semi[0]) ** 2 + ((y - cy) / semi[1]) ** 2 <= 1)

    vb = ellipse(sp["y"], sp["vb"])
    plane[ellipse(sp["muscle_y"], sp["muscle"])] = MUSCLE
    plane[vb | ellipse(sp["canal_y"] + 6, sp["arch"])] = BONE
    plane[ellipse(sp["canal_y"], [sp["canal_r"]] * 2)] = SOFT
    tissue = np.repeat(plane[:, :, None], len(axes[2]), axis=2)
    for k in np.flatnonzero((axes[2] - sp["disc_phase"]) % sp["disc_period"] < sp["disc_mm"]):
        tissue[:, :, k][vb] = DISC
    for part, code in ((anatomy["liver"], LIVER), (anatomy["spleen"], SPLEEN)):  # each in a fat plane
        _paint(tissue, axes, inner, part, FAT, (SOFT,), grow=part["fat_mm"])
        _paint(tissue, axes, inner, part, code, (SOFT, FAT))
    kidneys = ((anatomy["kidney_right"], KIDNEY), (anatomy["kidney_left"], KIDNEY_L))
    for part, _ in kidneys:  # perirenal fat
        _paint(tissue, axes, inner, part, FAT, (SOFT,), grow=part["fat_mm"])
    for part, code in kidneys:
        _paint(tissue, axes, inner, part, code, (SOFT, FAT, LIVER, SPLEEN, MUSCLE))
    lut = np.zeros(MUSCLE + 1, np.uint8)
    lut[[LIVER, KIDNEY, SPLEEN, KIDNEY_L]] = [1, 2, 3, 4]
    return tissue, lut[tissue]


def ct_cohort_phantom(rng: np.random.Generator, anatomy: dict[str, Any] | None = None,
                      study: dict[str, Any] | None = None, shape: Sequence[int] | None = None,
                      voxel_scale: float = 1.0, blur: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adult-sized CT study in HU: (image int16, label uint8 1 liver, 2 kidney_right, 3 spleen,
    4 kidney_left, 4x4 RAS affine of LPS-stored voxels). Partial-volume blur, the study's in-plane bias
    and Gaussian noise; ``shape`` / ``voxel_scale`` as in ``cohort_geometry``."""
    anatomy = anatomy if anatomy is not None else draw_cohort_anatomy(rng)
    study = study if study is not None else draw_ct_study(rng, anatomy)
    shape, affine, axes = cohort_geometry(study, shape, voxel_scale)
    tissue, label = cohort_maps(anatomy, axes)
    image = np.asarray(study["hu"], np.float32)[tissue]
    if blur:
        image = ndimage.gaussian_filter(image, sigma=(0.5, 0.5, 0.4), truncate=2.0)
    image += smooth_field(shape[:2], rng, study["bias_hu"])[:, :, None]
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= np.float32(study["noise_hu"])
    image += noise
    np.rint(image, out=image)  # in place: a 512x512x160 volume is 170 MB of float32
    return np.clip(image, -1024, 3071, out=image).astype(np.int16), label, affine
