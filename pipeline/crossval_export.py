"""`segpipe export-ensemble`: a cross-validation's fold models into its bundle, as one ensemble.

``export_ensemble`` copies the fold weights into the bundle (``models/fold_<k>.pt``), lists them in
its metadata with the out-of-fold figures and makes them the bundle's default predictor (``folds``
in common.json) with the post-processing the cross-validation chose (``postprocess`` in
inference.json). It refuses, before writing anything, a result that is not a crossval's, a fold
it does not have, folds of another network, folds trained with ``--set`` values of inference ids
the bundle lacks or with another network definition, preprocessing or labels than the bundle's
(their ``config_resolved.json``), and a fold whose ``model.pt`` is not the one ``crossval.json``
scored. The files are then written all or nothing: each staged as a temp file beside its target,
and all renamed into place once every one is written.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.bundle import settings_not_in_bundle
from pipeline.crossval import SPLIT_IDS, TRAINED_FILE
from pipeline.crossval_score import RESULT_FILE, model_digest
from pipeline.errors import InputError, UsageError, first_line
from pipeline.fileio import temp_prefix
from pipeline.plan_docs import docs_with_status

log = logging.getLogger(__name__)

#: what a fold's weights mean: its network, what is done to an image before it (orientation,
#: spacing, intensity normalisation) and its classes; a bundle that says otherwise predicts wrongly
MEANING_IDS = ("network_def", "preprocessing", "label_names")


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
    bad = [k for k in chosen if not 0 <= k < int(result["folds"])]
    if bad:
        raise UsageError(f"--fold {bad[0]}: not among the cross-validation's folds 0..{int(result['folds']) - 1} "
                         f"({result_file})")
    sources = [crossval_dir / f"fold_{k}" / "model.pt" for k in chosen]
    parser = load_bundle(bundle_dir, ("common.json", "inference.json"))
    problems = {k: [p for p in (_trained_settings_problem(parser, crossval_dir / f"fold_{k}" / TRAINED_FILE, bundle_dir),
                               _trained_config_problem(parser, crossval_dir / f"fold_{k}" / "config_resolved.json",
                                                       bundle_dir)) if p] for k in chosen}
    bad = [k for k in chosen if problems[k]]
    if bad:  # every problem of the first such fold at once, and which other folds have some
        others = f" (folds {', '.join(map(str, bad[1:]))} too)" if bad[1:] else ""
        raise UsageError("; ".join(problems[bad[0]]) + others)
    network = get(parser, "network_def")
    for k, src in zip(chosen, sources, strict=True):
        if not src.is_file():
            raise InputError(f"{src}: fold {k} has no trained weights; run segpipe crossval (--fold {k}) first")
        load_weights(network, src)  # another network: one line naming the file
        _check_scored(result, crossval_dir, k, src)
    meta_file = bundle_dir / "configs" / "metadata.json"
    meta = {**json.loads(meta_file.read_text()), "ensemble": ensemble}  # load_bundle has parsed it
    texts = {meta_file: json.dumps(meta, indent=2) + "\n",
             bundle_dir / "configs" / "common.json": _config_with_value(bundle_dir / "configs" / "common.json",
                                                                      "folds", chosen),
             bundle_dir / "configs" / "inference.json": _config_with_value(
                 bundle_dir / "configs" / "inference.json", "postprocess", postprocess),
             **docs_with_status(bundle_dir, _status(ensemble["crossval"], chosen, crossval_dir))}
    models = bundle_dir / "models"
    dests = [models / f"fold_{k}.pt" for k in chosen]
    writers: dict[Path, Callable[[Path], Any]] = {
        dest: lambda tmp, src=src: shutil.copyfile(src, tmp) for dest, src in zip(dests, sources, strict=True)}
    writers.update({path: lambda tmp, text=text: tmp.write_text(text, encoding="utf-8", newline="") for path, text in texts.items()})
    created = not models.is_dir()
    models.mkdir(exist_ok=True)  # a planned bundle has none before its first weights
    try:
        _write_all(writers)
    except BaseException:
        if created and not any(models.iterdir()):
            models.rmdir()
        raise
    for old in models.glob("fold_*.pt"):  # an earlier export's folds not in this one
        if old not in dests:
            old.unlink()
            log.info("removed %s: not a fold of this export", old)
    log.info("exported folds %s of %s into %s", chosen, crossval_dir, models)
    return dests


def _status(cv: dict[str, Any], chosen: list[int], crossval_dir: Path) -> str:
    """The docs' weights status of an exported ensemble (``pipeline.plan_docs.status_after_export``)."""
    return (f"**Status: the {len(chosen)}-fold ensemble** of `segpipe crossval` in `{crossval_dir}`, exported "
            f"{time.strftime('%Y-%m-%d %H:%M')} by `segpipe export-ensemble`: `models/fold_<k>.pt` for folds "
            f"{', '.join(map(str, chosen))}, whose probabilities `segpipe predict` averages (`--set 'folds=[0]'` "
            f"predicts with one). Out-of-fold mean Dice {cv['mean_dice']:.4f} over {cv['cases']} of "
            f"{cv['cases_total']} cases; with the post-processing chosen on those masks ({cv['postprocessing']}, "
            f"on in `configs/inference.json`) {cv['mean_dice_postprocessed']:.4f}. Per class: "
            f"`configs/metadata.json` (`ensemble`).")


