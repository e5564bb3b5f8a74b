"""`segpipe export-ensemble`: a cross-validation's fold models into its bundle, as one ensemble.

``export_ensemble`` copies the fold weights into the bundle (``models/fold_<k>.pt``), lists them in
its metadata with the out-of-fold figures and makes them the bundle's default predictor (``folds``
in common.json) with the post-processing the cross-validation chose (``postprocess`` in
inference.json). It refuses, before writing anything, a result that is not a crossval's, folds of
another network, and folds trained with ``--set`` values of inference ids the bundle lacks.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.crossval import RESULT_FILE, SPLIT_IDS, TRAINED_FILE
from pipeline.errors import InputError, UsageError, first_line
from pipeline.fileio import atomic_path

log = logging.getLogger(__name__)


def export_ensemble(bundle_dir: Path, crossval_dir: Path, folds: list[int] | None = None) -> list[Path]:
    """Copy the folds' ``model.pt`` into ``bundle/models/fold_<k>.pt``, check they are one
    network, list them in ``metadata.json`` (with the out-of-fold summary) and make them the
    bundle's default predictor (``folds`` in common.json) with the chosen post-processing
    (``postprocess`` in inference.json). Nothing is written unless every fold is there and fits."""
    from pipeline.bundle import get, load_bundle
    from pipeline.predict_io import load_weights

    bundle_dir, crossval_dir = Path(bundle_dir), Path(crossval_dir)
    result_file = crossval_dir / RESULT_FILE
    if not result_file.is_file():
        raise InputError(f"{result_file}: no cross-validation result; run segpipe crossval first")
    try:  # everything read and checked before anything is written
        result = json.loads(result_file.read_text())
        chosen = sorted(set(folds)) if folds else list(range(int(result["folds"])))
        summary, pp = result["summary"], result["postprocessing"]
        ensemble = {"folds": chosen, "weights": [f"models/fold_{k}.pt" for k in chosen],
                    "crossval": {"mean_dice": summary["mean_dice"], "cases": result["cases_scored"],
                                 "dice": {c: v["mean"] for c, v in summary["dice"].items()},
                                 "postprocessing": pp["chosen"],
                                 "mean_dice_postprocessed": pp.get("summary", {}).get("mean_dice", summary["mean_dice"])}}
        postprocess = {"keep_largest": [], "fill_holes": [], **pp["postprocess"]}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{result_file}: not a segpipe crossval result ({type(e).__name__}: {first_line(e)})") from None
    if result["cases_scored"] < result.get("cases_total", result["cases_scored"]):
        log.warning("%s: only %s of %s cases scored; the bundle's out-of-fold figures and post-processing rest on "
                    "those", result_file, result["cases_scored"], result["cases_total"])
    ensemble["crossval"]["cases_total"] = result.get("cases_total", result["cases_scored"])
    sources = [crossval_dir / f"fold_{k}" / "model.pt" for k in chosen]
    parser = load_bundle(bundle_dir, ("common.json", "inference.json"))
    for k in chosen:
        _check_trained_settings(parser, crossval_dir / f"fold_{k}" / TRAINED_FILE, bundle_dir)
    network = get(parser, "network_def")
    for src in sources:
        load_weights(network, src)  # missing, or another network: one line naming the file
    meta_file = bundle_dir / "configs" / "metadata.json"
    meta = {**json.loads(meta_file.read_text()), "ensemble": ensemble}  # load_bundle has parsed it
    configs = {meta_file: json.dumps(meta, indent=2) + "\n",
               bundle_dir / "configs" / "common.json": _config_with_value(bundle_dir / "configs" / "common.json",
                                                                        "folds", chosen),
               bundle_dir / "configs" / "inference.json": _config_with_value(
                   bundle_dir / "configs" / "inference.json", "postprocess", postprocess)}
    dests = []
    (bundle_dir / "models").mkdir(exist_ok=True)  # a planned bundle has none before its first weights
    for k, src in zip(chosen, sources, strict=True):
        dest = bundle_dir / "models" / f"fold_{k}.pt"
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        dests.append(dest)
    for path, text in configs.items():
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    for old in (bundle_dir / "models").glob("fold_*.pt"):  # an earlier export's folds not in this one
        if old not in dests:
            old.unlink()
            log.info("removed %s: not a fold of this export", old)
    log.info("exported folds %s of %s into %s", chosen, crossval_dir, bundle_dir / "models")
    return dests


def _check_trained_settings(parser: Any, trained_file: Path, bundle_dir: Path) -> None:
    """UsageError when a fold was trained with a ``--set`` value of an id the bundle's inference
    reads (common.json, inference.json) that the bundle does not hold: its ensemble would predict
    at other settings (another spacing, window or network) than its members learnt. Ids that only
    steer a run (``pipeline.checkpoints.RESUMABLE_CHANGES``) do not count."""
    from pipeline.checkpoints import RESUMABLE_CHANGES

    try:
        overrides = json.loads(trained_file.read_text()).get("overrides") or {}
    except (OSError, ValueError, AttributeError):
        return  # a fold carried in without its record: nothing to compare (the weights are still checked)
    for key, value in overrides.items():
        if key in RESUMABLE_CHANGES or key in SPLIT_IDS or key not in parser:
            continue  # a run-control, split or training-only id
        own = parser.get_parsed_content(key, instantiate=False)  # references resolved ("@features")
        if json.dumps(own, sort_keys=True, default=str) != json.dumps(value, sort_keys=True, default=str):
            raise UsageError(f"{trained_file}: this fold was trained with --set {key}={json.dumps(value)} and "
                             f"{bundle_dir}/configs says {json.dumps(own, default=str)[:60]}; set the fold's value "
                             "in the bundle first, or its ensemble would predict with settings its members did not "
                             "learn")


def _config_with_value(path: Path, key: str, value: Any) -> str:
    """The config's text with its one-line top-level ``"key": ...`` entry replaced, layout kept."""
    text = path.read_text()
    pattern = re.compile(rf'^(  "{re.escape(key)}": ).*?(,?)$', re.MULTILINE)
    new, n = pattern.subn(lambda mt: f"{mt.group(1)}{json.dumps(value)}{mt.group(2)}", text, count=1)
    if n != 1 or json.loads(new).get(key) != value:
        raise UsageError(f"{path}: cannot set {key!r} (expected a one-line top-level entry)")
    return new
