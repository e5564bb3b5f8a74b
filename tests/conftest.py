"""Shared fixtures: small synthetic datasets written once per test session.

Each fixture returns the path of the dataset's ``dataset.json`` (MSD layout, relative paths).
Treat the files as read-only: copy them into ``tmp_path`` before changing anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.synthetic import write_dataset


@pytest.fixture(scope="session")
def ct_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 ct3d studies of shape (32, 32, 12): HU int16 images, labels 1 liver, 2 kidney, 3 spleen."""
    return write_dataset("ct3d", 4, tmp_path_factory.mktemp("ct3d"), seed=0, shape=(32, 32, 12))


@pytest.fixture(scope="session")
def mr_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 mr3d studies of shape (32, 32, 12): float32 images with a bias field, same labels as CT."""
    return write_dataset("mr3d", 4, tmp_path_factory.mktemp("mr3d"), seed=0, shape=(32, 32, 12))


@pytest.fixture(scope="session")
def cells_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 cells2d images of 64x64: semantic labels (1 cell) and uint16 instances ("instance" key)."""
    return write_dataset("cells2d", 4, tmp_path_factory.mktemp("cells2d"), seed=0, shape=(64, 64))
