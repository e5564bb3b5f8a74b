"""``pipeline.handlers.attach_weight_average``: an exponential moving average of the weights,
updated after every iteration of a real ignite Engine and written as a plain state_dict."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from pipeline.errors import UsageError
from pipeline.handlers import attach_weight_average


def test_average_follows_the_ema_formula_and_is_saved(tmp_path):
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)

    def step(engine: Engine, value: float) -> None:
        with torch.no_grad():
            net.weight.fill_(value)

    engine = Engine(step)
    path = tmp_path / "model_ema.pt"
    averaged = attach_weight_average(engine, net, 0.5, path)
    engine.run([2.0, 4.0, 8.0], max_epochs=1)
    # torch's EMA starts from the weights at the first update, then avg = 0.5 avg + 0.5 w
    expected = 2.0
    for w in (4.0, 8.0):
        expected = 0.5 * expected + 0.5 * w
    assert averaged is not None and int(averaged.n_averaged) == 3
    saved = torch.load(path, weights_only=True)
    assert list(saved) == ["weight"] and saved["weight"].item() == pytest.approx(expected)  # 5.5, not the last 8.0
    assert net.weight.item() == 8.0  # the trained network itself is untouched


def test_off_and_bad_decay(tmp_path):
    engine = Engine(lambda e, b: None)
    assert attach_weight_average(engine, torch.nn.Linear(1, 1), 0.0, tmp_path / "m.pt") is None
    with pytest.raises(UsageError, match="ema_decay 1.5"):
        attach_weight_average(engine, torch.nn.Linear(1, 1), 1.5, tmp_path / "m.pt")
    engine.run([0], max_epochs=1)
    assert not (tmp_path / "m.pt").exists()
