"""Training on ``monai.engines``: ``train_bundle`` runs a bundle's ``train#trainer`` with what a
long run needs added around it.

The bundle (common.json + train.json) defines a standard MONAI workflow (``train#trainer``,
``train#handlers``, ``validate#evaluator``, ``validate#handlers``, ``initialize``, ``run``,
``finalize``), so ``python -m monai.bundle run --config_file "['configs/common.json',
'configs/train.json']" --bundle_root B --dataset_dir D [--tracking mlflow]`` trains and validates
it as plain MONAI. ``train_bundle`` (``segpipe train``) adds, programmatically:

- the manifest validated first (``pipeline.validation.validate_manifest``), the process group when started
  by ``torchrun`` (gloo on CPU, nccl on GPU; ``DistributedSampler`` in ``pipeline.loaders.loader``);
  workers torchrun restarts (``--max-restarts``) resume from the last checkpoint, and every rank
  leaves at one barrier;
- atomic checkpoints every ``checkpoint_interval`` epochs and ``--resume`` (``pipeline.checkpoints``);
- the best weights by validation mean Dice as ``output_dir/model.pt`` (plain state_dict, written
  by the bundle's ``pipeline.handlers.ModelSaver``); copy it into the bundle's ``models/`` with
  ``--set export=true`` or ``export_model`` once you accept it;
- ``init_weights``: start from saved weights instead of random ones (fine-tuning; ``{fold}`` in
  the path is the fold, so a cross-validation continues each fold from its own model);
- a stop on a non-finite loss naming epoch and iteration; gradient clipping (``grad_clip_norm``);
  early stopping (``early_stop_patience`` > 0); validation after the last epoch;
- per-epoch timing, samples/s, voxels/s and data-wait fraction; Dice per class, the per-case CSV
  and QC overlays (``pipeline.qc``); MLflow tracking on rank 0 (``pipeline.tracking``).

Settings: every id in ``TRAIN_IDS`` is declared in every bundle (there are no defaults in
Python), so any of them can be ``--set`` on any bundle. Precision: ``pipeline.amp`` (the bundle's
``amp`` switch; ``amp_dtype`` is the policy's choice, recorded in MLflow; ``--set
'amp_dtype=$torch.bfloat16'`` forces one). Console: a progress bar per epoch and one line per
validation; ``verbose`` adds Ignite's and MONAI's own lines and the per-epoch record.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping
from monai.handlers import from_engine, stopping_fn_from_metric

from pipeline import checkpoints, distributed
from pipeline.amp import grad_scaler
from pipeline.bundle import bundle_metadata, get, load_bundle
from pipeline.errors import InputError, UsageError
from pipeline.fileio import atomic_path
from pipeline.handlers import (
    ModelSaver,
    attach_epoch_log,
    attach_epoch_seeds,
    attach_grad_clip,
    attach_tracker,
    attach_validation,
    attach_weight_average,
    find_model_saver,
)
from pipeline.manifest import manifest_hash
from pipeline.time_budget import attach_time_budget, budget_minutes
from pipeline.train_console import console, not_our_error
from pipeline.train_export import export_model, exportable, in_bundle
from pipeline.validation import check_contract, require_valid

log = logging.getLogger(__name__)


#: the ids ``train_bundle`` reads from common.json + train.json; every bundle declares all of them
TRAIN_IDS = (
    "device", "amp", "amp_dtype", "manifest", "output_dir", "label_names", "roi_size", "network", "optimizer",
    "lr_scheduler", "max_epochs", "val_interval", "model_selection", "qc_cases", "grad_clip_norm",
    "time_budget_min", "ema_decay", "init_weights", "early_stop_patience", "checkpoint_interval", "export", "initialize",
    "finalize", "train#trainer", "validate#evaluator", "validate#handlers",
)


# -- compile and memory layout -------------------------------------------------------------------
def channels_last(network: torch.nn.Module, spatial_dims: int, enabled: bool = True) -> torch.nn.Module:
    """``network`` with channels-last weights (in place): several times faster 3D convolutions on
    CPU (oneDNN) and faster AMP convolutions on GPU; state_dicts load either way."""
    if enabled:
        network.to(memory_format=torch.channels_last_3d if spatial_dims == 3 else torch.channels_last)
    return network


def check_compile(trainer: Engine) -> None:
    """``compile`` on a CPU makes torch.compile generate C++: without a compiler that fails at the
    first iteration with a long traceback, so say so up front, with the fix."""
    if not getattr(trainer, "compile", False) or torch.device(trainer.state.device).type != "cpu":
        return
    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        raise UsageError("compile: torch.compile on a CPU needs a C++ compiler (g++ or clang++, or $CXX); "
                         "install one or add --set compile=false")


# -- the entry point ------------------------------------------------------------------------------
def _overrides(manifest: Path | None, epochs: int | None, device: str | None, amp: bool | None,
               extra: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(extra or {})
    if manifest is not None:
        out["manifest"] = str(Path(manifest).resolve())
    if epochs is not None:
        out["max_epochs"] = int(epochs)
    if device is not None:
        try:
            torch.device(device)
        except RuntimeError:
            raise UsageError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1)") from None
        out["device"] = f"$torch.device('{device}')"
    if amp is not None:
        out["amp"] = bool(amp)
    return out


def init_weights(network: torch.nn.Module, path: str | Path | None, fold: int | None = None) -> None:
    """Load the weights at ``path`` (``{fold}`` replaced by ``fold``) into ``network`` before
    training: a plain state_dict or a checkpoint, strictly (another network's weights are an
    InputError naming the file). Every bundle's train.json calls it in ``initialize``, so
    ``segpipe train`` and ``python -m monai.bundle run`` both honour ``init_weights``; a resumed
    run then loads its checkpoint over these weights."""
    from pipeline.predict_io import load_weights

    if not path:
        return
    path = Path(str(path).replace("{fold}", str(fold)))
    if not path.is_file():
        raise InputError(f"{path}: init_weights file not found")
    load_weights(network, path)
    log.info("initialised from %s", path)



def train_bundle(bundle_dir: Path, manifest: Path | None = None, epochs: int | None = None, resume: bool = False,
                 tracking_uri: str | None = None, device: str | None = None, amp: bool | None = None,
                 overrides: dict[str, Any] | None = None, verbose: bool = False,
                 progress: bool = False, tags: dict[str, Any] | None = None,
                 register: bool | None = None) -> dict[str, Any]:
    """Train the bundle in ``bundle_dir``; return a summary (best Dice, per class, paths, run id
    and its address in the MLflow UI). ``progress``: a progress bar per epoch (the CLI turns it
    on for a terminal); ``verbose``: also Ignite's and MONAI's own log lines and the per-epoch
    record; ``tags``: more MLflow tags (e.g. ``mlflow.parentRunId`` for a cross-validation fold);
    ``register``: register the logged model under the bundle's name (default: yes, except for a
    cross-validation fold, whose model is one member of an ensemble). Unless ``val_interval`` is
    set, a short run validates at least 5 times (``validate_often``)."""
    t0 = time.perf_counter()
    started = distributed.init_distributed()
    if (restart := distributed.elastic_restart()) and not resume:
        log.info("torchrun restart %d (--max-restarts): resuming from the last checkpoint, as --resume does", restart)
        resume = True
    try:
        if started and device is None and torch.cuda.is_available():
            device = f"cuda:{idist.get_local_rank()}"
        parser = load_bundle(bundle_dir, ("common.json", "train.json"),
                             _overrides(manifest, epochs, device, amp, overrides))
        missing = [k for k in TRAIN_IDS if k not in parser]
        if missing:
            raise UsageError(f"{bundle_dir}: common.json + train.json lack the id(s) {', '.join(missing)}")
        if "val_interval" not in (overrides or {}):
            validate_often(parser)
        budget = budget_minutes(_setting(parser, "time_budget_min"))
        if epochs and budget > 0:  # a planned bundle's budget: said before it cuts the asked epochs short
            log.info("--epochs %d with time_budget_min %g: training stops at whichever comes first "
                     "(--set time_budget_min=0 trains %d epochs)", epochs, budget, epochs)
        if register is None:
            register = "mlflow.parentRunId" not in (tags or {})
        require_valid(Path(parser.get_parsed_content("manifest")))  # each problem said once
        checkpoints.check_same_recipe(parser, (*TRAIN_IDS, "seed", "fold"),
                                      manifest_hash(Path(parser.get_parsed_content("manifest"))))
        check_contract(Path(bundle_dir), Path(parser.get_parsed_content("manifest")))
        with console(verbose, progress and idist.get_rank() == 0) as bar:
            summary = _run(parser, Path(bundle_dir), resume=resume, tracking_uri=tracking_uri, bar=bar, tags=tags,
                           register=register, overrides=overrides or {})
        if started:
            # every rank leaves together. A rank that left straight after its last validation could reach
            # interpreter shutdown while a gloo thread was still freeing that validation's all_gather (its
            # tensors are Python objects, so it needs the GIL): "terminate called without an active
            # exception", SIGABRT, on a training that had finished (seen in CI, 2026-12-05)
            idist.barrier()
        summary["wall_s"] = round(time.perf_counter() - t0, 1)
        return summary
    finally:
        if started:
            idist.finalize()


def validate_often(parser: Any, times: int = 5) -> None:
    """Lower the bundle's ``val_interval`` so a run of ``max_epochs`` validates at least ``times``
    times (curves need points: 3 epochs at the bundles' interval of 5 would validate once)."""
    max_epochs, interval = _setting(parser, "max_epochs", int), _setting(parser, "val_interval", int)
    often = max(1, min(interval, max_epochs // times))
    if often != interval:
        n = min(times, max_epochs)
        log.info("val_interval %d -> %d: %d epoch%s validate%s %s (--set val_interval=N keeps N)", interval, often,
                 max_epochs, "s" if max_epochs != 1 else "", "" if max_epochs != 1 else "s",
                 "every epoch" if often == 1 else f"at least {n} times")
        parser["val_interval"] = often


def _prepare_output(output_dir: Path, ckpt_dir: Path, resume: bool) -> None:
    if idist.get_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        old = checkpoints.list_checkpoints(ckpt_dir)
        if old and not resume:
            log.warning("%s: starting afresh (no --resume): removing %d old checkpoint(s)", ckpt_dir, len(old))
            for _, path in old:
                path.unlink()
    idist.barrier()


def _setting(parser: Any, id: str, kind: type | None = None, empty_is_zero: bool = False) -> Any:
    """A declared setting, resolved (references and expressions evaluated); with ``kind`` (int,
    float) converted, a value that is not one a UsageError naming the setting (``--set
    max_epochs=ten``); with ``empty_is_zero`` null/false/0 are 0."""
    value = parser.get_parsed_content(id)
    if kind is None:
        return value
    try:
        if isinstance(value, (list, dict, str)):  # int("3") and float([]) are not settings' numbers
            raise TypeError
        return kind(value or 0) if empty_is_zero else kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"setting {id!r}: expected {'an integer' if kind is int else 'a number'}, got "
                         f"{value!r:.40} (the bundle's value or --set {id}=...)") from None


def _run(parser: Any, bundle_dir: Path, resume: bool, tracking_uri: str | None, bar: Any = None,
         tags: dict[str, Any] | None = None, register: bool = True,
         overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from pipeline.run_tags import bundle_params, git_commit, run_name, standard_tags
    from pipeline.tracking import open_tracker

    meta = bundle_metadata(bundle_dir)
    output_dir = Path(_setting(parser, "output_dir")).resolve()
    ckpt_dir = output_dir / "checkpoints"
    get(parser, "initialize", bundle_dir)  # seeds; init_weights (bad weights stop here, before anything is written)
    network = get(parser, "network", bundle_dir)
    trainer = get(parser, "train#trainer", bundle_dir)
    check_compile(trainer)
    if "seed" in parser:  # every epoch from (seed, epoch): a resumed run trains as the uninterrupted one
        attach_epoch_seeds(trainer, _setting(parser, "seed", int))
    evaluator = get(parser, "validate#evaluator", bundle_dir)
    for engine in (trainer, evaluator):  # they (and StatsHandler through them) log an exception the CLI reports
        engine.logger.addFilter(not_our_error)
    export = (bool(_setting(parser, "export")) and idist.get_rank() == 0  # said before training, by rank 0
              and exportable(bundle_dir, overrides or {}))
    _prepare_output(output_dir, ckpt_dir, resume)  # once the engines are built: a bad loader leaves no folder
    saver = find_model_saver(list(get(parser, "validate#handlers", bundle_dir)))
    optimizer, max_epochs = get(parser, "optimizer", bundle_dir), _setting(parser, "max_epochs", int)
    objects = {"model": network, "optimizer": optimizer, "lr_scheduler": get(parser, "lr_scheduler", bundle_dir),
               "trainer": trainer}
    if trainer.amp:  # MONAI makes a new GradScaler in run(); use one that checkpoints hold (off for bf16)
        objects["scaler"] = scaler = grad_scaler(trainer.state.device, _setting(parser, "amp_dtype"))
        trainer.add_event_handler(Events.STARTED, lambda e: setattr(e, "scaler", scaler))
    label_names = list(_setting(parser, "label_names"))
    attach_validation(trainer, evaluator, saver, label_names, output_dir, _setting(parser, "val_interval", int),
                      _setting(parser, "qc_cases", int))
    attach_epoch_log(trainer, optimizer, math.prod(_setting(parser, "roi_size")), ckpt_dir)
    attach_grad_clip(trainer, _setting(parser, "grad_clip_norm"))
    attach_time_budget(trainer, optimizer, budget_minutes(_setting(parser, "time_budget_min")))
    ema_decay = _setting(parser, "ema_decay", float, empty_is_zero=True)
    averaged = attach_weight_average(trainer, network, ema_decay, output_dir / "model_ema.pt")
    if averaged is not None:
        objects["ema"] = averaged
    patience = _setting(parser, "early_stop_patience", int, empty_is_zero=True)
    if patience > 0:  # here: a bundle handler would be a circular reference
        stopper = EarlyStopping(patience, stopping_fn_from_metric("val_mean_dice"), trainer)
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, stopper)  # as MONAI's EarlyStopHandler attaches it
        objects["early_stop"] = stopper  # its count of validations without a gain resumes with the run
    if resume:
        last = checkpoints.latest_checkpoint(ckpt_dir)
        if last is None:
            log.warning("--resume: no checkpoint in %s; starting from epoch 0", ckpt_dir)
        else:
            checkpoints.resume(last, objects, trainer, max_epochs)
            if trainer.state.epoch < max_epochs and not getattr(trainer.state, "budget_stopped_epoch", 0):
                checkpoints.check_resume_settings(parser, output_dir, (*TRAIN_IDS, "seed", "fold"))  # training left
            saver.best, saver.best_epoch = trainer.state.best_val_mean_dice, trainer.state.best_epoch
    trained_already = bool(getattr(trainer.state, "budget_stopped_epoch", 0)) or trainer.state.epoch >= max_epochs
    if bar is not None:
        bar.attach(trainer, output_transform=lambda out: {"loss": float(from_engine(["loss"], first=True)(out))})

    tracker = None
    if idist.get_rank() == 0:
        fold = _setting(parser, "fold")
        tracker = open_tracker(tracking_uri, meta.get("name", bundle_dir.name), output_dir / "metrics.jsonl",
                               ckpt_dir / "mlflow_run.json", resume, run_name=run_name(output_dir.name, fold),
                               resumed_at=(int(trainer.state.epoch), int(trainer.state.iteration)))
        manifest, commit = Path(_setting(parser, "manifest")), git_commit()
        tracker.set_tags({"bundle": meta.get("name"), "bundle_version": meta.get("version"), "fold": fold,
                          "git_commit": commit, "manifest": str(manifest), "manifest_sha256": manifest_hash(manifest),
                          "device": str(trainer.state.device), "world_size": idist.get_world_size(),
                          **standard_tags(commit), **(tags or {})})
        config_path = output_dir / "config_resolved.json"
        if not (trained_already and config_path.is_file()):  # a rerun with nothing to train keeps the run's
            tracker.log_params(bundle_params(parser))     # record: its --set values trained nothing
            with atomic_path(config_path) as tmp:  # a kill mid-write must not leave a --resume nothing to compare
                parser.export_config_file(parser.get(), str(tmp), indent=2)
        tracker.log_dataset(manifest, manifest_hash(manifest))
        tracker.log_artifact(config_path, "config")
        tracker.start_system_metrics()
        tracker.commit()  # the run's record so far; from here on what the next checkpoint holds
        attach_tracker(tracker, trainer, progress_png=output_dir / "progress.png", flush=False)
        if tracker.run_id:  # no run when the store failed at the start (the tracker said so, once)
            log.info("MLflow run: %s", tracker.address())
    # last of the epoch handlers: a checkpoint for epoch N means its validation, metrics and MLflow records are
    # written, so a run killed at any moment resumes with nothing of epoch N missing from the tracker; MLflow
    # gets them once the checkpoint holds them, so a resume never logs an epoch's steps twice
    every = _setting(parser, "checkpoint_interval", int)
    checkpoints.attach_checkpointing(trainer, objects, ckpt_dir, every)
    if tracker is not None:
        def _send(engine: Engine) -> None:
            tracker.commit()
            tracker.flush()

        trainer.add_event_handler(Events.EPOCH_COMPLETED(every=every), _send)
        trainer.add_event_handler(Events.COMPLETED, _send)

    stopped = int(getattr(trainer.state, "budget_stopped_epoch", 0) or 0)  # the time budget ended the run
    trained = False
    if stopped:  # its checkpoint is mid-epoch (the budget ends an epoch early), which ignite counts one short
        trainer.state.epoch = trainer.state.max_epochs = stopped
        log.info("the time budget ended this run at epoch %d: nothing to do", stopped)
    elif trainer.state.epoch >= max_epochs:
        log.info("already trained to epoch %d of %d: nothing to do", trainer.state.epoch, max_epochs)
    else:
        try:
            trainer.run()
            trained = True
        except BaseException as e:
            if tracker is not None:
                tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
    _setting(parser, "finalize")
    return _summary(parser, meta, trainer, saver, output_dir, ckpt_dir, tracker, bundle_dir, register, trained, export)


def _summary(parser: Any, meta: dict, trainer: Engine, saver: ModelSaver, output_dir: Path, ckpt_dir: Path,
             tracker: Any, bundle_dir: Path, register: bool = True, trained: bool = True,
             export: bool = False) -> dict[str, Any]:
    model = saver.path
    summary: dict[str, Any] = {
        "bundle": meta.get("name"), "version": meta.get("version"), "epochs": trainer.state.epoch,
        "best_val_mean_dice": trainer.state.best_val_mean_dice, "best_epoch": trainer.state.best_epoch,
        "val_dice": trainer.state.best_val_dice,
        "output_dir": str(output_dir), "model_path": str(model) if model.is_file() else None,
        "checkpoint": str(checkpoints.latest_checkpoint(ckpt_dir)), "world_size": idist.get_world_size(),
        "device": str(trainer.state.device)}
    if tracker is not None:
        ema = [(output_dir / "model_ema.pt", "model")] if _setting(parser, "ema_decay", float, empty_is_zero=True) else []  # not a stale one
        for path, where in [(model, "model"), *ema, (output_dir / "val_cases.csv", "validation"),
                            *[(p, "qc") for p in sorted((output_dir / "qc").glob("*.png"))]]:
            if path.is_file():
                tracker.log_artifact(path, where)
        # the bundle with these weights as an MLflow model (pipeline.mlflow_model); a rerun with nothing
        # to train logs none again (a new registered version of the same weights), unless none was logged
        if model.is_file() and (trained or not tracker.has_model()):
            from pipeline.mlflow_model import stage_bundle

            staged = stage_bundle(bundle_dir, parser, model, output_dir / "mlflow_model")
            tracker.log_model(staged, meta.get("name", bundle_dir.name), register,
                              f"bundle {meta.get('name')} {meta.get('version')}, fold {_setting(parser, 'fold')}: "
                              f"validation mean Dice {saver.best:.4f} (epoch {saver.best_epoch} of "
                              f"{trainer.state.epoch}, model_selection {saver.selection}); run {tracker.run_id}")
        summary.update(tracker.finish())
    if export and summary["model_path"] and idist.get_rank() == 0:
        best = summary["best_val_mean_dice"]
        val = (f"validation mean Dice {best:.4f} at epoch {summary['best_epoch']}" if summary["best_epoch"]
               else "no validation")  # best_val_mean_dice stays -1 where nothing was validated
        folds = _setting(parser, "folds") if "folds" in parser else []
        used = ("`segpipe predict` uses it" if not folds else f"`segpipe predict` still averages the exported "
                f"folds {list(folds)} (`folds` in common.json); `--set 'folds=[]'` predicts with this model")
        summary["exported"] = str(export_model(model, bundle_dir, (
            f"**Status: trained.** `models/model.pt` is `{in_bundle(model, bundle_dir)}` from `segpipe train` ({summary['epochs']} "
            f"epochs; {val}), exported {time.strftime('%Y-%m-%d %H:%M')}; {used}.")))
    return summary
