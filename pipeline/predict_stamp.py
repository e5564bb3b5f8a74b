"""Which model made an output folder's masks: a prediction run's identity and the folder's stamp.

:func:`model_identity` names the model a run predicts with (the sha256 of every weights file it
loads, the bundle's name and version, the settings that change masks), and :func:`record_model`
adds it to ``OUTPUT/.segpipe_model.json`` before the first mask is written; each report row's
``model`` column names the model that made that study's files (``pipeline.predict`` decides from
them what a rerun skips and what it predicts again).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import first_line
from pipeline.fileio import atomic_path, locked

log = logging.getLogger(__name__)


STAMP = ".segpipe_model.json"
#: the ``model`` of outputs no model is recorded for (made by a segpipe that did not record models)
UNKNOWN = "unknown"
#: the ids the masks are made by: these and every id they refer to are a model's settings ...
MASK_ROOTS = ("network_def", "preprocessing", "inferer", "postprocessing", "label_names")
#: ... except where files are, where it runs and how fast (the weights themselves are hashed)
NOT_MASK_SETTINGS = frozenset({
    "bundle_root", "output_dir", "dataset_dir", "manifest", "input", "datalist", "dataset", "dataloader",
    "prediction_dir", "device", "model_path", "folds", "weights", "predictor", "network", "sw_batch_size",
    "compile", "max_voxels", "handlers", "evaluator", "run", "initialize", "imports"})
_REF = re.compile(r"@([A-Za-z_][\w]*)")  # "@id", "@id#key", "$... @id.attr": the top-level id


def mask_settings(parser: Any) -> dict[str, Any]:
    """The raw values (``--set`` applied) of the ids that decide the masks: ``MASK_ROOTS`` and every
    id they refer to, transitively (tta, tta_axes, tiling, margin, pixdim, the intensity window,
    postprocess, amp ...), less ``NOT_MASK_SETTINGS``. Raw, not evaluated: the same text in
    another copy of the bundle is the same setting."""
    return referenced(parser, MASK_ROOTS)


def referenced(parser: Any, roots: Sequence[str]) -> dict[str, Any]:
    """The raw values of ``roots`` and of every id they refer to, transitively, less
    ``NOT_MASK_SETTINGS``."""
    settings: dict[str, Any] = {}
    todo = list(roots)
    while todo:
        key = todo.pop()
        if key in settings or key in NOT_MASK_SETTINGS or key not in parser:
            continue
        settings[key] = parser.get(key)
        todo += _REF.findall(json.dumps(settings[key], default=str))
    return settings


def file_sha256(path: Path) -> str:
    """The file's sha256 (hex), read in 1 MiB blocks (``hashlib.file_digest`` is Python 3.11+)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**20):
            h.update(block)
    return h.hexdigest()


def model_identity(metadata: dict[str, Any], weights: Sequence[Path], settings: dict[str, Any]) -> dict[str, Any]:
    """The model a prediction run uses: ``bundle`` (name, version from metadata.json), ``weights``
    (each file loaded and its sha256; the order of an ensemble's folds does not matter),
    ``settings`` (:func:`mask_settings`) and their sha256, and ``id``, 12 hex digits of a hash of
    all but the files' paths: moving a bundle keeps its id, other weights or settings change it."""
    weights = [{"file": str(Path(p).resolve()), "sha256": file_sha256(Path(p))} for p in weights]
    bundle = {"name": metadata.get("name"), "version": metadata.get("version")}
    settings_sha256 = hashlib.sha256(_canonical(settings).encode()).hexdigest()
    key = _canonical({"bundle": bundle, "weights": sorted(w["sha256"] for w in weights),
                      "settings": settings_sha256})
    return {"id": hashlib.sha256(key.encode()).hexdigest()[:12], "bundle": bundle, "weights": weights,
            "settings_sha256": settings_sha256, "settings": settings}


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def model_difference(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """What differs between two :func:`model_identity` records, in words: "other weights",
    "other settings: tta, tta_axes", "bundle phantom_ct_3d 0.3.0"."""
    if not old:
        return "another model (not in " + STAMP + ")"
    parts = []
    if old.get("bundle") != new["bundle"]:
        b = old.get("bundle") or {}
        parts.append(f"bundle {b.get('name')} {b.get('version')}")
    if sorted(w.get("sha256") for w in old.get("weights", [])) != sorted(w["sha256"] for w in new["weights"]):
        parts.append("other weights")
    if old.get("settings_sha256") != new["settings_sha256"]:
        a, b = old.get("settings") or {}, new["settings"]
        keys = sorted(k for k in set(a) | set(b) if _canonical(a.get(k)) != _canonical(b.get(k)))
        parts.append("other settings: " + ", ".join(keys) if keys else "other settings")
    return "; ".join(parts) or "another model"


def read_stamp(out_dir: Path) -> dict[str, Any] | None:
    """``OUTPUT/.segpipe_model.json``: ``{"models": {id: identity}, "unattributed": bool}``, or None
    where there is none (a new folder, or one an older segpipe wrote). One that cannot be read
    says outputs cannot be attributed (logged)."""
    f = Path(out_dir) / STAMP
    try:
        stamp = json.loads(f.read_text())
        if not isinstance(stamp, dict) or not isinstance(stamp.get("models"), dict):
            raise ValueError("no models")
        return stamp
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); masks without a report row are kept as of an unknown model", f,
                    first_line(e))
        return {"models": {}, "unattributed": True}


def record_model(out_dir: Path, identity: dict[str, Any], unattributed: bool = False) -> Path:
    """Add ``identity`` to the folder's stamp (``unattributed``: the folder also holds outputs of
    no known model), merged under the report's lock and written atomically, so shards and other
    models writing into one folder keep each other's entries. Call before the first mask."""
    out_dir = Path(out_dir)
    with locked(out_dir / ".report.lock"):
        stamp = read_stamp(out_dir) or {"models": {}}
        if identity["id"] in stamp["models"] and (stamp.get("unattributed") or not unattributed):
            return out_dir / STAMP
        when = datetime.datetime.now().isoformat(timespec="seconds")
        stamp["models"][identity["id"]] = stamp["models"].get(identity["id"]) or {**identity, "recorded": when}
        stamp["unattributed"] = bool(stamp.get("unattributed") or unattributed)
        with atomic_path(out_dir / STAMP) as tmp:
            tmp.write_text(json.dumps(stamp, indent=1, default=str) + "\n")
    return out_dir / STAMP
