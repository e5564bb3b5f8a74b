"""Planning rule 8 (see :mod:`pipeline.plan`): flips (with the left/right label pairs swapped along
the patient's left-right axis), rotation, scaling and intensity augmentation, as data."""

from __future__ import annotations

import math

from pipeline.laterality import SIDES as LATERAL_WORDS
from pipeline.laterality import heart_chamber, label_pairs, name_words
from pipeline.plan_network import rounded as _r

SIDES = (set(LATERAL_WORDS),
         {"anterior", "posterior", "ant", "post", "front", "back", "ventral", "dorsal"},
         {"superior", "inferior", "sup", "inf", "upper", "lower", "cranial", "caudal", "top", "bottom"})
NNUNET_INTENSITY = {"blur_prob": 0.2, "contrast_prob": 0.15, "lowres_prob": 0.25, "gamma_prob": 0.3}


def sided_axes(labels: list[str]) -> dict[int, list[str]]:
    """RAS axes a label name gives a side on: left/right 0, anterior/posterior 1, superior/inferior 2.
    A heart chamber's side names the chamber, which its shape tells apart, not a mirror image of
    another: it gives none (``pipeline.laterality.heart_chamber``)."""
    out: dict[int, list[str]] = {}
    for name in labels:
        if heart_chamber(name):
            continue
        listed = name_words(name)  # "post" of post-op (a resection cavity) is not posterior
        words = {w for i, w in enumerate(listed)
                 if not (w == "post" and listed[i + 1:i + 2] in (["op"], ["operative"], ["surgical"]))}
        for axis, side in enumerate(SIDES):
            if words & side:
                out.setdefault(axis, []).append(name)
    return out


def lateral_flip(labels: list[str], pairs: list[tuple[int, int]], axes: list[int], how: str = ""
                 ) -> tuple[int | None, bool, str]:
    """Rule 8 along the patient's left-right axis (RAS 0): ``(its network axis, or None when the
    slices run across it; whether to flip along it; rationale)``. Flipped when every label a name
    puts on the left or right has its partner in ``pairs`` (the flip swaps them), not otherwise."""
    paired = {labels[i] for p in pairs for i in p}
    unpaired = [n for n in sided_axes(labels).get(0, []) if n not in paired]
    names = ", ".join(f"{labels[a]}/{labels[b]}" for a, b in pairs)
    if 0 not in axes:
        return None, False, ("no flip along the left-right axis: the slices run across it"
                             + (f" (lateral pairs {names})" if pairs else ""))
    lr = axes.index(0)
    if unpaired:
        return lr, False, (f"none along RAS axis 0 (left-right): {', '.join(unpaired)} "
                           f"{'has' if len(unpaired) == 1 else 'have'} no partner of the other side (pair "
                           "labels in the manifest's lateral_pairs to flip with a swap)")
    if pairs:
        return lr, True, (f"along axis {lr} (the patient's left-right, RAS axis 0) the flip swaps the lateral "
                          f"pairs {names} ({how}): a flipped left organ is labelled right, in training and TTA")
    return lr, True, ""


def augmentation(labels: list[str], spatial_dims: int, slice_axis: int | None, anisotropic_axis: int | None,
                 roi_size: list[int], device: str, pairs: list[tuple[int, int]] | None = None,
                 pairs_how: str = "from the label names") -> tuple[dict, str]:
    """Rule 8: flips, rotation, scaling (per axis of the network's input) and intensity augmentation.
    ``pairs``: the lateral label pairs (None: those found by name, ``pipeline.laterality``); a
    flip along ``lateral_axis`` (the network axis of RAS axis 0) swaps them."""
    axes = [a for a in range(3) if a != slice_axis] if slice_axis is not None else list(range(spatial_dims))
    pairs = label_pairs(labels, {})[0] if pairs is None else [(int(a), int(b)) for a, b in pairs]
    sided = sided_axes(labels)
    lr, flip_lr, why_lr = lateral_flip(labels, pairs, axes, pairs_how)
    flips = [i for i, a in enumerate(axes) if (flip_lr if a == 0 else a not in sided)]
    why = f"flip axes {flips}" + "".join(f"; none along RAS axis {a} ({', '.join(n)})"
                                         for a, n in sided.items() if a in axes and a != 0)
    why += f"; {why_lr}" if why_lr else ""
    scale = [[-0.3, 0.4]] * spatial_dims
    # a half turn in a plane is a flip of both its axes without the label swap: in a plane holding the
    # left-right axis, with labels named for a side, it would put a left organ (the mirror image of the
    # right one) on the right still labelled left, so the turn is capped as in 3D. Anterior/posterior
    # parts (the hippocampus's) differ in appearance, and their measured plans keep the half turn.
    lateral = 0 in sided or bool(pairs)

    def half_turn(plane: list[int]) -> tuple[float, str]:
        if lateral and 0 in plane:
            return math.radians(30), " (not +-180: a half turn would carry left labels to the right)"
        return math.pi, ""

    if spatial_dims == 2:  # nnU-Net: +-180 deg, +-15 deg for elongated patches
        turn, because = half_turn(axes)
        rot = [math.radians(15) if max(roi_size) / min(roi_size) > 1.5 else turn]
        why += f"; rotation +-{math.degrees(rot[0]):.0f} deg" + (because if rot[0] == turn else "")
    elif anisotropic_axis is not None:
        turn, because = half_turn([a for a in range(3) if a != anisotropic_axis])
        rot = [turn if a == anisotropic_axis else 0.0 for a in range(3)]
        scale = [[0.0, 0.0] if a == anisotropic_axis else [-0.3, 0.4] for a in range(3)]
        why += (f"; anisotropic: rotation +-{math.degrees(turn):.0f} deg about axis {anisotropic_axis} only{because}, "
                "no scaling along it")
    else:
        rot = [math.radians(30)] * 3
        why += "; rotation +-30 deg about each axis"
    cuda = device == "cuda"
    why += "; scaling 0.7-1.4, on 20% of patches; " + (
        "nnU-Net's intensity augmentation" if cuda else
        "noise and scale/shift only (nnU-Net's blur/contrast/low-res/gamma trained slower in the CPU budget)")
    return {"flip_axes": flips, "flip_prob": 0.5, "lateral_axis": lr, "lateral_pairs": [list(p) for p in pairs],
            "affine_prob": 0.2, "rotate_range": _r(rot),
            "scale_range": scale,
            "noise_prob": 0.1, "intensity_prob": 0.5,
            **{k: v if cuda else 0.0 for k, v in NNUNET_INTENSITY.items()}}, why
