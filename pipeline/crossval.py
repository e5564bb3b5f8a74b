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

MLflow: one parent run (``crossval-<bundle>``) with a nested child run per fold (the folds'
training runs); the out-of-fold summary is logged on the parent. ``pipeline.crossval_export``
copies the fold weights into the bundle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError, UsageError
from pipeline.fileio import atomic_path, locked

log = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"
RESULT_FILE = "crossval.json"
TRAINED_FILE = "trained.json"
LOCK_FILE = ".crossval.lock"
#: ids of the split and of which weights predict: a fold's own values of these are not the bundle's
SPLIT_IDS = frozenset({"fold", "num_folds", "seed", "splits_file", "folds", "model_path"})


# -- the split --------------------------------------------------------------------------------------
def fold_cases(manifest: Path, folds: int, seed: int, splits: Path | str | None = None) -> list[list[str]]:
    """The validation case ids of each fold, as training will see them (``pipeline.manifest.datalist``
    with the bundle's ``splits_file``, ``splits``, where it declares one). Refused in one line: fewer
    patients than folds, a splits file training would read that is not this manifest's split into
    ``folds`` folds with ``seed`` (``pipeline.manifest.split_file``, strict), and a split where a fold
    has no validation cases, a case is validated by two folds or by none (it would have no
    out-of-fold prediction)."""
    from pipeline.manifest import datalist, group_key, load_manifest, split_file

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
    from pipeline.tracking import open_tracker
    from pipeline.train import train_bundle

    bundle_dir, manifest = Path(bundle_dir), Path(manifest).resolve()
    overrides = dict(overrides or {})
    parser = load_bundle(bundle_dir, ("common.json", "train.json"), overrides)
    missing = [k for k in ("seed", "output_dir") if k not in parser]
    if missing:
        raise UsageError(f"{bundle_dir}: the training configs lack id(s) {', '.join(missing)}")
    seed = int(parser.get_parsed_content("seed"))
    # the split training reads: a planned bundle's own splits.json (its splits_file), else the manifest's
    splits = parser.get_parsed_content("splits_file") if "splits_file" in parser else None
    cases = fold_cases(manifest, folds, seed, splits)
    chosen = list(range(folds)) if not fold_ids else sorted(set(fold_ids))
    bad = [k for k in chosen if not 0 <= k < folds]
    if bad:
        raise UsageError(f"--fold {bad[0]}: the split has folds 0..{folds - 1}")
    out = Path(output_dir or Path(parser.get_parsed_content("output_dir")) / "crossval").resolve()
    out.mkdir(parents=True, exist_ok=True)
    name = bundle_metadata(bundle_dir).get("name", bundle_dir.name)
    for k in chosen:  # folds carried in from another cross-validation: refused before anything is written
        _check_fold_split(out / f"fold_{k}", k, cases[k])
    with locked(out / LOCK_FILE):  # folds started side by side into one folder share one parent run
        _record_split(out, manifest, folds, seed, cases)
        parent = open_tracker(tracking_uri, name, out / "metrics.jsonl", out / "mlflow_run.json", resume=True,
                              run_name=f"crossval-{name}")
        parent.set_tags({"crossval": "parent", "folds": folds, "manifest": str(manifest), "bundle": name})
        parent.flush()
    selection = str(parser.get_parsed_content("model_selection")) if "model_selection" in parser else "best"
    try:  # the parent run ends FAILED (KILLED on Ctrl-C) with the command, as train.py's runs do
        for k in chosen:
            log.info("fold %d of %d: %d validation cases -> %s", k, folds, len(cases[k]), out / f"fold_{k}")
            fold_dir = out / f"fold_{k}"
            if _trained_without_checkpoint(fold_dir):
                log.info("fold %d: trained (%s) and its checkpoints are gone: not trained again", k,
                         fold_dir / TRAINED_FILE)
            else:
                summary = train_bundle(bundle_dir, manifest=manifest, epochs=epochs, resume=True,
                                       tracking_uri=parent.uri, device=device, verbose=verbose, progress=progress,
                                       overrides={**overrides, "fold": k, "num_folds": folds,
                                                  "output_dir": str(fold_dir),
                                                  "export": False},  # a fold is one member: export-ensemble ships them
                                       tags={"mlflow.parentRunId": parent.run_id, "fold": k})
                with atomic_path(fold_dir / TRAINED_FILE) as tmp:
                    tmp.write_text(json.dumps({"fold": k, "num_folds": folds, "val": cases[k], "overrides": overrides,
                                               **summary}, indent=1, default=str) + "\n")
            recover_weights(fold_dir, k, _trained_selection(fold_dir, selection))
            predict_fold(bundle_dir, manifest, out, k, cases[k], device, overrides)
        with locked(out / LOCK_FILE):  # one scorer at a time: the last one sees every fold's masks
            result = score(out, manifest, cases, name)
        parent.log_metrics(_flat_metrics(result), step=0)
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
    if _stamp(stamp) != digest:  # another model's masks, or unstamped ones (a kill before the stamp)
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


