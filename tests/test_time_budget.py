"""``pipeline.time_budget.attach_time_budget``: a cosine learning rate over wall time and a stop at the
end of the budget, on a real ignite Engine with a sleeping step."""

from __future__ import annotations

import time

import torch
from ignite.engine import Engine, Events

from pipeline.time_budget import attach_time_budget


def _engine(opt: torch.optim.Optimizer, lrs: list[float], step_s: float) -> Engine:
    def step(engine: Engine, batch: int) -> None:
        time.sleep(step_s)
        lrs.append(opt.param_groups[0]["lr"])

    return Engine(step)


def test_budget_stops_at_an_epoch_end_with_cosine_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    lrs: list[float] = []
    engine = _engine(opt, lrs, 0.01)
    ends: list[int] = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: ends.append(e.state.epoch))
    attach_time_budget(engine, opt, minutes=0.6 / 60, final_lr_fraction=0.1)
    t0 = time.perf_counter()
    engine.run(range(10), max_epochs=1000)
    assert 0.6 <= time.perf_counter() - t0 < 2.0
    assert engine.state.max_epochs == engine.state.epoch == ends[-1] < 1000  # the last epoch completed
    assert abs(lrs[0] - 0.5) < 1e-3 and all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert 0.05 - 1e-6 <= lrs[-1] < 0.1  # annealed to the final fraction


def test_no_budget_changes_nothing():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    lrs: list[float] = []
    engine = _engine(opt, lrs, 0.0)
    attach_time_budget(engine, opt, minutes=0)
    engine.run(range(3), max_epochs=2)
    assert engine.state.epoch == 2 and lrs == [0.5] * 6


def test_a_resumed_run_spends_only_what_is_left_of_the_budget():
    """The budget's time and its end are trainer state, so a checkpoint (``state_dict``) keeps them:
    a run killed after 3 epochs resumes on the cosine where it was, not at the peak learning rate,
    stops when the whole budget is spent, and a run the budget ended stays ended."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    engine = _engine(opt, [], 0.01)
    attach_time_budget(engine, opt, minutes=1.0 / 60)
    engine.add_event_handler(Events.EPOCH_COMPLETED(once=3), lambda e: e.terminate())  # the kill
    engine.run(range(10), max_epochs=1000)
    saved = engine.state_dict()
    assert 0.25 <= saved["budget_elapsed_s"] < 0.9 and saved["budget_stopped_epoch"] == 0

    opt2 = torch.optim.SGD([p], lr=0.5)  # a new process: the optimizer at its base lr again
    lrs: list[float] = []
    resumed = _engine(opt2, lrs, 0.01)
    attach_time_budget(resumed, opt2, minutes=1.0 / 60)
    resumed.load_state_dict(saved)
    t0 = time.perf_counter()
    resumed.run(range(10))
    assert lrs[0] < 0.5 * 0.95  # on the cosine at the time spent, not restarted at its peak
    assert time.perf_counter() - t0 < 1.0 - saved["budget_elapsed_s"] + 0.35  # only the rest of the budget
    finished = resumed.state_dict()
    assert finished["budget_elapsed_s"] >= 1.0 and finished["budget_stopped_epoch"] == resumed.state.epoch > 3


def test_the_bundle_handler_and_segpipe_train_attach_one_budget():
    """A bundle's ``TimeBudget`` (train#handlers) attaches the budget; ``segpipe train`` then calls
    ``attach_time_budget`` again for bundles without it: one clock and one lr schedule, not two
    (two would each anneal the lr and each stop the run)."""
    from pipeline.time_budget import TimeBudget

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    engine = _engine(opt, [], 0.0)
    before = len(engine._event_handlers[Events.ITERATION_STARTED])
    TimeBudget(opt, 1.0).attach(engine)
    attach_time_budget(engine, opt, minutes=1.0)
    assert len(engine._event_handlers[Events.ITERATION_STARTED]) == before + 1
    TimeBudget(opt, None).attach(_engine(opt, [], 0.0))  # an empty time_budget_min: none
