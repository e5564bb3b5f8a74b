"""Shared fixtures: small synthetic datasets and one MLflow store, made once per test session.

Each dataset fixture returns the path of the dataset's ``dataset.json`` (MSD layout, relative
paths). Treat the files as read-only: copy them into ``tmp_path`` before changing anything.
Tests that log to MLflow share ``mlflow_store`` and find their own runs by run id.

``--cpu-bf16 on|off|auto`` sets the CPU precision policy of this run and of every process it
starts (``pipeline.amp``: ``SEGPIPE_CPU_BF16``): run the suite once with ``on`` on a CPU
without native bf16 so a test that compares numbers cannot pass here and fail on one with it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.amp import CPU_BF16_ENV
from pipeline.synthetic import write_dataset


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cpu-bf16", choices=["auto", "on", "off"], default="auto",
                     help="CPU bf16 policy for this run: auto (detect), on (force, emulated where not native), off")


def pytest_configure(config: pytest.Config) -> None:
    # a process the tests start (torchrun's ranks, bundle runs) that dies on a signal prints its
    # Python stack into the stderr the test shows: a rare crash in CI is then a stack, not a guess
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    choice = config.getoption("--cpu-bf16")
    if choice != "auto":
        os.environ[CPU_BF16_ENV] = "1" if choice == "on" else "0"


def pytest_report_header(config: pytest.Config) -> str:
    from pipeline.amp import cpu_has_bf16

    return f"segpipe: CPU bf16 policy {'on' if cpu_has_bf16() else 'off'} (--cpu-bf16 {config.getoption('--cpu-bf16')})"


@pytest.fixture(scope="session")
def ct_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 ct3d studies of shape (32, 32, 12): HU int16 images, labels 1 liver, 2 kidney, 3 spleen."""
    return write_dataset("ct3d", 4, tmp_path_factory.mktemp("ct3d"), seed=0, shape=(32, 32, 12))


@pytest.fixture(scope="session")
def ct6_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 ct3d studies of shape (32, 32, 12) (5 patients): enough for 2 folds, or 4 train and 2 validation."""
    return write_dataset("ct3d", 6, tmp_path_factory.mktemp("ct6"), seed=0, shape=(32, 32, 12))


@pytest.fixture(scope="session")
def mr_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 mr3d studies of shape (32, 32, 12): float32 images with a bias field, same labels as CT."""
    return write_dataset("mr3d", 4, tmp_path_factory.mktemp("mr3d"), seed=0, shape=(32, 32, 12))


@pytest.fixture(scope="session")
def cells_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 cells2d images of 64x64: semantic labels (1 cell) and uint16 instances ("instance" key)."""
    return write_dataset("cells2d", 4, tmp_path_factory.mktemp("cells2d"), seed=0, shape=(64, 64))


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite MLflow store for the session (creating one costs a second or two of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
