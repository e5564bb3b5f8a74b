"""The wall-time budget of a training: a cosine learning rate over the budget, then a stop.

- ``attach_time_budget``: the schedule and the stop on an ignite trainer (its time and end are
  trainer state, so a checkpoint keeps them).
- ``TimeBudget``: the same as a ``train#handlers`` entry, so ``python -m monai.bundle run`` keeps
  the bundle's budget; ``pipeline.train.train_bundle`` attaches it where a bundle lacks the entry.
- ``budget_minutes``: ``time_budget_min`` read alike by both runners and crossval.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

log = logging.getLogger(__name__)

BUDGET_KEYS = ("budget_elapsed_s", "budget_stopped_epoch")  # trainer state a checkpoint keeps


def attach_time_budget(trainer: Engine, optimizer: torch.optim.Optimizer, minutes: float,
                       final_lr_fraction: float = 0.0) -> None:
    """Train for ``minutes`` of wall time (from the first iteration, validations included) under a
    cosine learning-rate schedule over that time: before each iteration every parameter group's
    lr is ``initial * (f + (1 - f) * (1 + cos(pi * elapsed / budget)) / 2)`` (f =
    ``final_lr_fraction``); the first iteration past the budget ends its epoch and the run (the
    last epoch is validated as usual). The epoch count then depends on the machine's speed and
    is logged; ``max_epochs`` stays a cap. For budgets stated in wall time on a shared machine.

    The time spent and the epoch the budget ended are trainer state (``budget_elapsed_s``,
    ``budget_stopped_epoch``, in ``state_dict_user_keys``), so a checkpoint keeps them: a resumed
    run continues the schedule where it was and spends only what is left of the budget, and a run
    the budget has ended stays ended (``segpipe train`` then has nothing to do). The time is taken
    after each iteration and, under torchrun, is the slowest rank's (an all-reduce MAX): every rank
    stops at the same iteration (one that stopped alone left the others waiting in DDP's gradient
    all-reduce) and steps with the same lr (set from the time after the previous iteration)."""
    minutes = budget_minutes(minutes)
    attached = getattr(trainer, "_time_budget_min", None)
    if attached is not None:  # the bundle's TimeBudget, then segpipe train's call: one budget
        if attached != minutes:
            log.warning("time budget: the bundle's TimeBudget handler holds %g min; %g min asked again is ignored",
                        attached, minutes)
        return
    if minutes <= 0:
        return
    trainer._time_budget_min = minutes  # type: ignore[attr-defined]
    budget, base = 60.0 * minutes, [g["lr"] for g in optimizer.param_groups]
    for key in BUDGET_KEYS:
        setattr(trainer.state, key, getattr(trainer.state, key, 0))
        if key not in trainer.state_dict_user_keys:
            trainer.state_dict_user_keys.append(key)
    start: dict[str, float] = {}

    def _clock(engine: Engine) -> float:  # this session's start, less what a checkpoint brought
        return start.setdefault("t", time.perf_counter() - float(engine.state.budget_elapsed_s))

    @trainer.on(Events.ITERATION_STARTED)
    def _lr(engine: Engine) -> None:
        _clock(engine)
        frac = min(float(engine.state.budget_elapsed_s) / budget, 1.0)
        scale = final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * frac))
        for group, lr in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr * scale

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stop(engine: Engine) -> None:
        elapsed = time.perf_counter() - _clock(engine)
        if idist.get_world_size() > 1:  # one clock for all ranks: they stop at one iteration, with one lr
            elapsed = float(idist.all_reduce(elapsed, op="MAX"))
        engine.state.budget_elapsed_s = elapsed
        if elapsed >= budget and engine.state.max_epochs != engine.state.epoch:
            log.info("time budget of %.1f min reached in epoch %d: last epoch", minutes, engine.state.epoch)
            engine.state.max_epochs = engine.state.budget_stopped_epoch = engine.state.epoch
            engine.terminate_epoch()


def budget_minutes(value: Any, id: str = "time_budget_min") -> float:
    """A time budget in minutes: null, false or 0 mean none (0.0); otherwise a finite number. A
    string, a list or NaN is a UsageError naming ``id``, for ``segpipe train`` and ``python -m
    monai.bundle run`` alike (a NaN budget would set every learning rate to NaN and never stop)."""
    from pipeline.errors import UsageError

    try:
        if isinstance(value, (str, list, dict)):  # float("30") is not a setting's number
            raise TypeError
        minutes = float(value or 0)
        if not math.isfinite(minutes):
            raise ValueError
    except (TypeError, ValueError):
        raise UsageError(f"setting {id!r}: expected minutes (a finite number; 0 or null: no budget), got "
                         f"{value!r:.40} (the bundle's value or --set {id}=...)") from None
    return minutes


class TimeBudget:
    """``attach_time_budget`` as a ``train#handlers`` entry, so that ``python -m monai.bundle run``
    keeps the bundle's wall-time budget (``time_budget_min``; 0 or null: none) as ``segpipe
    train`` does, which attaches it too when a bundle lacks this handler (once either way).

    Example (train.json)::

        {"_target_": "pipeline.time_budget.TimeBudget", "optimizer": "@optimizer", "minutes": "@time_budget_min"}
    """

    def __init__(self, optimizer: torch.optim.Optimizer, minutes: float | None, final_lr_fraction: float = 0.0) -> None:
        self.optimizer, self.minutes, self.final_lr_fraction = optimizer, budget_minutes(minutes), final_lr_fraction

    def attach(self, engine: Engine) -> None:
        attach_time_budget(engine, self.optimizer, self.minutes, self.final_lr_fraction)
