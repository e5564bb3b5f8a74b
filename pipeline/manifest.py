"""Manifests (the Medical Segmentation Decathlon ``dataset.json`` layout) and datalists.

A manifest is read as MSD writes it — ``labels`` {"0": "background", ...}, ``training``
[{image, label}], ``test`` [path or {image}], ``modality`` or ``channel_names`` — so real MSD
datasets load unchanged; nnU-Net v2's ``labels`` {"background": 0, ...} is accepted too, and an
nnU-Net v2 raw dataset's dataset.json, which lists no cases (``file_ending``, cases from its
``imagesTr``/``labelsTr``/``imagesTs`` files or its ``dataset`` object: ``pipeline.nnunet_v2``), loads as it is.
An entry's ``image`` is one file (channels, if several, on its last axis: MSD's 4D images) or a
list of files, one per channel in channel order (nnU-Net v2's ``case_0000.nii.gz``,
``case_0001.nii.gz``); MONAI's ``LoadImaged`` stacks such a list into channels.
Entries may carry ``patient`` (grouping for splits), ``fold`` (pinning an entry to a fold),
``id`` (default: the image's file name without ``.nii``/``.nii.gz``, and without ``_0000`` for a
list or where the label is named so)
and any other keys, which datalists pass on (NIfTI paths among them, e.g. cells' ``instance``,
resolved like ``image``). Relative paths are resolved against the manifest's folder; a path that leaves that
folder (``..``, an absolute path elsewhere, a symlink pointing out) is refused unless the manifest
says ``"allow_outside": true`` or the caller passes ``allow_outside=True``.

``datalist`` gives a fold's train or val entries from the split ``pipeline.splits`` reads or
computes. With ``folds <= 1`` there is no cross-validation: role "train" is every training entry
and role "val" is empty.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, UsageError
from pipeline.studies import is_nifti, study_id

log = logging.getLogger(__name__)

_SPLIT_KEYS = ("patient", "fold")  # split bookkeeping, not passed on in datalists
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")  # nnU-Net v2: case_0000.nii.gz is channel 0 of case


def image_files(image: str | list[str] | None) -> list[str]:
    """The file(s) of an entry's ``image``: one path, or one per channel (a list), as a list."""
    if image is None:
        return []
    return [str(p) for p in image] if isinstance(image, (list, tuple)) else [str(image)]


def channel_layout_id(image: str | list[str], label: Any = None) -> str:
    """The default id of an ``image``: the file name without its NIfTI suffix; for a list of
    channel files, the first one's without ``_0000`` (nnU-Net v2's channel suffix), as for one
    ``case_0000`` file whose label is ``case`` (nnU-Net's one-channel layout)."""
    if isinstance(image, (list, tuple)):
        return _CHANNEL_SUFFIX.sub("", study_id(image[0]))
    stem = _CHANNEL_SUFFIX.sub("", study_id(image))
    return stem if isinstance(label, str) and study_id(label) == stem else study_id(image)


def as_manifest(path: Path | str) -> Path:
    """``path``, or the ``dataset.json`` in it where it is a dataset folder (one that holds one: an
    MSD task folder, nnU-Net v2's raw dataset folder)."""
    p = Path(path)
    return p / "dataset.json" if p.is_dir() and (p / "dataset.json").is_file() else p


def load_manifest(path: Path, allow_outside: bool = False) -> dict[str, Any]:
    """The manifest with every entry resolved: ``training`` [{"image", "label", "id", ...}] and
    ``test`` [{"image", "id", ...}] with absolute path strings, ``labels`` in the MSD form
    {"0": "background", ...}, ``manifest_path``. InputError for a manifest that is not JSON,
    lacks ``labels``/``training``, is malformed, or has paths escaping its folder."""
    data, problems = parse_manifest(Path(path), allow_outside)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s); run `segpipe validate {path}`)" if len(problems) > 1 else ""
        raise InputError(f"{path}: {problems[0]}{more}")
    return data


