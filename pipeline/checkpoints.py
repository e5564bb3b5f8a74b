"""Checkpoints that survive a SIGKILL, resume at the right epoch, and refuse a different network
or other settings (``check_resume_settings``).

- ``checkpoint_<epoch>.pt`` in ``output_dir/checkpoints``: model, optimizer, LR scheduler, AMP
  grad scaler (CUDA fp16 only), weight average and early-stopping count when used, and trainer
  state (epoch, iteration, best validation Dice, the time budget spent). Random states are not
  saved: ``pipeline.handlers.attach_epoch_seeds`` derives each epoch's from the seed. Written
  by Ignite's ``Checkpoint`` through ``DiskSaver(atomic=True)`` (a temp file renamed into place),
  the two newest kept, so a kill during a write leaves the previous file intact.
- ``output_dir/model.pt``: the best weights (mean validation Dice) as a plain state_dict, also
  written atomically; ``torch.load(path, weights_only=True)`` loads both kinds.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from pipeline.errors import InputError, SegpipeError, UsageError, first_line

log = logging.getLogger(__name__)

PATTERN = re.compile(r"^checkpoint_(\d+)\.pt$")
BEST_KEYS = ["best_val_mean_dice", "best_epoch", "best_val_dice"]
#: ids a resumed run may change (they steer the run, not what it learns): more epochs, another device, ...
#: and the bundle's ``_meta_`` (a new version, changelog or DICOM SEG codes do not change the recipe)
RESUMABLE_CHANGES = frozenset({
    "_meta_", "output_dir", "bundle_root", "manifest", "dataset_dir", "max_epochs", "val_interval", "checkpoint_interval",
    "qc_cases", "export", "num_workers", "device", "amp", "compile", "cache_dir", "cache_rate", "time_budget_min",
    "early_stop_patience",
})


def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else network


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the complete checkpoints in ``ckpt_dir``, oldest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).iterdir() if (m := PATTERN.match(p.name))]
    return sorted(found)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def attach_checkpointing(trainer: Engine, objects: dict[str, Any], ckpt_dir: Path, every: int = 1) -> Checkpoint:
    """Save ``objects`` every ``every`` epochs and when training completes (rank 0 only).
    Checkpoints already in ``ckpt_dir`` (a resumed run) join the rotation."""
    ckpt_dir = Path(ckpt_dir)
    for tmp in ckpt_dir.glob("tmp*"):  # left by a write that was killed: never a valid checkpoint
        tmp.unlink(missing_ok=True)
    trainer.state.world_size = idist.get_world_size()  # a resume with another number of processes is refused
    for key in (*BEST_KEYS, "world_size"):
        if key not in trainer.state_dict_user_keys:
            trainer.state_dict_user_keys.append(key)
    handler = Checkpoint(objects, DiskSaver(ckpt_dir, atomic=True, require_empty=False), filename_prefix="",
                         n_saved=2, global_step_transform=lambda engine, _: engine.state.epoch)
    handler.load_state_dict({"_saved": [(epoch, p.name) for epoch, p in list_checkpoints(ckpt_dir)]})

    def _save(engine: Engine) -> None:
        if not any(epoch == engine.state.epoch for epoch, _ in list_checkpoints(ckpt_dir)):
            with write_errors(ckpt_dir / f"checkpoint_{engine.state.epoch}.pt"):
                handler(engine)

    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=every), _save)
    trainer.add_event_handler(Events.COMPLETED, _save)
    return handler


def check_compatible(saved: dict[str, torch.Tensor], network: nn.Module, path: Path) -> None:
    """InputError in one line when ``saved`` weights do not fit ``network`` (keys or shapes)."""
    own = _unwrap(network).state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [k for k in own if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        example = (f"{shapes[0]}: saved {tuple(saved[shapes[0]].shape)} vs {tuple(own[shapes[0]].shape)}" if shapes
                   else f"e.g. {(missing or unexpected)[0]!r}")
        raise InputError(f"{path}: checkpoint is from a different network ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(shapes)} mis-shaped weights; {example})")


def resume(path: Path, objects: dict[str, Any], trainer: Engine, max_epochs: int) -> int:
    """Load a checkpoint into ``objects`` (network first checked for fit) and set the trainer to
    continue up to ``max_epochs``; return the epoch it was saved at. UsageError when the run was
    trained with another number of processes (``world_size``: the global batch and what an epoch
    is would change). A cosine schedule the checkpoint planned over another number of epochs than
    the config's now (``--epochs`` changed) goes on as the config's (``retarget_cosine``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise InputError(f"{path}: cannot read checkpoint ({type(e).__name__}: {first_line(e)[:120]})") from e
    check_compatible(state["model"], objects["model"], path)
    saved = state.get("trainer", {})
    world, now = saved.get("world_size"), idist.get_world_size()
    if world is not None and int(world) != now:
        raise UsageError(f"{path}: the run was trained with {int(world)} process(es), this is {now}: each trains a "
                         f"share of every epoch with its own batch, so the rest would be another recipe; resume it "
                         f"with {int(world)} (torchrun --nproc_per_node {int(world)}), or train into another output "
                         "folder")
    scheduler = objects.get("lr_scheduler")
    planned = getattr(scheduler, "T_max", None)  # the config's, before the checkpoint's is loaded
    for key in BEST_KEYS:
        if key not in trainer.state_dict_user_keys and key in saved:
            trainer.state_dict_user_keys.append(key)
    absent = [k for k in trainer.state_dict_user_keys if k not in saved]  # e.g. a checkpoint from before
    for key in absent:                                                     # the time budget was kept
        trainer.state_dict_user_keys.remove(key)
    Checkpoint.load_objects({k: v for k, v in objects.items() if k in state}, state)
    trainer.state_dict_user_keys.extend(absent)  # saved from now on, with their fresh values
    epoch = int(trainer.state.epoch)
    trainer.state.max_epochs = max(max_epochs, epoch)
    if planned is not None and scheduler.T_max != planned and epoch < max_epochs:
        retarget_cosine(scheduler, int(planned))
    log.info("resumed from %s at epoch %d (iteration %d), training to epoch %d", path, epoch,
             trainer.state.iteration, trainer.state.max_epochs)
    return epoch


def retarget_cosine(scheduler: torch.optim.lr_scheduler.CosineAnnealingLR, t_max: int) -> None:
    """Make a cosine schedule restored from a checkpoint go on over ``t_max`` epochs: the
    optimizer's learning rates become the closed form at the epoch reached, as in a run planned
    over ``t_max`` epochs from the start, and torch's recursive steps continue that curve. Before,
    a 20-epoch run resumed to 26 kept T_max 20: one epoch at lr 0, then the rate climbed again."""
    before = scheduler.T_max
    scheduler.T_max = t_max
    lrs = [scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * scheduler.last_epoch / t_max)) / 2
           for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() and the recursive form start from
    log.info("learning-rate schedule: cosine over %d epochs (the checkpoint's: %d); lr at epoch %d: %.3g", t_max,
             before, scheduler.last_epoch, lrs[0])


