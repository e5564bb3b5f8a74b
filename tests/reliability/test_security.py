"""Security: weights and checkpoints never unpickle code; the UI binds to loopback; the README says
bundle configs are code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine

from pipeline.checkpoints import resume
from pipeline.errors import InputError
from pipeline.predict_io import load_weights

ROOT = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this runs a shell command: what a booby-trapped model.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _evil(path: Path, marker: Path, wrap: str | None) -> Path:
    obj = {"weight": _Payload(marker)}
    torch.save({wrap: obj} if wrap else obj, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    return path


@pytest.mark.parametrize("wrap", [None, "model"])
def test_weights_with_a_pickled_payload_are_refused_unrun(tmp_path: Path, wrap: str | None) -> None:
    marker = tmp_path / "pwned"
    net = torch.nn.Linear(2, 2)
    with pytest.raises(InputError, match="cannot load weights") as e:
        load_weights(net, _evil(tmp_path / "model.pt", marker, wrap))
    assert str(tmp_path / "model.pt") in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_checkpoint_with_a_pickled_payload_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _evil(tmp_path / "checkpoint_1.pt", marker, "model")
    with pytest.raises(InputError, match="cannot read checkpoint"):
        resume(path, {"model": torch.nn.Linear(2, 2)}, Engine(lambda e, b: None), 3)
    assert not marker.exists()


def test_ui_binds_loopback_and_readme_says_bundles_are_code() -> None:
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "Bundle configs are code" in readme and "only bundles you trust" in readme