# -- scoring and post-processing ----------------------------------------------------------------------
CANDIDATES = ("none", "largest_foreground", "largest_per_class")
#: keep-largest only for the classes whose out-of-fold Dice it raises (nnU-Net's per-class decision)
SELECTED = "largest_where_it_helps"


def postprocess_options(candidate: str, n_classes: int, classes: list[int] | None = None) -> dict[str, Any]:
    """The ``postprocess`` id (``pipeline.postprocess.label_cleanup``) of a candidate; ``classes``:
    the labels ``SELECTED`` keeps the largest component of."""
    fg = list(range(1, n_classes))
    return {"none": {}, "largest_foreground": {"keep_largest_foreground": True},
            "largest_per_class": {"keep_largest": fg}, SELECTED: {"keep_largest": list(classes or [])}}[candidate]


def choose_postprocessing(candidates: dict[str, list[list[float]]]) -> tuple[str, list[int]]:
    """The candidate with the highest out-of-fold mean Dice (``none`` unless another gains), and
    the classes (1-based) whose Dice keep-largest raises. ``candidates``: per candidate of
    ``CANDIDATES``, Dice per case and foreground class. Keep-largest of one class leaves every other
    class's voxels as they are, so the per-class choice's Dice is, class by class, the better of
    ``none`` and ``largest_per_class``: it differs from keeping the largest of every class where a
    class is several separate structures (both kidneys under one label), which that would cut.
    That choice's Dice per case and class is added to ``candidates`` as ``SELECTED``."""
    if not candidates["none"]:
        return "none", []
    none, each = np.array(candidates["none"]), np.array(candidates["largest_per_class"])
    helps = [c + 1 for c in range(none.shape[1]) if each[:, c].mean() > none[:, c].mean() + 1e-6]
    selected = np.where(np.isin(np.arange(1, none.shape[1] + 1), helps), each, none)
    candidates[SELECTED] = selected.tolist()
    means = {c: float(np.mean(v)) for c, v in candidates.items()}
    gaining = [c for c in (*CANDIDATES[1:], SELECTED) if means[c] > means["none"] + 1e-6]
    if not gaining:  # none unless one gains
        return "none", helps
    if helps and means[SELECTED] >= max(means[c] for c in gaining) - 1e-6:
        return SELECTED, helps  # as good as the best, and it leaves the classes it does not help alone
    return max(gaining, key=lambda c: means[c]), helps


