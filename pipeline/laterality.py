"""Lateral labels: which label pairs a flip along the patient's left-right axis exchanges.

A left-right flip turns a left parotid into a right one. Instead of forbidding that flip (and
losing the augmentation), a flip along the left-right axis swaps each ``(left, right)`` pair:
in training (:class:`pipeline.transforms.RandLateralFlipd`) and in test-time augmentation
(``lateral_pairs`` of :func:`pipeline.inference.window_predictor`). The pairs come from the label
names (:func:`lateral_pairs`) and from a manifest's optional ``lateral_pairs`` field, a list of
``[left, right]`` label names or values (:func:`declared_pairs`); :func:`label_pairs` merges them.
No torch here: the planner imports it.

    >>> label_pairs(["background", "brainstem", "left_parotid", "right_parotid"], {})
    ([(2, 3)], 'from the label names')
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pipeline.errors import InputError

SIDES = {"left": "L", "l": "L", "lt": "L", "right": "R", "r": "R", "rt": "R"}
#: words of a heart chamber's name (MM-WHS's LV/RV/LA/RA, ACDC's LVC, left_ventricle, atrium_right)
HEART_WORDS = {"ventricle", "ventricles", "ventricular", "atrium", "atria", "atrial", "auricle",
               "lv", "rv", "la", "ra", "lvc", "rvc"}
#: words that make a "ventricle" the brain's (FreeSurfer's Left-Lateral-Ventricle, Left-Inf-Lat-Vent)
BRAIN_WORDS = {"lateral", "lat", "brain", "cerebral", "horn"}


def name_words(name: str) -> list[str]:
    """The lower-case words of a label name: split at anything not a letter or digit, between a
    lower-case and an upper-case letter and after capitals that start a capitalised word
    (``LeftKidney``, ``LKidney`` -> ``["left", "kidney"]``, ``["l", "kidney"]``); a word that starts
    with ``left`` or ``right`` and goes on loses it as a word of its own (``leftkidney``)."""
    text = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", re.sub(r"([a-z])([A-Z])", r"\1 \2", str(name)))
    words = [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]
    return [part for w in words for part in _side_prefix(w)]


def _side_prefix(word: str) -> list[str]:
    """``leftkidney`` -> ``["left", "kidney"]``; a word that only begins with the letters (cleft) stays."""
    found = re.match(r"^(left|right)([a-z]{3,})$", word)
    return [found.group(1), found.group(2)] if found else [word]


def heart_chamber(name: str) -> bool:
    """Whether a label names a heart chamber: left and right chambers are not mirror images of each
    other (a flipped left ventricle has the left ventricle's thick wall, not the right's crescent),
    so a left-right flip must keep their labels, as nnU-Net's plain flip does, never swap them.

    >>> [heart_chamber(n) for n in ("LV", "right_atrium", "Left-Lateral-Ventricle", "left_kidney")]
    [True, True, False, False]
    """
    words = set(name_words(name))
    return bool(words & HEART_WORDS) and not words & BRAIN_WORDS


def lateral_pairs(label_names: Sequence[str]) -> list[tuple[int, int]]:
    """``(left, right)`` label indices whose names differ only by a side word: left/right, l/r or
    lt/rt, in any case, as a separate word (``left_parotid``/``right_parotid``,
    ``Kidney_L``/``Kidney_R``, ``parotid lt``/``parotid rt``, ``LeftLung``/``RightLung``); else,
    for names without a side word, by a first letter l/r of a word when the other letter with the
    same rest names another label (FLARE's ``LK``/``RK``, ``LAG``/``RAG``, BTCV's ``lkid``/``rkid``,
    ``lad``/``rad``): a pair only, so a lone ``Lung`` or ``RML`` has no side. Heart chambers
    (:func:`heart_chamber`) are never paired.

    >>> lateral_pairs(["background", "brainstem", "left_parotid", "right_parotid", "Kidney_R", "kidney_l"])
    [(2, 3), (5, 4)]
    >>> lateral_pairs(["background", "Liver", "RK", "Lung", "LK"])
    [(4, 2)]
    """
    sides: dict[tuple[str, ...], dict[str, int]] = {}
    letters: dict[tuple[str, ...], dict[str, list[int]]] = {}
    for index, name in enumerate(label_names):
        if heart_chamber(name):
            continue
        words = name_words(name)
        marked = [i for i, w in enumerate(words) if w in SIDES]
        if len(marked) == 1:
            key = tuple("*" if i == marked[0] else w for i, w in enumerate(words))
            sides.setdefault(key, {})[SIDES[words[marked[0]]]] = index
        for k, w in enumerate(words if not marked else []):  # "lkid": l + kid, a side only with "rkid"
            if re.match(r"^[lr][a-z]", w):
                key = (*words[:k], "*" + w[1:], *words[k + 1:])
                letters.setdefault(key, {}).setdefault(w[0].upper(), []).append(index)
    pairs = [(s["L"], s["R"]) for s in sides.values() if {"L", "R"} <= set(s)]
    used = {i for p in pairs for i in p}
    for s in letters.values():  # one label each side, neither in another pair
        if len(s.get("L", [])) == len(s.get("R", [])) == 1 and not used & {s["L"][0], s["R"][0]}:
            pairs.append((s["L"][0], s["R"][0]))
            used |= {s["L"][0], s["R"][0]}
    return sorted(pairs)


def declared_pairs(declared: Any, labels: Sequence[str], source: str = "manifest") -> list[tuple[int, int]]:
    """The manifest's ``lateral_pairs`` as label indices: each entry a ``[left, right]`` pair of label
    names (``"left_parotid"``) or values (``3`` or ``"3"``). InputError naming ``source`` for a
    field that is not a list of pairs, an unknown label, the background, a label paired with itself
    or a label in two pairs."""
    what = f"{source}: lateral_pairs"
    if not isinstance(declared, (list, tuple)):
        raise InputError(f"{what}: a list of [left, right] label pairs expected, got {declared!r}")
    index = {str(n): i for i, n in enumerate(labels)}
    known = ", ".join(f"{i} {n}" for i, n in enumerate(labels))
    out: list[tuple[int, int]] = []
    seen: dict[int, int] = {}
    for k, pair in enumerate(declared):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise InputError(f"{what}[{k}]: a pair [left, right] of label names or values expected, got {pair!r}")
        ids = []
        for v in pair:
            if isinstance(v, str) and v in index:
                i = index[v]
            elif isinstance(v, (int, str)) and not isinstance(v, bool) and str(v).isdigit() and int(v) < len(labels):
                i = int(v)
            else:
                raise InputError(f"{what}[{k}]: unknown label {v!r} (labels: {known})")
            if i == 0:
                raise InputError(f"{what}[{k}]: label 0 ({labels[0]!r}) is the background, it has no side")
            ids.append(i)
        if ids[0] == ids[1]:
            raise InputError(f"{what}[{k}]: label {labels[ids[0]]!r} is paired with itself")
        for i in ids:
            if i in seen:
                raise InputError(f"{what}: label {labels[i]!r} is in two pairs ({seen[i]} and {k})")
            seen[i] = k
        out.append((ids[0], ids[1]))
    return out


def label_pairs(labels: Sequence[str], manifest: dict[str, Any], source: str = "manifest"
                ) -> tuple[list[tuple[int, int]], str]:
    """``(pairs, where they came from)``: the manifest's declared ``lateral_pairs``
    (:func:`declared_pairs`) and the pairs found by name (:func:`lateral_pairs`); a pair found by
    name that shares a label with a declared one gives way to the declaration."""
    declared = declared_pairs(manifest["lateral_pairs"], labels, source) \
        if manifest.get("lateral_pairs") is not None else []
    used = {i for p in declared for i in p}
    named = [p for p in lateral_pairs(labels) if not used & set(p)]
    how = " and ".join(w for w, ps in (("declared in the manifest (lateral_pairs)", declared),
                                       ("from the label names", named)) if ps)
    return sorted(declared + named), how or "none"
