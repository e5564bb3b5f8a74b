"""Ignite handlers around a bundle's trainer and evaluator.

- ``ModelSaver``: the one writer of ``model.pt``; bundles list it in ``validate#handlers``, so
  ``python -m monai.bundle run`` uses it too.
- ``ValidationHandler``: MONAI's, and the last epoch is always validated (``train#handlers``).
- attached by ``pipeline.train.train_bundle``: gradient clipping, the per-epoch record (timing,
  samples/s, a stop on a non-finite loss; logged by ``pipeline.handlers.epochs``, which
  ``segpipe train`` shows only with ``--verbose``), validation bookkeeping (Dice per class, one
  log line per validation, per-case CSV and QC overlays) and an optional moving average of the weights.
- ``attach_rng_guard``: validation leaves the training's random stream alone (attached by
  ``ModelSaver``, so by every bundle's evaluator).
- ``attach_epoch_seeds``: each epoch's random stream comes from (seed, epoch, rank), so a run
  resumed from a checkpoint trains on exactly what the uninterrupted run would have.
- ``attach_tracker``: the trainer's losses, epoch records and QC images to a
  ``pipeline.tracking.RunTracker``.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Timer
from monai.data.utils import set_rnd
from monai.engines import IterationEvents
from monai.handlers import ValidationHandler as MonaiValidationHandler
from monai.handlers import from_engine

from pipeline import checkpoints, qc
from pipeline.errors import SegpipeError, UsageError
from pipeline.fileio import atomic_path
from pipeline.loaders import EpochSeeded

if TYPE_CHECKING:
    from pipeline.tracking import RunTracker

log = logging.getLogger(__name__)
epochs_log = logging.getLogger(f"{__name__}.epochs")


def attach_grad_clip(trainer: Engine, max_norm: float | None) -> None:
    """Clip the gradient norm after backward (unscaled first under fp16 grad scaling)."""
    if not max_norm:
        return

    def _clip(engine: Engine) -> None:
        if engine.amp and engine.scaler is not None:
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), max_norm)

    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, _clip)


def attach_epoch_log(trainer: Engine, optimizer: torch.optim.Optimizer, roi_voxels: int, ckpt_dir: Path) -> None:
    """Per epoch into ``trainer.state.epoch_log``: mean loss, lr, training time, samples/s,
    voxels/s and the fraction of it spent waiting for data; stop on a non-finite loss."""
    data_t, step_t = Timer(), Timer()
    data_t.attach(trainer, start=Events.EPOCH_STARTED, resume=Events.GET_BATCH_STARTED, pause=Events.GET_BATCH_COMPLETED)
    step_t.attach(trainer, start=Events.EPOCH_STARTED, resume=Events.ITERATION_STARTED, pause=Events.ITERATION_COMPLETED)
    acc: dict[str, float] = {}

    @trainer.on(Events.EPOCH_STARTED)
    def _start(engine: Engine) -> None:
        acc.update(loss=0.0, n=0, samples=0, lr=optimizer.param_groups[0]["lr"])
        engine.state.epoch_log = {}

    @trainer.on(Events.GET_BATCH_COMPLETED)
    def _count(engine: Engine) -> None:
        batch = engine.state.batch
        acc["samples"] += len(batch["image"]) if isinstance(batch, dict) else len(batch)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _loss(engine: Engine) -> None:
        loss = float(from_engine(["loss"], first=True)(engine.state.output))
        if not math.isfinite(loss):
            last = checkpoints.latest_checkpoint(ckpt_dir)
            local = (engine.state.iteration - 1) % engine.state.epoch_length + 1
            raise SegpipeError(f"training stopped: loss is {loss} at epoch {engine.state.epoch}, iteration "
                               f"{engine.state.iteration} ({local} of the epoch); last good checkpoint: "
                               f"{last or 'none yet'}")
        acc["loss"] += loss
        acc["n"] += 1

    @trainer.on(Events.EPOCH_COMPLETED)
    def _epoch(engine: Engine) -> None:
        seconds = data_t.value() + step_t.value()
        samples = acc["samples"] * idist.get_world_size()
        engine.state.epoch_log.update({
            "train_loss_epoch": acc["loss"] / max(acc["n"], 1), "lr": acc["lr"], "epoch_time_s": seconds,
            "samples_per_s": samples / seconds, "voxels_per_s": samples * roi_voxels / seconds,
            "data_wait_fraction": data_t.value() / seconds})
        epochs_log.log(logging.INFO if idist.get_rank() == 0 else logging.DEBUG, "epoch %d/%d: %s", engine.state.epoch,
                      engine.state.max_epochs, ", ".join(f"{k} {v:.4g}" for k, v in engine.state.epoch_log.items()))


class ModelSaver:
    """Evaluator handler, the one writer of ``model.pt``: after each validation the network's
    weights go to ``path`` (a plain state_dict, atomically, rank 0: ``checkpoints.save_weights``)
    when ``metric`` is the best so far (``selection`` "best") or always ("last": the last
    weights, for validation cases that are also the test set, so nothing is selected on them).
    Every bundle lists it in ``validate#handlers``, so ``segpipe train`` and ``python -m
    monai.bundle run`` write ``model.pt`` alike; ``saved_now`` says whether the last validation
    wrote it, ``best``/``best_epoch`` what is in it.

    Example (train.json)::

        {"_target_": "pipeline.handlers.ModelSaver", "network": "@network",
         "path": "$@output_dir + '/model.pt'", "selection": "@model_selection"}
    """

    def __init__(self, network: torch.nn.Module, path: str | Path, selection: str = "best",
                 metric: str = "val_mean_dice") -> None:
        if selection not in ("best", "last"):
            raise UsageError(f"model_selection {selection!r}: choose 'best' or 'last'")
        self.network, self.path, self.selection, self.metric = network, Path(path), selection, metric
        self.best, self.best_epoch, self.saved_now = -math.inf, 0, False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)
        attach_rng_guard(engine)  # every bundle's evaluator holds a ModelSaver: see attach_rng_guard

    def __call__(self, engine: Engine) -> None:
        value = engine.state.metrics.get(self.metric)
        self.saved_now = value is not None and (self.selection == "last" or value > self.best)
        if self.saved_now:
            self.best, self.best_epoch = float(value), int(engine.state.epoch)
            self.save()

    def save(self) -> Path:
        return checkpoints.save_weights(self.network, self.path)


def attach_rng_guard(evaluator: Engine) -> None:
    """Leave the training's random stream as it was before each run of ``evaluator``: the random
    states of torch (CPU and initialised CUDA devices), numpy and ``random`` are saved when it
    starts and restored when it completes. Without it a validation moves torch's global
    generator (its DataLoader draws a base seed), so two runs with one seed and different
    ``val_interval`` train differently. ``ModelSaver.attach`` calls it, and every bundle's
    ``validate#handlers`` lists a ModelSaver, so this holds for ``segpipe train`` and ``python -m
    monai.bundle run`` alike; a second call on the same engine does nothing."""
    if getattr(evaluator, "_segpipe_rng_guard", False):
        return
    evaluator._segpipe_rng_guard = True
    saved: dict[str, object] = {}

    def _save(engine: Engine) -> None:
        saved.update(torch=torch.get_rng_state(), numpy=np.random.get_state(), random=random.getstate(),
                     cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)

    def _restore(engine: Engine) -> None:
        if not saved:
            return
        torch.set_rng_state(saved["torch"])
        np.random.set_state(saved["numpy"])
        random.setstate(saved["random"])
        if saved["cuda"] is not None:
            torch.cuda.set_rng_state_all(saved["cuda"])
        saved.clear()

    evaluator.add_event_handler(Events.STARTED, _save)
    evaluator.add_event_handler(Events.COMPLETED, _restore)
    evaluator.add_event_handler(Events.TERMINATE, _restore)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 31-bit seed for one epoch of one rank, well mixed (numpy's SeedSequence), so neighbouring
    epochs and ranks get unrelated streams."""
    return int(np.random.SeedSequence([int(seed) % 2**32, int(epoch), int(rank)]).generate_state(1)[0] % 2**31)