def _dice(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> list[float]:
    out = []
    for c in range(1, n_classes):
        p, r = pred == c, ref == c
        denom = int(p.sum()) + int(r.sum())
        out.append(1.0 if denom == 0 else 2.0 * int((p & r).sum()) / denom)
    return out


def _current_model(out: Path, k: int) -> str | None:
    """The sha256 of fold ``k``'s ``model.pt`` where its out-of-fold masks count: the model is there
    and is the one they were predicted with (``oof/.fold_<k>.model``); else None. A fold deleted,
    trained again and not yet predicted, or masks without a stamp (from before stamps, or of a run
    killed before its stamp) leave its cases unscored."""
    weights, stamp = out / f"fold_{k}" / "model.pt", out / "oof" / f".fold_{k}.model"
    if not weights.is_file():
        if any(stamp.parent.glob("*.nii.gz")):
            log.warning("fold %d: no model.pt in %s; its out-of-fold masks are not scored", k, weights.parent)
        return None
    digest = model_digest(weights)
    return digest if _stamp(stamp) == digest else None


def _stamp(stamp: Path) -> str | None:
    try:
        return stamp.read_text().strip()
    except OSError:
        return None


def model_digest(weights: Path) -> str:
    """The sha256 of a fold's model.pt: the stamp of the out-of-fold masks it predicted."""
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def score(out: Path, manifest: Path, cases: list[list[str]], name: str) -> dict[str, Any]:
    """Dice and HD95 of every out-of-fold mask there is; the post-processing candidates' mean
    Dice; write ``out/crossval.json``."""
    import torch

    from pipeline.evaluation import case_metrics, json_safe
    from pipeline.fileio import read_label
    from pipeline.manifest import load_manifest
    from pipeline.postprocess import label_cleanup

    m = load_manifest(manifest)
    labels = m["labels"]
    names = [labels[str(i)] for i in range(len(labels))]
    refs = {e["id"]: e["label"] for e in m["training"]}
    def cleaned(pred: np.ndarray, options: dict[str, Any]) -> np.ndarray:
        tensor = torch.as_tensor(pred.astype(np.int64))[None]
        return np.asarray(label_cleanup(options)(tensor)[0])

    def row(k: int, pred: np.ndarray, ref: np.ndarray, spacing: Any) -> dict[str, Any]:
        metrics = case_metrics(pred, ref, spacing, labels)
        return {"fold": k, "dice": {n: metrics[n]["dice"] for n in names[1:]},
                "hd95_mm": {n: metrics[n]["hd95_mm"] for n in names[1:]}}

    per_case: dict[str, Any] = {}
    candidates = {c: [] for c in CANDIDATES}
    found = []
    models: dict[str, str] = {}  # each scored fold's model.pt: what export-ensemble may ship
    for k, ids in enumerate(cases):
        digest = _current_model(out, k)
        if digest is None:
            continue
        models[str(k)] = digest
        for sid in ids:
            mask = out / "oof" / f"{sid}.nii.gz"
            if not mask.is_file():
                continue
            pred, _, _ = read_label(mask)
            ref, _, spacing = read_label(refs[sid])
            per_case[sid] = row(k, pred, ref, spacing)
            found.append((k, sid, mask))
            for c in CANDIDATES:
                candidates[c].append(_dice(cleaned(pred, postprocess_options(c, len(names))), ref, len(names)))
    best, helps = choose_postprocessing(candidates)
    means = {c: float(np.mean(v)) if v else math.nan for c, v in candidates.items()}  # over cases and classes
    per_class = {c: {n: float(np.mean([d[i] for d in v])) for i, n in enumerate(names[1:])} if v else {}
                 for c, v in candidates.items()}
    options = postprocess_options(best, len(names), helps)
    # the chosen post-processing's Dice and HD95 (removed fragments far away change the HD95 most)
    chosen_cases = dict(per_case)
    if best != "none":
        for k, sid, mask in found:
            ref, _, spacing = read_label(refs[sid])
            chosen_cases[sid] = row(k, cleaned(read_label(mask)[0], options), ref, spacing)
    chosen_rows = list(chosen_cases.values())
    result = {
        "bundle": name, "manifest": str(manifest), "folds": len(cases), "cases_scored": len(per_case),
        "cases_total": sum(map(len, cases)),
        "summary": _summary(per_case.values(), names[1:]),
        "per_fold": {str(k): _summary([v for v in per_case.values() if v["fold"] == k], names[1:])
                     for k in range(len(cases))},
        "postprocessing": {"mean_dice": means, "dice": per_class, "chosen": best,
                           "postprocess": options,
                           "keep_largest_helps": [names[c] for c in helps],
                           "summary": _summary(chosen_rows, names[1:]),
                           "per_fold": {str(k): _summary([v for v in chosen_rows if v["fold"] == k], names[1:])
                                        for k in range(len(cases))},
                           "cases": chosen_cases},
        "cases": per_case,
        "model_sha256": models,
    }
    with atomic_path(out / RESULT_FILE) as tmp:
        tmp.write_text(json.dumps(json_safe(result), indent=1) + "\n")
    log.info("cross-validation of %s: %d of %d cases scored, out-of-fold mean Dice %.4f; post-processing: %s",
             name, result["cases_scored"], result["cases_total"], result["summary"]["mean_dice"], best)
    return result


def _summary(rows: Any, classes: list[str]) -> dict[str, Any]:
    rows = list(rows)
    out: dict[str, Any] = {"n": len(rows)}
    for metric in ("dice", "hd95_mm"):
        out[metric] = {}
        for c in classes:
            v = np.array([r[metric][c] for r in rows], dtype=float)
            v = v[np.isfinite(v)]
            out[metric][c] = {"mean": float(v.mean()) if v.size else math.nan,
                              "sd": float(v.std()) if v.size else math.nan}
    means = [out["dice"][c]["mean"] for c in classes]
    out["mean_dice"] = float(np.mean(means)) if rows else math.nan
    return out


def _flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    s = result["summary"]
    flat = {"oof_mean_dice": s["mean_dice"], "oof_cases": float(result["cases_scored"])}
    for c, v in s["dice"].items():
        flat[f"oof_dice_{c}"] = v["mean"]
    for c, v in s["hd95_mm"].items():
        flat[f"oof_hd95_{c}"] = v["mean"]
    for k, v in result["per_fold"].items():
        flat[f"fold{k}_mean_dice"] = v["mean_dice"]
    return {k: v for k, v in flat.items() if isinstance(v, float) and math.isfinite(v)}


# -- the ensemble into the bundle ---------------------------------------------------------------------