def parse_manifest(path: Path, allow_outside: bool = False) -> tuple[dict[str, Any], list[str]]:
    """``(manifest, problems)``: InputError only when the file cannot be a manifest at all;
    entry problems come back as lines, and an entry path that is refused is set to None."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such manifest") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read manifest ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a JSON manifest (not text)") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: not a manifest (a JSON object with 'labels' and 'training' expected)")
    v2_problems: list[str] = []
    v2 = "training" not in raw and "file_ending" in raw
    if v2:  # nnU-Net v2: the cases are the files
        from pipeline.nnunet_v2 import nnunet_v2_cases

        raw = {**raw, **nnunet_v2_cases(path, raw, v2_problems)}
    for key in ("labels", "training"):
        if key not in raw:
            raise InputError(f"{path}: manifest lacks {key!r}")
    if not isinstance(raw["training"], list) or not isinstance(raw.get("test", []), list):
        raise InputError(f"{path}: 'training' and 'test' must be lists")
    for key in ("modality", "channel_names"):
        if key in raw and not isinstance(raw[key], dict):
            raise InputError(f"{path}: {key!r} must be an object of channel names like {{\"0\": \"CT\"}}, "
                             f"got {raw[key]!r:.40}")
    data = dict(raw)
    data["labels"] = _msd_labels(path, raw["labels"])
    data["manifest_path"] = str(path.resolve())
    allow = allow_outside or raw.get("allow_outside") is True
    root = path.resolve().parent
    problems: list[str] = v2_problems
    for role, keys in (("training", ("image", "label")), ("test", ("image",))):
        entries, seen = [], {}
        for i, entry in enumerate(raw.get(role) or []):
            e = _entry(root, role, i, entry, keys, allow, problems)
            if e["id"] in seen:
                problems.append(f"{role}[{i}] {e['id']}: duplicate id (also {role}[{seen[e['id']]}])")
            seen.setdefault(e["id"], i)
            entries.append(e)
        data[role] = entries
    if isinstance(raw.get("numTraining"), int) and raw["numTraining"] != len(data["training"]):
        found = "'training' has" if not v2 else "'dataset' has" if "dataset" in raw else "imagesTr has"
        problems.append(f"numTraining is {raw['numTraining']} but {found} {len(data['training'])} "
                        f"{'entries' if not v2 else 'cases'}")
    return data, problems


def _msd_labels(path: Path, labels: Any) -> dict[str, str]:
    """MSD {"0": "background"} as is; nnU-Net v2 {"background": 0} turned round. nnU-Net v2's
    regions (a name given a list of values) and ignore label are refused in one line."""
    if not isinstance(labels, dict) or not labels:
        raise InputError(f"{path}: 'labels' must be a non-empty object like {{\"0\": \"background\"}}")
    regions = [k for k, v in labels.items() if isinstance(v, list)]
    if regions:
        raise InputError(f"{path}: label {regions[0]!r} is a region (a list of values, nnU-Net v2's "
                         f"region-based training); segpipe trains one class per label value")
    if "ignore" in labels and isinstance(labels["ignore"], int):
        raise InputError(f"{path}: label 'ignore' (nnU-Net v2's ignore label for sparse annotations) is not "
                         f"supported; every labelled voxel is trained on")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        return {str(v): str(k) for k, v in sorted(labels.items(), key=lambda kv: kv[1])}
    try:
        return {str(int(k)): str(v) for k, v in sorted(labels.items(), key=lambda kv: int(kv[0]))}
    except (TypeError, ValueError):
        raise InputError(f"{path}: 'labels' keys must be label values (\"0\", \"1\", ...); "
                         f"got {list(labels)[:5]}") from None


def _entry(root: Path, role: str, i: int, entry: Any, keys: tuple[str, ...], allow: bool,
           problems: list[str]) -> dict[str, Any]:
    """One entry with its paths resolved; a problem line for each missing or refused path. An
    ``image`` may be a list of paths (one file per channel): each is resolved and checked."""
    e = {"image": entry} if role == "test" and isinstance(entry, str) else dict(entry) if isinstance(entry, dict) else {}
    image = e.get("image")
    named = isinstance(image, str) or (isinstance(image, list) and image and all(isinstance(p, str) for p in image))
    e["id"] = str(e.get("id") or (channel_layout_id(image, e.get("label")) if named else f"#{i}"))
    where = f"{role}[{i}] {e['id']}"
    if not isinstance(entry, (dict, str)):
        problems.append(f"{where}: entry must be an object with {' and '.join(keys)}, got {entry!r:.60}")
    extra = [k for k, v in e.items() if k not in keys and isinstance(v, str) and is_nifti(v)]
    for key in (*keys, *extra):
        value = e.get(key)
        if key == "image" and isinstance(value, list):
            if not value or not all(isinstance(v, str) and v for v in value):
                problems.append(f"{where}: 'image' list must hold one file path per channel, got {value!r:.60}")
                e[key] = None
                continue
            paths = [_resolve(root, v, key, where, allow, problems) for v in value]
            e[key] = None if None in paths else paths
            continue
        if not isinstance(value, str) or not value:
            if isinstance(entry, (dict, str)):
                problems.append(f"{where}: {key!r} must be a file path string, got {value!r:.60}")
            e[key] = None
            continue
        e[key] = _resolve(root, value, key, where, allow, problems)
    return e


def _resolve(root: Path, value: str, key: str, where: str, allow: bool, problems: list[str]) -> str | None:
    """``value`` as an absolute path string (relative ones against ``root``); None, with a
    problem line, when it leaves ``root`` and ``allow`` is not set."""
    p = Path(value).expanduser()
    full = Path(os.path.normpath(p if p.is_absolute() else root / p))
    if not allow:
        try:
            target = full.resolve()
        except (OSError, RuntimeError):  # a symlink loop: it cannot be read, and read_header says why
            target = full
        if not target.is_relative_to(root):
            problems.append(f"{where}: {key} {value!r} resolves to {target}, outside the manifest's "
                            f"folder {root} (set \"allow_outside\": true to allow)")
            return None
    return str(full)


def manifest_hash(manifest: Path) -> str:
    """16 hex digits of the manifest's sha256; for an nnU-Net v2 dataset.json, which lists no cases,
    of the file and the case files found beside it, so that other files make another hash."""
    raw = Path(manifest).read_bytes()
    h = hashlib.sha256(raw)
    try:
        lists_cases = "training" in json.loads(raw)
    except (ValueError, TypeError):
        lists_cases = True
    if not lists_cases:
        data, _ = parse_manifest(Path(manifest), allow_outside=True)
        names = [[e["id"], *(Path(f).name for f in image_files(e.get("image"))), Path(e.get("label") or "").name]
                 for e in data["training"] + data["test"]]
        h.update(json.dumps(names).encode())
    return h.hexdigest()[:16]


def datalist(manifest: Path | str, role: str = "train", fold: int = 0, folds: int = 5,
             seed: int = 0, splits: Path | str | None = None) -> list[dict[str, Any]]:
    """Items ``{"image", "label", "id", ...extra entry keys}`` (absolute paths) for a role:
    "train"/"val" of ``fold`` of ``folds``, "all" (every training entry) or "test". With
    ``folds <= 1``, "train" is every training entry and "val" is empty. The folds come from
    ``splits`` (a splits file, e.g. a planned bundle's own) or else ``splits.json`` beside the
    manifest, when it matches k, seed and the ids; otherwise they are computed the same way
    (``pipeline.splits.split_file``)."""
    from pipeline.splits import group_splits, split_file  # splits reads manifests: imported here

    path = Path(manifest)
    data = load_manifest(path)
    if role == "test":
        return [_item(e) for e in data["test"]]
    entries = data["training"]
    if role == "all" or (folds <= 1 and role == "train"):
        return [_item(e) for e in entries]
    if role not in ("train", "val"):
        raise UsageError(f"datalist role must be train, val, all or test, got {role!r}")
    if folds <= 1:
        return []
    if not 0 <= fold < folds:
        raise UsageError(f"fold {fold} is not in 0..{folds - 1}")
    split, _ = split_file(path, folds, seed, {e["id"] for e in entries}, splits)
    if split is None:
        split = group_splits(path, entries, folds, seed)
    wanted = set(split[fold][role])
    return [_item(e) for e in entries if e["id"] in wanted]


def _item(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in _SPLIT_KEYS}