def check_resume_settings(parser: Any, output_dir: Path, roots: Sequence[str] | None = None) -> None:
    """UsageError when a resumed run with epochs left would go on with other settings than it was
    trained with (its ``config_resolved.json``): a changed ``--set`` (learning rate, patch size,
    fold, seed, ...) or an edited bundle would train the rest of the run on another recipe, and a
    cross-validation rerun would mix folds of two recipes. Ids in ``RESUMABLE_CHANGES`` may change.
    With ``roots`` (the ids training reads) only they and the ids they reference, however deep,
    count: a setting only prediction reads (``folds`` after an export, TTA, the inference
    dataset) is not the recipe."""
    saved_file = output_dir / "config_resolved.json"
    if not saved_file.is_file():
        return  # a run from before this file existed: nothing to compare with
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{saved_file}: unreadable ({type(e).__name__}: {first_line(e)[:80]}), so the settings the run "
                         "was trained with are unknown; delete it to resume with these") from None
    saved, now = _without_budget_handler(saved), _without_budget_handler(parser.get())

    used = None if roots is None else _referenced(saved, roots) | _referenced(now, roots)
    changed = [k for k in sorted(set(saved) | set(now)) if k not in RESUMABLE_CHANGES and (used is None or k in used)
               and _text(saved.get(k)) != _text(now.get(k))]
    if changed:
        shown = "; ".join(first_difference(k, saved.get(k), now.get(k)) for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise UsageError(f"{output_dir}: --resume with other settings than the run was trained with ({shown}{more}); "
                         f"resume with its settings, train into another output folder, or delete {saved_file.name} "
                         "there to resume with these")


#: the bundle's handler of the time budget (bundles since 2026-12-05): the budget itself is the id
#: time_budget_min, which segpipe train applied before the handler existed, so a run started without
#: it trains the same with it and resumes
BUDGET_HANDLER = "pipeline.time_budget.TimeBudget"


def _without_budget_handler(value: Any) -> Any:
    """``value`` (a config) with every ``{"_target_": BUDGET_HANDLER, ...}`` list entry left out."""
    if isinstance(value, dict):
        return {k: _without_budget_handler(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_budget_handler(v) for v in value
                if not (isinstance(v, dict) and v.get("_target_") == BUDGET_HANDLER)]
    return value


#: ids that may differ between the processes of one torchrun (paths on other nodes, each its own GPU)
PER_PROCESS = frozenset({"_meta_", "output_dir", "bundle_root", "manifest", "dataset_dir", "device", "num_workers",
                         "cache_dir", "cache_rate", "qc_cases", "export"})


def check_same_recipe(parser: Any, roots: Sequence[str], manifest_sha256: str) -> None:
    """Under torchrun, UsageError on every process unless all train the same recipe: the ids
    ``roots`` read (and what they reference) less ``PER_PROCESS``, and the manifest's content. Two
    nodes started with other ``--set`` values would step one model's averaged gradients with two
    learning rates (or wait for each other at different epochs)."""
    if idist.get_world_size() < 2:
        return
    config = parser.get()
    mine = {k: config[k] for k in sorted(_referenced(config, roots)) if k in config and k not in PER_PROCESS}
    mine["manifest (sha256)"] = manifest_sha256
    texts = idist.all_gather(_text(mine))
    first = json.loads(texts[0])
    other = next((r for r, t in enumerate(texts) if t != texts[0]), None)
    if other is not None:
        theirs = json.loads(texts[other])
        key = next(k for k in sorted(set(first) | set(theirs)) if _text(first.get(k)) != _text(theirs.get(k)))
        raise UsageError(f"process {other} of {len(texts)} was started with other settings than process 0 "
                         f"({first_difference(key, first.get(key), theirs.get(key))}); start every node with the "
                         "same bundle, --set values and manifest")


def _referenced(config: dict[str, Any], roots: Sequence[str]) -> set[str]:
    """The top-level ids of ``config`` that ``roots`` are or reference (``@id``, also inside ``$``
    expressions), transitively (MONAI's ``ReferenceResolver``)."""
    from monai.bundle import ConfigParser
    from monai.bundle.reference_resolver import ReferenceResolver

    parser = ConfigParser(config)
    todo = [ReferenceResolver.normalize_id(r) for r in roots]
    seen: set[str] = set()
    while todo:
        ref = todo.pop()
        if ref in seen or ref not in parser:
            continue
        seen.add(ref)
        todo += ReferenceResolver.find_refs_in_config(parser.get(ref), ref)
    return {ref.split(ReferenceResolver.sep)[0] for ref in seen}


def _text(value: Any) -> str:  # "#" is MONAI's old id separator, "::" what a parsed config holds
    return json.dumps(value, sort_keys=True, default=str).replace("#", "::")


def first_difference(key: str, old: Any, new: Any) -> str:
    """``key old -> new`` at the first nested entry that differs (``train::handlers::2::interval``;
    an entry one side lacks shows as absent), so that a change deep in a long section is shown,
    not the section's common beginning."""
    absent = "(absent)"

    def at(value: dict | list, sub: Any) -> Any:
        return value.get(sub, absent) if isinstance(value, dict) else value[sub]

    while (isinstance(old, dict) and isinstance(new, dict)) or (
            isinstance(old, list) and isinstance(new, list) and len(old) == len(new)):
        keys = sorted(set(old) | set(new), key=str) if isinstance(old, dict) else range(len(old))
        sub = next(k for k in keys if _text(at(old, k)) != _text(at(new, k)))
        key, old, new = f"{key}::{sub}", at(old, sub), at(new, sub)
    return f"{key} {_text(old)[:40]} -> {_text(new)[:40]}"


def save_weights(network: nn.Module, path: Path) -> Path:
    """Write ``network``'s weights atomically as a plain state_dict (rank 0 only)."""
    path = Path(path)
    with write_errors(path):
        DiskSaver(path.parent, atomic=True, require_empty=False)(_unwrap(network).state_dict(), path.name)
    return path


@contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """A failed write (disk full, a file-size limit: torch reports these as a RuntimeError from
    its zip writer, ``inline_container.cc``, or an OSError) becomes one line naming the file. DiskSaver's atomic write has
    removed its temp file by then, so earlier checkpoints and weights are left as they were."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "inline_container" not in str(e):  # not torch's zip writer
            raise
        reason = first_line(e)[:160]
        raise SegpipeError(f"{path}: cannot write ({reason}); is the disk full or a file-size limit set? "
                           "the earlier checkpoints are intact") from e
