"""Patient-grouped k-fold splits of a manifest, and the ``splits.json`` files that hold them.

Groups (a patient, or an entry without one) are shuffled with the seed, then each goes, largest
first, to the fold with the fewest cases; entries with an explicit ``fold`` stay in it.
``write_splits`` saves them as ``splits.json`` beside the manifest (like nnU-Net's
splits_final.json, which may be edited by hand and is read as well); ``pipeline.manifest.datalist``
reads that file when it matches k, seed and the manifest's ids, and otherwise computes the same
split in memory with a warning; cross-validation refuses such a file (``split_file``) unless it
holds only the seed's split into another number of folds.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, UsageError
from pipeline.fileio import atomic_path
from pipeline.manifest import parse_manifest

log = logging.getLogger(__name__)
_WARNED: set[tuple[str, int, int, str]] = set()  # splits files already warned about by this process

SPLITS_FILE = "splits.json"


def group_key(entry: dict[str, Any]) -> str:
    """The split group of a training entry: its ``patient`` (any value but null or "", so patient 0
    is a patient), else the entry alone."""
    patient = entry.get("patient")
    return f"patient:{patient}" if patient not in (None, "") else f"id:{entry['id']}"


def group_splits(path: Path | str, entries: list[dict[str, Any]], k: int, seed: int) -> list[dict[str, list]]:
    """The ``k`` folds (``{"train": [ids], "val": [ids]}``) of the manifest ``path``'s training
    ``entries``: patient groups shuffled with ``seed``, largest first into the fold with fewest cases."""
    groups: dict[str, list[str]] = {}
    pinned: dict[str, int] = {}
    for e in entries:
        patient = e.get("patient")
        key = group_key(e)
        groups.setdefault(key, []).append(e["id"])
        fold = e.get("fold")
        if fold is None:
            continue
        if not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < k:
            raise InputError(f"{path}: training entry {e['id']}: fold {fold!r} is not an integer in 0..{k - 1}")
        if pinned.setdefault(key, fold) != fold:
            raise InputError(f"{path}: training entry {e['id']}: fold {fold} but patient {patient!r} "
                             f"is pinned to fold {pinned[key]}; a patient's entries must share one fold")
    val: list[list[str]] = [[] for _ in range(k)]
    for key in sorted(pinned):
        val[pinned[key]] += groups[key]
    free = sorted(g for g in groups if g not in pinned)
    random.Random(seed).shuffle(free)
    free.sort(key=lambda g: -len(groups[g]))  # stable: largest first, shuffled among equal sizes
    for key in free:
        min(val, key=len).extend(groups[key])
    ids = [e["id"] for e in entries]
    return [{"train": [i for i in ids if i not in vs], "val": sorted(vs)} for vs in map(set, val)]


def compute_splits(path: Path, k: int = 5, seed: int = 0) -> dict[str, Any]:
    """``{"k", "seed", "n", "folds": [{"train": [ids], "val": [ids]}, ...]}`` for a manifest."""
    if k < 2:
        raise UsageError(f"k-fold splits need k >= 2, got {k}")
    data, _ = parse_manifest(Path(path), allow_outside=True)  # ids only: no file is opened here
    entries = data["training"]
    return {"k": k, "seed": seed, "n": len(entries), "folds": group_splits(path, entries, k, seed)}


def write_splits(path: Path, k: int = 5, seed: int = 0) -> Path:
    """Write patient-grouped, seeded k-fold ``splits.json`` beside the manifest; return its path."""
    path = Path(path)
    splits = compute_splits(path, k, seed)
    out = path.parent / SPLITS_FILE
    try:
        with atomic_path(out) as tmp:  # readers (e.g. other ranks) never see half a file
            tmp.write_text(json.dumps(splits, indent=1) + "\n")
    except OSError as e:
        raise InputError(f"{out}: cannot write splits ({e.strerror or e})") from None
    log.info("wrote %d-fold splits of %d cases (seed %d) to %s", k, splits["n"], seed, out)
    return out


def splits_folds(f: Path) -> tuple[list[dict[str, list[str]]], int | None]:
    """``(folds, seed)`` of a splits file: ours ({"k", "seed", "folds": [{"train", "val"}, ...]}) or
    nnU-Net's ``splits_final.json`` (the list of folds alone; seed None). InputError for anything
    else, and for a fold that has a case in both its train and val lists."""
    try:
        saved = json.loads(Path(f).read_text())
        folds, seed = (saved, None) if isinstance(saved, list) else (saved["folds"], saved["seed"])
        if isinstance(saved, dict) and saved["k"] != len(folds):
            raise ValueError(f"k is {saved['k']} but it lists {len(folds)} folds")
        both = [(i, sorted(set(fo["train"]) & set(fo["val"]))) for i, fo in enumerate(folds)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{f}: not a splits file ({e}); delete it or rerun `segpipe validate --folds`") from None
    for i, cases in both:
        if cases:
            raise InputError(f"{f}: fold {i}: case {cases[0]} is in both its train and val lists")
    return folds, seed


def splits_mismatch(f: Path | str, k: int, seed: int, ids: set[str]) -> str | None:
    """Why the splits file ``f`` is not a split of these case ``ids`` into ``k`` folds with ``seed``
    (nnU-Net's files record no seed: any fits), in a few words; None when it is one."""
    folds, saved_seed = splits_folds(Path(f))
    listed = {i for fo in folds for part in (fo["train"], fo["val"]) for i in part}
    missing, extra = sorted(ids - listed), sorted(listed - ids)
    if missing or extra:
        what = f"case {missing[0]} missing" if missing else f"case {extra[0]} not in the manifest"
        return f"{what}; {len(missing)} missing, {len(extra)} extra"
    if len(folds) != k:
        return f"it has {len(folds)} folds, not {k}"
    if saved_seed not in (seed, None):
        return f"it was written with seed {saved_seed}, not {seed}"
    short = [i for i, fo in enumerate(folds) if set(fo["train"]) | set(fo["val"]) != ids]
    if short:
        return f"fold {short[0]} does not list every case in its train or val list"
    return None


def _read_splits(f: Path, k: int, seed: int, ids: set[str]) -> list[dict] | None:
    """The folds of the splits file ``f`` when it matches k, seed (not recorded by nnU-Net) and the ids."""
    if not f.is_file():
        return None
    if splits_mismatch(f, k, seed, ids) is not None:
        log.warning("%s does not match k=%d, seed=%d and the manifest's ids; splitting in memory", f, k, seed)
        return None
    return splits_folds(f)[0]


def split_file(manifest: Path | str, k: int, seed: int, ids: set[str], splits: Path | str | None = None,
               strict: bool = False) -> tuple[list[dict] | None, Path | None]:
    """``(folds, file)`` of the split ``datalist`` reads, or ``(None, None)`` for the split computed
    from the seed. The file is ``splits`` (a planned bundle's own ``splits.json``) where it exists
    and lists any of the manifest's cases (one listing none of them is another dataset's: the
    bundle trained on other data), else ``splits.json`` beside the manifest where it exists. A file
    that does not fit (other cases: one added or removed since it was written, or a subset
    manifest; another number of folds or seed) is, with ``strict`` (cross-validation: its
    out-of-fold estimate is of that file's split, and its folds must not change silently), an
    InputError naming it; else the split is computed in memory with a warning saying why (a
    training on a few of a bundle's cases, a deliberate ``--set num_folds=3`` or ``seed=1``)."""
    path = Path(manifest)
    f = path.parent / SPLITS_FILE
    if splits and Path(splits).is_file():
        theirs = {i for fo in splits_folds(Path(splits))[0] for part in (fo["train"], fo["val"]) for i in part}
        if theirs & ids:
            f = Path(splits)
        else:
            log.info("%s: none of its cases is in %s (another dataset's split); using %s", splits, path,
                     f if f.is_file() else "the split computed from the seed")
    if not f.is_file():
        return None, None
    why = splits_mismatch(f, k, seed, ids)
    if why is None:
        return splits_folds(f)[0], f
    seeded = _seeded_split_into_other_k(f, path, k, seed, ids)
    if strict and not seeded:
        raise InputError(f"{f}: does not match {path} ({why}); make it match, or delete it to split the "
                         "manifest afresh")
    if (str(f), k, seed, why) not in _WARNED:  # once: a training reads its train and its val list
        _WARNED.add((str(f), k, seed, why))
        if seeded:
            log.info("%s is the %d-fold split computed from seed %d; %d folds are split from the same seed", f,
                     seeded, seed, k)
        else:
            log.warning("%s does not match k=%d, seed=%d (%s); splitting in memory", f, k, seed, why)
    return None, None


def _seeded_split_into_other_k(f: Path, manifest: Path, k: int, seed: int, ids: set[str]) -> int:
    """The number of folds of ``f`` where it holds these ``ids`` split from ``seed`` into another
    number of folds than ``k`` and nothing else (as ``segpipe plan`` and ``validate --folds`` write
    it): asking for ``k`` folds then loses no hand-made split, so even a cross-validation splits
    afresh. 0 for a file edited by hand or nnU-Net's (no seed)."""
    folds, saved_seed = splits_folds(f)
    if saved_seed != seed or len(folds) in (k, 0, 1) or splits_mismatch(f, len(folds), seed, ids) is not None:
        return 0
    try:
        computed = compute_splits(manifest, len(folds), seed)["folds"]
    except (InputError, UsageError):  # e.g. an entry pinned to a fold that k has not: not the seed's split
        return 0
    same = all(set(a["val"]) == set(b["val"]) for a, b in zip(folds, computed, strict=True))
    return len(folds) if same else 0


def saved_or_computed_splits(path: Path, k: int = 5, seed: int = 0) -> dict[str, Any]:
    """The splits ``datalist`` uses for this manifest: ``splits.json`` beside it when that matches
    k, seed and the ids (it may have been edited by hand), else ``compute_splits``."""
    path = Path(path)
    splits = compute_splits(path, k, seed)
    ids = {i for fo in splits["folds"] for i in fo["val"]}
    saved = _read_splits(path.parent / SPLITS_FILE, k, seed, ids)
    return {**splits, "folds": saved} if saved is not None else splits
