"""`segpipe crossval`: k-fold cross-validation of a bundle, out-of-fold estimates, the ensemble.

``crossval(bundle, manifest, folds=5)`` trains every fold of the manifest's patient-grouped
split (``splits.json`` beside the manifest when present, else the same split computed from the
bundle's seed; it is recorded in the output folder) with ``pipeline.train.train_bundle`` into
``OUT/fold_<k>`` (``OUT`` is the bundle's ``output_dir`` + ``/crossval`` unless given). Each fold
resumes on its own: a rerun skips finished folds and continues an interrupted one, and ``--fold
K`` runs one fold alone (a cluster's scheduler, or several GPUs, run folds side by side). A
finished fold leaves ``fold_<k>/trained.json`` beside its ``model.pt``: those two files (and the
out-of-fold masks) are all a later run needs, so the checkpoints of finished folds may be deleted
and the folds carried to another machine or session.

Then every validation case is predicted by the model that did not see it (``OUT/oof/<id>.nii.gz``,
the bundle's own inference path; stamped with the sha256 of the fold's model.pt, so a fold
trained again is predicted again) and scored against its label: ``OUT/crossval.json`` holds Dice
and HD95 per case, per fold and over all cases (mean, sd), the sha256 of each scored fold's
model.pt (``model_sha256``: export-ensemble ships only those weights), and the post-processing chosen on
those out-of-fold masks as nnU-Net does: keeping the largest connected component of all
foreground, or of each class, is switched on only where it raises the out-of-fold mean Dice, and
per class only for the classes whose Dice it raises (``choose_postprocessing``; ``postprocessing``:
each candidate's Dice, and the chosen one's Dice and HD95 per case, over all cases and per fold).

MLflow: one parent run (``crossval-<bundle>-<output folder>-<date>-<time>``) with a nested child
run per fold (the folds' training runs, ``<output folder>-fold<k>-<date>-<time>``): two
cross-validations of one bundle are told apart by their ``--output`` folders. The parent holds
the key parameters (``parent_params``), the manifest as its dataset input and the out-of-fold
summary in the ``oof/`` section (``pipeline.crossval_score.mlflow_metrics``).
``pipeline.crossval_export`` copies the fold weights into the bundle; ``pipeline.crossval_score``
scores the masks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.crossval_score import (
    RESULT_FILE,
    SECTION,
    mlflow_metrics,
    model_digest,
    postprocess_options,
    read_stamp,
    score,
)
from pipeline.errors import InputError, UsageError
from pipeline.fileio import atomic_path, locked
from pipeline.splits import SPLITS_FILE

log = logging.getLogger(__name__)

TRAINED_FILE = "trained.json"
LOCK_FILE = ".crossval.lock"
#: ids of the split and of which weights predict: a fold's own values of these are not the bundle's
SPLIT_IDS = frozenset({"fold", "num_folds", "seed", "splits_file", "folds", "model_path"})


# -- the split --------------------------------------------------------------------------------------
def fold_cases(manifest: Path, folds: int, seed: int, splits: Path | str | None = None) -> list[list[str]]:
    """The validation case ids of each fold, as training will see them (``pipeline.manifest.datalist``
    with the bundle's ``splits_file``, ``splits``, where it declares one). Refused in one line: fewer
    patients than folds, a splits file training would read that is not this manifest's split into
    ``folds`` folds with ``seed`` (``pipeline.splits.split_file``, strict), and a split where a fold
    has no validation cases, a case is validated by two folds or by none (it would have no
    out-of-fold prediction)."""
    from pipeline.manifest import datalist, load_manifest
    from pipeline.splits import group_key, split_file

    entries = load_manifest(manifest)["training"]
    groups = {group_key(e) for e in entries}  # as the split groups them: patient 0 is a patient
    if folds < 2:
        raise UsageError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if folds > len(groups):
        raise UsageError(f"--folds {folds}: {manifest} has only {len(groups)} patients")
    ids = {e["id"] for e in entries}
    _, source = split_file(manifest, folds, seed, ids, splits, strict=True)
    where = source or manifest
    cases = [[e["id"] for e in datalist(manifest, "val", k, folds, seed, splits)] for k in range(folds)]
    empty = [k for k, val in enumerate(cases) if not val]
    if empty:  # trained, then never scored
        raise InputError(f"{where}: fold {empty[0]} has no validation cases; every fold of a cross-validation "
                         "needs some")
    seen: dict[str, int] = {}
    for k, val in enumerate(cases):  # each case validated by exactly one fold: its out-of-fold prediction
        for i in val:
            if i in seen:
                raise InputError(f"{where}: case {i} is in the validation cases of folds {seen[i]} and {k}; "
                                 "a cross-validation's validation sets must not overlap")
            seen[i] = k
    uncovered = sorted(ids - set(seen))
    if uncovered:
        raise InputError(f"{where}: case {', '.join(uncovered[:3])} in no fold's validation cases "
                         f"({len(uncovered)} such); every case needs its out-of-fold prediction")
    return cases


# -- the folds ---------------------------------------------------------------------------------------
def crossval(bundle_dir: Path, manifest: Path, folds: int = 5, fold_ids: list[int] | None = None,
             epochs: int | None = None, output_dir: Path | None = None, tracking_uri: str | None = None,
             device: str | None = None, overrides: dict[str, Any] | None = None, verbose: bool = False,
             progress: bool = False, export: bool = False) -> dict[str, Any]:
    """Train the chosen folds (all by default), predict their validation cases, score every
    out-of-fold case there is so far; return (and write) the ``crossval.json`` summary. With
    ``export``, once every case is scored, ``export_ensemble`` (its paths in ``result["exported"]``;
    empty while folds run side by side are unfinished, so the last one to finish exports)."""
    from pipeline.bundle import bundle_metadata, load_bundle
    from pipeline.manifest import manifest_hash
    from pipeline.run_tags import git_commit, run_name, standard_tags
    from pipeline.time_budget import budget_minutes
    from pipeline.tracking import open_tracker
    from pipeline.train import train_bundle
    from pipeline.validation import require_valid

    bundle_dir, manifest = Path(bundle_dir), Path(manifest).resolve()
    overrides = dict(overrides or {})
    parser = load_bundle(bundle_dir, ("common.json", "train.json"), overrides)
    missing = [k for k in ("seed", "output_dir") if k not in parser]
    if missing:
        raise UsageError(f"{bundle_dir}: the training configs lack id(s) {', '.join(missing)}")
    require_valid(manifest)  # bad data: one line, and no output folder, split or MLflow run made for it
    seed = int(parser.get_parsed_content("seed"))
    asked = {"max_epochs": int(epochs or parser.get_parsed_content("max_epochs")),  # what a finished fold had
             "time_budget_min": budget_minutes(parser.get_parsed_content("time_budget_min"))
             if "time_budget_min" in parser else 0.0}
    # the split training reads: a planned bundle's own splits.json (its splits_file), else the manifest's
    splits = parser.get_parsed_content("splits_file") if "splits_file" in parser else None
    cases = fold_cases(manifest, folds, seed, splits)
    chosen = list(range(folds)) if not fold_ids else sorted(set(fold_ids))
    bad = [k for k in chosen if not 0 <= k < folds]
    if bad:
        raise UsageError(f"--fold {bad[0]}: the split has folds 0..{folds - 1}")
    out = Path(output_dir or Path(parser.get_parsed_content("output_dir")) / "crossval").resolve()
    out.mkdir(parents=True, exist_ok=True)
    meta = bundle_metadata(bundle_dir)
    name, version = meta.get("name", bundle_dir.name), meta.get("version")
    for k in chosen:  # folds carried in from another cross-validation: refused before anything is written
        _check_fold_split(out / f"fold_{k}", k, cases[k])
    with locked(out / LOCK_FILE):  # folds started side by side into one folder share one parent run
        _record_split(out, manifest, folds, seed, cases)
        parent = open_tracker(tracking_uri, name, out / "metrics.jsonl", out / "mlflow_run.json", resume=True,
                              run_name=run_name(f"crossval-{name}-{out.name}", None))
        digest, commit = manifest_hash(manifest), git_commit()
        parent.set_tags({"crossval": "parent", "folds": folds, "manifest": str(manifest), "bundle": name,
                         "bundle_version": version, "manifest_sha256": digest, "git_commit": commit,
                         **standard_tags(commit)})
        parent.log_params(parent_params(parser, name, version, manifest, folds, epochs, overrides))
        parent.log_dataset(manifest, digest)
        parent.flush()
    selection = str(parser.get_parsed_content("model_selection")) if "model_selection" in parser else "best"
    try:  # the parent run ends FAILED (KILLED on Ctrl-C) with the command, as train.py's runs do
        for k in chosen:
            log.info("fold %d of %d: %d validation cases -> %s", k, folds, len(cases[k]), out / f"fold_{k}")
            fold_dir = out / f"fold_{k}"
            if _trained_without_checkpoint(fold_dir):
                log.info("fold %d: trained (%s) and its checkpoints are gone: not trained again", k,
                         fold_dir / TRAINED_FILE)
            elif _trained_as_asked(fold_dir, k, asked, overrides):
                log.info("fold %d: trained already as asked (%s): skipped", k, fold_dir / TRAINED_FILE)
            else:
                tags: dict[str, Any] = {"mlflow.parentRunId": parent.run_id, "fold": k}
                if not (fold_dir / "checkpoints" / "mlflow_run.json").is_file():  # its run is new: named once
                    tags["mlflow.runName"] = run_name(out.name, k)
                resume = (fold_dir / "checkpoints").is_dir()  # an interrupted fold goes on; a new one starts quietly
                summary = train_bundle(bundle_dir, manifest=manifest, epochs=epochs, resume=resume,
                                       tracking_uri=parent.uri, device=device, verbose=verbose, progress=progress,
                                       overrides={**overrides, "fold": k, "num_folds": folds,
                                                  "output_dir": str(fold_dir),
                                                  "export": False},  # a fold is one member: export-ensemble ships them
                                       tags=tags)
                with atomic_path(fold_dir / TRAINED_FILE) as tmp:
                    tmp.write_text(json.dumps({"fold": k, "num_folds": folds, "val": cases[k], "overrides": overrides,
                                               "asked": asked, **summary}, indent=1, default=str) + "\n")
            recover_weights(fold_dir, k, _trained_selection(fold_dir, selection))
            predict_fold(bundle_dir, manifest, out, k, cases[k], device, overrides)
        with locked(out / LOCK_FILE):  # one scorer at a time: the last one sees every fold's masks
            result = score(out, manifest, cases, name)
        # step: the scorings so far, so calls one fold at a time draw the estimate as it fills in; a
        # step that only grows keeps MLflow's "latest" value the newest (a fold trained again scores fewer)
        parent.log_metrics(mlflow_metrics(result), step=_scorings(parent.journal))
        parent.log_artifact(out / RESULT_FILE, "crossval")
    except BaseException as e:
        parent.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    result["mlflow"], result["output_dir"] = parent.finish(), str(out)
    # only from complete figures: a fold finishing while others run beside it leaves the export to the last
    complete = result["cases_scored"] == result["cases_total"]
    if export and complete:
        from pipeline.crossval_export import export_ensemble

        result["exported"] = [str(p) for p in export_ensemble(bundle_dir, out)]
    else:
        result["exported"] = []
    return result


def _scorings(journal: Path) -> int:
    """The next scoring's step: one past the last ``oof/cases_scored`` point of the parent run's journal."""
    from pipeline.progress import read_curves

    steps = read_curves(journal).get(SECTION + "cases_scored", {}) if journal.is_file() else {}
    return max(steps, default=-1) + 1


def parent_params(parser: Any, name: str, version: Any, manifest: Path, folds: int, epochs: int | None,
                  overrides: dict[str, Any]) -> dict[str, Any]:
    """The parent run's params: the bundle's key hyperparameters as a fold's run has them
    (``pipeline.run_tags.bundle_params``; ``max_epochs`` as ``--epochs`` sets it) without the
    fold's own ids, and the cross-validation's: bundle and version, folds, manifest, the ``--set``
    overrides (JSON). MLflow keeps a param's first value: those of the first call into the folder."""
    from pipeline.run_tags import bundle_params

    params = {k: v for k, v in bundle_params(parser).items() if k not in ("fold", "num_folds")}
    if epochs is not None:
        params["max_epochs"] = epochs
    return {**params, "bundle": name, "bundle_version": version, "folds": folds, "manifest": str(manifest),
            "overrides": json.dumps(overrides, sort_keys=True, default=str)}


def _check_fold_split(fold_dir: Path, k: int, val: list[str]) -> None:
    """InputError when the fold in ``fold_dir`` was trained for another split than this one (its
    ``trained.json`` names its validation cases): a fold carried in from another cross-validation
    would score cases it trained on. Records from before the cases were kept are not checked."""
    try:
        record = json.loads((fold_dir / TRAINED_FILE).read_text())
    except (OSError, ValueError):
        return
    if isinstance(record, dict) and isinstance(record.get("val"), list) and sorted(record["val"]) != sorted(val):
        other = sorted(set(record["val"]) ^ set(val))
        raise InputError(f"{fold_dir / TRAINED_FILE}: fold {k} was trained for another split "
                         f"({record.get('num_folds', '?')} folds; e.g. case {other[0]} differs); use another --output")


def _trained_without_checkpoint(fold_dir: Path) -> bool:
    """A fold finished here or elsewhere whose checkpoints were deleted (only ``model.pt`` and
    ``trained.json`` kept): training it again would start from scratch, so it is skipped."""
    from pipeline import checkpoints

    return ((fold_dir / TRAINED_FILE).is_file() and (fold_dir / "model.pt").is_file()
            and checkpoints.latest_checkpoint(fold_dir / "checkpoints") is None)


def _trained_as_asked(fold_dir: Path, k: int, asked: dict[str, float], overrides: dict[str, Any]) -> bool:
    """Whether the fold's ``trained.json`` records a finished training with this schedule
    (``asked``: max_epochs, time_budget_min) and these ``--set`` values: a rerun skips it without
    reopening its run or rewriting its record. Another schedule (more epochs) resumes it, as does a
    record from before ``asked``; other ``--set`` values of ids that change training are refused
    (resuming a finished fold would train nothing and record them as if it had)."""
    from pipeline.checkpoints import RESUMABLE_CHANGES

    try:
        done = json.loads((fold_dir / TRAINED_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(done, dict) or "asked" not in done:
        return False

    def learnt(o: Any) -> str:
        return json.dumps({key: v for key, v in (o or {}).items() if key not in RESUMABLE_CHANGES}, sort_keys=True,
                          default=str)

    if learnt(done.get("overrides")) != learnt(overrides):
        raise UsageError(f"fold {k}: {fold_dir / TRAINED_FILE} records a training with --set values "
                         f"{learnt(done.get('overrides'))}, not {learnt(overrides)}; {_retrain_hint(fold_dir, k)}, "
                         "or give another --output")
    return done["asked"] == asked and json.dumps(done.get("overrides"), sort_keys=True, default=str) == json.dumps(
        overrides, sort_keys=True, default=str)


def _retrain_hint(fold_dir: Path, k: int) -> str:
    return f"delete {fold_dir / 'checkpoints'} and {fold_dir / TRAINED_FILE} to train fold {k} again"


def _trained_selection(fold_dir: Path, default: str) -> str:
    """The ``model_selection`` fold ``fold_dir`` was trained with (its ``config_resolved.json``), else
    ``default``."""
    try:
        value = json.loads((fold_dir / "config_resolved.json").read_text()).get("model_selection")
    except (OSError, ValueError, AttributeError):
        return default
    return value if value in ("best", "last") else default


def recover_weights(fold_dir: Path, k: int, selection: str) -> None:
    """A finished fold whose ``model.pt`` is gone while its checkpoints are kept (training then has
    nothing to do): ``model.pt`` written from the last checkpoint's network where that is the
    fold's model, i.e. ``selection`` is "last" or the checkpoint's epoch is the best epoch; else
    an InputError saying how to train the fold again. Nothing to do where ``model.pt`` is there or
    no checkpoint is (``predict_fold`` says what to do)."""
    import torch

    from pipeline import checkpoints
    from pipeline.errors import first_line

    weights = fold_dir / "model.pt"
    found = [] if weights.is_file() else checkpoints.list_checkpoints(fold_dir / "checkpoints")
    if not found:
        return
    epoch, last = found[-1]
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
        model, best = state["model"], int(state.get("trainer", {}).get("best_epoch") or 0)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise InputError(f"{last}: cannot read checkpoint ({type(e).__name__}: {first_line(e)[:80]}); "
                         f"{_retrain_hint(fold_dir, k)}") from None
    if selection != "last" and best != epoch:
        raise InputError(f"{weights}: missing; fold {k} kept its best epoch's weights (model_selection "
                         f"{selection!r}, epoch {best}), which only model.pt held, and its last checkpoint is of "
                         f"epoch {epoch}; {_retrain_hint(fold_dir, k)}")
    with atomic_path(weights) as tmp:
        torch.save(model, tmp)
    log.warning("fold %d: %s was missing; written from %s (model_selection %s: epoch %d's weights)", k, weights,
                last, selection, epoch)


def _record_split(out: Path, manifest: Path, folds: int, seed: int, cases: list[list[str]]) -> None:
    """The split this cross-validation uses, in its folder (refused if a rerun's split differs)."""
    record = {"manifest": str(manifest), "k": folds, "seed": seed, "val": cases}
    f = out / SPLITS_FILE
    if f.is_file():
        old = json.loads(f.read_text())
        if old.get("val") != cases or old.get("k") != folds:
            raise InputError(f"{f}: this folder holds a cross-validation with another split (k={old.get('k')}); "
                             "use another output folder")
        return
    with atomic_path(f) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")


def predict_fold(bundle_dir: Path, manifest: Path, out: Path, k: int, ids: list[str], device: str | None,
                 overrides: dict[str, Any]) -> None:
    """Predict fold ``k``'s validation cases with its own model into ``out/oof``, without
    post-processing (finished masks are skipped, so this resumes too). The masks are stamped with
    the model's hash (``oof/.fold_<k>.model``), written before the first of them: where the stamp
    is not of the fold's model.pt (trained again in this folder, or no stamp: a run killed before
    stamps came first), its masks are predicted again instead of kept. The weights are loaded
    into the bundle's network first: a model.pt that cannot predict deletes nothing."""
    from pipeline.bundle import get, load_bundle
    from pipeline.manifest import load_manifest
    from pipeline.predict import CONFIGS, predict
    from pipeline.predict_io import load_weights

    weights = out / f"fold_{k}" / "model.pt"
    if not weights.is_file():
        raise InputError(f"{weights}: fold {k} has no trained weights; {_retrain_hint(weights.parent, k)}")
    inference = load_bundle(bundle_dir, CONFIGS)
    shared = {key: v for key, v in overrides.items() if key in inference}  # training-only ids do not apply
    if "network_def" in inference:  # a corrupt or foreign model.pt: refused before its masks are deleted
        load_weights(get(load_bundle(bundle_dir, CONFIGS, shared), "network_def", bundle_dir), weights)
    digest, stamp = model_digest(weights), out / "oof" / f".fold_{k}.model"
    if read_stamp(stamp) != digest:  # another model's masks, or unstamped ones (a kill before the stamp)
        if any((out / "oof" / f"{sid}.nii.gz").is_file() for sid in ids):
            log.info("fold %d: its out-of-fold masks are not of its model.pt: predicting them again", k)
        for sid in ids:
            (out / "oof" / f"{sid}.nii.gz").unlink(missing_ok=True)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(stamp) as tmp:  # before the first mask: every mask of the fold is this model's
            tmp.write_text(digest + "\n")
    m = load_manifest(manifest)
    wanted = set(ids)
    fold_manifest = out / f"fold_{k}" / "validation.json"
    entries = [{key: e[key] for key in ("id", "image", "label") if e.get(key)} for e in m["training"] if e["id"] in wanted]
    with atomic_path(fold_manifest) as tmp:
        tmp.write_text(json.dumps({"labels": m["labels"], "training": entries, "allow_outside": True}, indent=1))
    # raw masks: the post-processing is chosen on them, so the bundle's own (set by an earlier
    # export-ensemble) must not be applied to them
    rows = predict(bundle_dir, fold_manifest, out / "oof", device=device, progress=False,
                   overrides={**shared, "model_path": str(weights), "folds": [],
                              "postprocess": postprocess_options("none", 0)})
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        raise InputError(f"fold {k}: {len(failed)} out-of-fold prediction(s) failed, first: {failed[0]['error']}")
