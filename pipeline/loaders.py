"""Datasets and loaders for training bundles; the same config runs alone or under ``torchrun``.

Bundles cache the deterministic transforms (load, orient, resample, scale, pad, weight map) with
MONAI's ``CacheDataset`` (in memory) or ``PersistentDataset`` (on disk): both stop caching at the
first random transform, so crops and augmentations are drawn fresh every epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from monai.data import CacheDataset, DataLoader, DistributedSampler, PersistentDataset
from monai.transforms import Compose

log = logging.getLogger(__name__)


def cached_dataset(data: Sequence[dict], transform: Compose, cache_dir: str | None = None,
                   cache_rate: float = 1.0, num_workers: int = 0) -> torch.utils.data.Dataset:
    """``PersistentDataset`` under ``cache_dir`` when given, else an in-memory ``CacheDataset``."""
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(list(data), transform, cache_dir=cache_dir)
    return CacheDataset(list(data), transform, cache_rate=cache_rate, num_workers=num_workers or 1,
                        progress=False)


def loader(dataset: torch.utils.data.Dataset, batch_size: int = 1, shuffle: bool = False,
           num_workers: int = 0, **kwargs: Any) -> DataLoader:
    """A MONAI ``DataLoader``; under a distributed run each process gets its share through
    ``DistributedSampler`` (training shards padded to equal size, validation shards not, so no
    case is counted twice). ``batch_size`` is per process."""
    sampler = None
    if idist.get_world_size() > 1:
        sampler = DistributedSampler(dataset, shuffle=shuffle, even_divisible=shuffle)
        shuffle = False
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(), **kwargs)