def attach_epoch_seeds(trainer: Engine, seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy, ``random`` and the training dataset's random transforms
    (MONAI's ``set_rnd``) from ``epoch_seed(seed, epoch, rank)`` when each epoch starts.

    Ignite creates the epoch's data iterator after EPOCH_STARTED, so the shuffle and the
    augmentations follow: those of the main process directly, those of a loader's persistent
    workers through ``pipeline.loaders.EpochSeeded``. Without it a run resumed at epoch k replays
    epoch 1's stream from the bundle's ``set_determinism`` and ends with other weights than the
    run that was never stopped; with it both train on the same crops in the same order."""

    def _seed(engine: Engine) -> None:
        value = epoch_seed(seed, engine.state.epoch, idist.get_rank())
        torch.manual_seed(value)
        np.random.seed(value)
        random.seed(value)
        loader = getattr(engine, "data_loader", None)
        generator = getattr(getattr(loader, "sampler", None), "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(value)  # the shuffle (pipeline.loaders.loader gives it its own)
        dataset = getattr(loader, "dataset", None)
        if dataset is not None:
            set_rnd(dataset, value)  # the transforms of the main process (a loader without workers)
        if isinstance(dataset, EpochSeeded):
            dataset.set_seed(value)  # those of its persistent workers (pipeline.loaders)

    trainer.add_event_handler(Events.EPOCH_STARTED, _seed)


class ValidationHandler(MonaiValidationHandler):
    """MONAI's epoch-level ``ValidationHandler`` that also validates the last epoch when
    ``max_epochs`` is not a multiple of ``interval``: under ``python -m monai.bundle run`` a
    200-epoch run validated every 6 epochs would otherwise end with ``model.pt`` chosen at
    epoch 198 at best, or with no ``model.pt`` at all when no epoch was validated."""

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self.epoch_level:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._last_epoch)

    def _last_epoch(self, engine: Engine) -> None:
        if engine.state.epoch == engine.state.max_epochs and engine.state.epoch % self.interval:
            self(engine)


def find_model_saver(handlers: list) -> ModelSaver:
    """The bundle's ``ModelSaver`` among the evaluator handlers (UsageError when it has none)."""
    found = [h for h in handlers if isinstance(h, ModelSaver)]
    if len(found) != 1:
        raise UsageError(f"validate#handlers must list one pipeline.handlers.ModelSaver (found {len(found)})")
    return found[0]


def attach_validation(trainer: Engine, evaluator: Engine, saver: ModelSaver, label_names: list[str],
                      output_dir: Path, val_interval: int, qc_cases: int) -> None:
    """After each validation: Dice per class into the epoch log, one line in the log (Dice per
    class, best so far) and QC pictures in ``output_dir/qc/epoch_<NNNN>/`` (``_qc_pictures``;
    their paths in ``trainer.state.qc_images`` for the tracker); when ``saver`` wrote ``model.pt``, the per-case
    CSV and a copy of the pictures in ``output_dir/qc/``, both of those weights. The last epoch
    is always validated; a run without validation cases saves its last weights. Validation
    leaves the training's random stream alone (``attach_rng_guard``)."""
    attach_rng_guard(evaluator)
    qc.attach_case_collector(evaluator, qc_cases)
    trainer.state.best_val_mean_dice, trainer.state.best_epoch, trainer.state.best_val_dice = -1.0, 0, {}

    @evaluator.on(Events.COMPLETED)
    def _report(engine: Engine) -> None:
        report = qc.summarize(engine, label_names)
        if not report["metrics"]:
            return
        views = qc.gathered_views(engine, qc_cases)  # every rank: under torchrun the cases are shared out
        epoch = trainer.state.epoch
        dice = {k[len("val_dice_"):]: v for k, v in report["metrics"].items() if k.startswith("val_dice_")}
        trainer.state.qc_images = []
        if idist.get_rank() == 0:
            trainer.state.qc_images = _qc_pictures(views, report, label_names, output_dir, epoch,
                                                   reference=not getattr(trainer.state, "qc_reference", False))
            trainer.state.qc_reference = True
        if saver.saved_now:
            trainer.state.best_val_mean_dice, trainer.state.best_epoch = saver.best, saver.best_epoch
            trainer.state.best_val_dice = dice
            if idist.get_rank() == 0:  # the pictures and per-case Dice of the weights in model.pt
                qc.write_case_csv(output_dir / "val_cases.csv", report)
                for _, path, step in trainer.state.qc_images:
                    if step == epoch:
                        with atomic_path(output_dir / "qc" / path.name) as tmp:
                            shutil.copyfile(path, tmp)
        report["metrics"]["best_val_mean_dice"] = trainer.state.best_val_mean_dice
        trainer.state.epoch_log.update(report["metrics"])
        if idist.get_rank() == 0:
            log.info("epoch %d/%d validation: Dice %s; mean %.4f (%s %.4f, epoch %d)", epoch,
                     trainer.state.max_epochs, ", ".join(f"{k} {v:.4f}" for k, v in dice.items()),
                     report["metrics"]["val_mean_dice"], "best" if saver.selection == "best" else "saved",
                     trainer.state.best_val_mean_dice, trainer.state.best_epoch)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _final(engine: Engine) -> None:  # for bundles whose train#handlers hold MONAI's ValidationHandler
        validated = evaluator.state.epoch == engine.state.epoch  # by this module's ValidationHandler
        if engine.state.epoch == engine.state.max_epochs and engine.state.epoch % val_interval and not validated:
            evaluator.run(engine.state.epoch)

    @trainer.on(Events.COMPLETED)
    def _never_validated(engine: Engine) -> None:
        if engine.state.best_epoch == 0:
            log.warning("no validation result (no validation cases?): %s holds the last weights", saver.path)
            saver.save()


def _qc_pictures(views: list, report: dict, label_names: list[str], output_dir: Path, epoch: int,
                 reference: bool) -> list[tuple[str, Path, int]]:
    """This validation's QC pictures as ``(case, path, step)``: ``qc/epoch_<NNNN>/qc_<case>.png``
    at step ``epoch``; with ``reference`` (a run's first validation) also the reference alone in
    ``qc/epoch_0000/`` at step 0, where MLflow's image slider starts when there are several steps."""
    case_dice = {case: qc.case_mean(row) for case, row in report["cases"]}
    out = []
    pictures = [(epoch, f"epoch {epoch}", True)] + ([(0, "reference", False)] if reference else [])
    for step, title, predicted in pictures:
        paths = qc.write_overlays(output_dir / "qc" / f"epoch_{step:04d}", views, label_names, title=title,
                                  dice=case_dice if predicted else None, predicted=predicted)
        out += [(case, path, step) for (case, _), path in zip(views, paths, strict=True)]
    return out


def attach_weight_average(trainer: Engine, network: torch.nn.Module, decay: float,
                          path: Path) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of ``network``'s weights (torch's ``AveragedModel``; after
    each iteration ``avg = decay * avg + (1 - decay) * w``, buffers too), written to ``path`` when
    training completes. ``decay`` 0 turns it off (returns None). The caller adds the returned
    module to the checkpointed objects so a resumed run keeps its average."""
    if not decay:
        return None
    if not 0.0 < decay < 1.0:
        raise UsageError(f"ema_decay {decay}: must be in (0, 1), or 0 for off")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    averaged = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _update(engine: Engine) -> None:
        averaged.update_parameters(network)

    @trainer.on(Events.COMPLETED)
    def _save(engine: Engine) -> None:
        if idist.get_rank() == 0:
            checkpoints.save_weights(averaged.module, path)
            log.info("weight average (decay %g, %d updates): %s", decay, int(averaged.n_averaged), path)

    return averaged


def attach_tracker(tracker: RunTracker, trainer: Engine, loss_every: int = 1, progress_png: Path | None = None,
                   flush: bool = True) -> None:
    """Log ``train_loss`` per iteration (every ``loss_every``) and, at each epoch end, the dict the
    engines left in ``trainer.state.epoch_log`` (epoch loss, lr, timing, validation), then flush
    (with ``flush``; training commits and flushes after each checkpoint instead).
    After an epoch with a validation also the QC images ``handlers.attach_validation`` left in
    ``trainer.state.qc_images`` (key ``qc/<case>``, step = epoch; 0 for the reference alone) and
    ``progress_png`` redrawn from the journal."""
    def _iteration(engine: Engine) -> None:
        loss = from_engine(["loss"], first=True)(engine.state.output)
        tracker.log_metrics({"train_loss": float(loss)}, step=engine.state.iteration)

    def _epoch(engine: Engine) -> None:
        epoch_log = getattr(engine.state, "epoch_log", {})
        tracker.log_metrics(epoch_log, step=engine.state.epoch)
        if "val_mean_dice" in epoch_log:
            for case, path, step in getattr(engine.state, "qc_images", []):
                tracker.log_image(path, f"qc/{image_key(case)}", step)
            if progress_png is not None:
                from pipeline.progress import plot_progress

                tracker.log_artifact(plot_progress(tracker.journal, progress_png))
        if flush:
            tracker.flush()

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=loss_every), _iteration)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, _epoch)


def image_key(name: str) -> str:
    """``name`` with only the characters MLflow allows in an image key."""
    return "".join(c if c.isalnum() or c in "_-. " else "_" for c in name)