def _write_all(writers: dict[Path, Callable[[Path], Any]]) -> None:
    """``writers[path](tmp)`` writes each file's content to a temp name beside ``path``; once every
    one is written they are renamed onto their paths. A failure anywhere leaves every path as it
    was (those already replaced are put back from hard links to their old content) and no temp
    file behind; a failed write is an InputError naming the file."""
    staged: dict[Path, Path] = {}
    kept: dict[Path, Path] = {}
    done: list[Path] = []
    try:
        for path, write in writers.items():
            staged[path] = path.with_name(f"{temp_prefix()}{path.name}")
            try:
                write(staged[path])
            except OSError as e:
                raise InputError(f"{path}: cannot write ({e.strerror or first_line(e)}); the bundle is left as "
                                 "it was") from None
        for path in writers:
            if path.exists():
                kept[path] = path.with_name(f"{temp_prefix()}old-{path.name}")
                try:
                    os.link(path, kept[path])
                except OSError:  # a file system without hard links
                    shutil.copyfile(path, kept[path])
        for path, tmp in staged.items():
            os.replace(tmp, path)
            done.append(path)
    except BaseException:
        for path in reversed(done):
            if path in kept:
                os.replace(kept[path], path)
            else:
                path.unlink(missing_ok=True)
        raise
    finally:
        for tmp in [*staged.values(), *kept.values()]:
            tmp.unlink(missing_ok=True)


def _check_scored(result: dict[str, Any], crossval_dir: Path, k: int, weights: Path) -> None:
    """InputError when fold ``k``'s ``model.pt`` is not the model whose out-of-fold masks
    ``crossval.json`` scored (its ``model_sha256``; for a result from before it recorded them, the
    masks' stamp): the fold was trained again since, perhaps killed halfway, and the bundle's
    figures would be of other weights."""
    recorded = result.get("model_sha256")
    if isinstance(recorded, dict):
        scored = recorded.get(str(k))
    else:
        try:
            scored = (crossval_dir / "oof" / f".fold_{k}.model").read_text().strip()
        except OSError:  # e.g. a result committed without its out-of-fold masks: nothing to check against
            log.warning("%s: from before it recorded its models, and no stamp of fold %d's masks: cannot check "
                        "that %s is the model it scored", crossval_dir / RESULT_FILE, k, weights)
            return
    if scored != model_digest(weights):
        raise InputError(f"{weights}: not the model of fold {k} that {crossval_dir / RESULT_FILE} scored (its "
                         "out-of-fold predictions were made with other weights, or none); rerun segpipe crossval")


