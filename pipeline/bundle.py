"""The one place bundles are parsed: configs merged in order, ids overridden, errors made plain.

A bundle is a MONAI bundle folder: ``configs/metadata.json``, ``configs/common.json`` shared by
``train.json``, ``inference.json`` and ``evaluate.json``, ``models/model.pt`` for weights.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, SegpipeError, UsageError, first_line

log = logging.getLogger(__name__)


def bundle_metadata(bundle_dir: Path) -> dict[str, Any]:
    """Read ``configs/metadata.json``; a folder without it is not a bundle (UsageError)."""
    meta = Path(bundle_dir) / "configs" / "metadata.json"
    if not meta.is_file():
        raise UsageError(f"{bundle_dir}: not a bundle (no configs/metadata.json)")
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{meta}: not valid JSON ({e.msg}, line {e.lineno})") from None


def load_bundle(bundle_dir: Path, configs: Iterable[str] = ("common.json", "train.json"),
                overrides: dict[str, Any] | None = None) -> Any:
    """Return a ``monai.bundle.ConfigParser`` over the bundle's configs, with ``bundle_root`` set
    to the bundle folder and ``overrides`` applied. An override of an id that none of the configs
    defines is a UsageError (a typo would otherwise be silently ignored)."""
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir).resolve()
    meta = bundle_metadata(bundle_dir)
    files = []
    for name in configs:
        f = bundle_dir / "configs" / name
        if not f.is_file():
            raise UsageError(f"{bundle_dir}: no configs/{name}")
        files.append(f)
    parser = ConfigParser()
    try:
        parser.read_config(files)
    except (json.JSONDecodeError, ValueError) as e:
        raise InputError(f"{bundle_dir}: a config is not valid JSON: {e}") from None
    parser.read_meta(bundle_dir / "configs" / "metadata.json")
    parser["bundle_root"] = str(bundle_dir)
    for key, value in (overrides or {}).items():
        if key not in parser:
            raise UsageError(f"--set {key}: no such id in {bundle_dir.name} ({', '.join(configs)})")
        problem = override_problem(parser[key], value)
        if problem:
            raise UsageError(f"--set {key}={value}: {problem}")
        parser[key] = value
    log.debug("loaded bundle %s %s from %s", meta.get("name", bundle_dir.name), meta.get("version"), bundle_dir)
    return parser


#: what a mistyped boolean looks like: a string close to one of these is no setting's value
_BOOLEAN_WORDS = ("true", "false", "yes", "no", "none", "null", "on", "off")


def override_problem(current: Any, value: Any) -> str | None:
    """Why ``value`` cannot replace the bundle's ``current`` value of an id, where the types say so
    plainly; None otherwise. A string that is a config expression or reference (``$``, ``@``, ``%``)
    and an id whose value is one are never judged (their type is known only when built). Judged:
    a boolean-like word for a boolean (``False``, ``fasle``: JSON writes ``false``, and any other
    string is truthy), a plain string for a list or an object, a string that starts as a number
    for a number (``1e-3x``; words such as ``auto`` stay allowed)."""
    if not isinstance(value, str) or value[:1] in "$@%" or (isinstance(current, str) and current[:1] in "$@%"):
        return None
    if isinstance(current, bool):
        if difflib.get_close_matches(value.lower(), _BOOLEAN_WORDS, n=1, cutoff=0.6):
            return "expects true or false (JSON: lower case)"
    elif isinstance(current, (list, tuple)):
        return "expects a list, e.g. [1, 2] (JSON)"
    elif isinstance(current, dict):
        return "expects an object, e.g. {\"key\": 1} (JSON)"
    elif isinstance(current, (int, float)) and re.match(r"\s*[-+.]?\d", value):
        return "expects a number (JSON: 0.001 or 1e-3)"
    return None


def settings_not_in_bundle(parser: Any, overrides: dict[str, Any], ignore: Iterable[str] = ()) -> list[tuple[str, str]]:
    """``(--set id=value, "id <the bundle's value>")`` for every override that ``parser`` (the
    bundle's own configs, no overrides) holds with another value: weights trained with them would
    be predicted at settings they did not learn. Ids ``parser`` lacks (training only) and those in
    ``ignore`` do not count."""
    differ, skip = [], set(ignore)
    for key, value in overrides.items():
        if key in skip or key not in parser:
            continue
        own = parser.get_parsed_content(key, instantiate=False)  # references resolved ("@features")
        if json.dumps(own, sort_keys=True, default=str) != json.dumps(value, sort_keys=True, default=str):
            differ.append((f"--set {key}={json.dumps(value)}", f"{key} {json.dumps(own, default=str)[:60]}"))
    return differ


def get(parser: Any, id: str, bundle_dir: Path | str = "") -> Any:
    """Instantiate one id, turning MONAI's long config errors into one line naming the id."""
    if id not in parser:
        raise UsageError(f"{bundle_dir or 'bundle'}: config has no id {id!r}")
    try:
        return parser.get_parsed_content(id, instantiate=True)
    except Exception as e:  # MONAI wraps the real cause in long multi-line messages
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        if isinstance(root, SegpipeError):  # already one line naming the file (e.g. missing weights)
            raise root from e
        reason = f"{type(root).__name__}: {first_line(root)}" if str(root).strip() else type(root).__name__
        raise InputError(f"{bundle_dir or 'bundle'}: cannot build {id!r}: {reason}") from e