def _trained_config_problem(parser: Any, config_file: Path, bundle_dir: Path) -> str | None:
    """What is wrong when a fold was trained (its ``config_resolved.json``) with another value of an id
    in ``MEANING_IDS`` than the bundle's inference has, compared with references resolved
    (``@features`` and ``network_def#features`` alike; ``pipeline.checkpoints._text``; ``$``
    expressions as text): the weights load, and predict wrongly. Run-control and split ids take the
    bundle's values first, so a moved bundle or another device does not count."""
    from monai.bundle import ConfigParser

    from pipeline.checkpoints import RESUMABLE_CHANGES, _text, first_difference

    try:
        saved = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None  # a fold carried in without it: nothing to compare (the weights are still checked)
    if not isinstance(saved, dict):
        return None
    bundle = ConfigParser(copy.deepcopy(parser.get()))
    trained = ConfigParser(saved)
    for key in (RESUMABLE_CHANGES | SPLIT_IDS) - {"_meta_"}:
        if key in bundle and key in trained:
            trained[key] = bundle.get(key)
    differ = []
    for key in MEANING_IDS:
        if key not in bundle or key not in trained:
            continue
        old, new = _plain(trained, trained.get(key)), _plain(bundle, bundle.get(key))
        if _text(old) != _text(new):
            differ.append((key, first_difference(key, old, new)))
    if not differ:  # else every one at once: a fix per export run, one at a time, was the old way
        return None
    return (f"{config_file}: this fold was trained with another {', '.join(k for k, _ in differ)} than "
            f"{bundle_dir}/configs has ({'; '.join(d for _, d in differ)}); export into a bundle with its settings")


def _plain(parser: Any, value: Any, seen: tuple[str, ...] = ()) -> Any:
    """``value`` with every ``@id`` reference replaced by that id's value, recursively; nothing is
    evaluated or built (``$`` expressions stay text)."""
    if isinstance(value, str) and value.startswith("@") and value[1:] in parser and value[1:] not in seen:
        return _plain(parser, parser.get(value[1:]), (*seen, value[1:]))
    if isinstance(value, dict):
        return {k: _plain(parser, v, seen) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(parser, v, seen) for v in value]
    return value


def _trained_settings_problem(parser: Any, trained_file: Path, bundle_dir: Path) -> str | None:
    """What is wrong when a fold was trained with a ``--set`` value of an id the bundle's inference
    reads (common.json, inference.json) that the bundle does not hold: its ensemble would predict
    at other settings (another spacing, window or network) than its members learnt. Ids that only
    steer a run (``pipeline.checkpoints.RESUMABLE_CHANGES``) do not count."""
    from pipeline.checkpoints import RESUMABLE_CHANGES

    try:
        overrides = json.loads(trained_file.read_text()).get("overrides") or {}
    except (OSError, ValueError, AttributeError):
        return None  # a fold carried in without its record: nothing to compare (the weights are still checked)
    differ = settings_not_in_bundle(parser, overrides, RESUMABLE_CHANGES | SPLIT_IDS)  # not run-control or split ids
    if not differ:  # else every one at once, not one per export run
        return None
    return (f"{trained_file}: this fold was trained with {' '.join(a for a, _ in differ)} and {bundle_dir}/configs "
            f"says {', '.join(b for _, b in differ)}; set the fold's values in the bundle first, or its ensemble "
            "would predict with settings its members did not learn")


def _config_with_value(path: Path, key: str, value: Any) -> str:
    """The config's text with its one-line top-level ``"key": ...`` entry replaced, layout kept."""
    text = path.read_text()
    pattern = re.compile(rf'^(  "{re.escape(key)}": ).*?(,?)$', re.MULTILINE)
    new, n = pattern.subn(lambda mt: f"{mt.group(1)}{json.dumps(value)}{mt.group(2)}", text, count=1)
    if n != 1 or json.loads(new).get(key) != value:
        raise UsageError(f"{path}: cannot set {key!r} (expected a one-line top-level entry)")
    return new
