"""Datasets and loaders for training bundles; the same config runs alone or under ``torchrun``.

Bundles cache the deterministic transforms (load, orient, resample, scale, pad, weight map) with
MONAI's ``CacheDataset`` (in memory) or ``PersistentDataset`` (on disk): both stop caching at the
first random transform, so crops and augmentations are drawn fresh every epoch.

A loader with workers keeps them between epochs (``persistent_workers``) and wraps its dataset in
``EpochSeeded``, so ``pipeline.handlers.attach_epoch_seeds`` reaches the random transforms inside
the workers too: every epoch's augmentations follow from the epoch's seed, in a resumed run as in
the uninterrupted one.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, DistributedSampler, PersistentDataset
from monai.data.utils import set_rnd
from monai.transforms import Compose
from torch.utils.data import RandomSampler

from pipeline.errors import InputError

log = logging.getLogger(__name__)


def cached_dataset(data: Sequence[dict], transform: Compose, cache_dir: str | None = None,
                   cache_rate: float = 1.0, num_workers: int = 0) -> torch.utils.data.Dataset:
    """``PersistentDataset`` under ``cache_dir`` when given, else an in-memory ``CacheDataset``."""
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(list(data), transform, cache_dir=cache_dir)
    return CacheDataset(list(data), transform, cache_rate=cache_rate, num_workers=num_workers or 1,
                        progress=False)


class EpochShuffle(RandomSampler):
    """torch's ``RandomSampler`` with its own generator, drawing the whole epoch's order when its
    iterator starts. torch's draws once more after the last index, which an ignite epoch that
    stops at ``epoch_length`` leaves to the next epoch, after that epoch's seed was set: so an
    uninterrupted run and a resumed one would shuffle their next epoch differently."""

    def __init__(self, data_source: Sequence) -> None:
        super().__init__(data_source, generator=torch.Generator())

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__()))


class EpochSeeded(torch.utils.data.Dataset):
    """``dataset`` behind a seed shared with the DataLoader's workers (shared memory, set by the
    main process with ``set_seed`` before an epoch's iterator starts). A worker that sees a new
    seed reseeds its copy of the random transforms from it and its worker id before its next item,
    so persistent workers draw each epoch's augmentations from that epoch's seed instead of
    continuing the stream they were started with."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset
        self.seed = multiprocessing.get_context().Value("q", -1, lock=False)
        self._seen = -1

    def set_seed(self, seed: int) -> None:
        self.seed.value = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        seed = self.seed.value
        if seed != self._seen and seed >= 0:
            info = torch.utils.data.get_worker_info()
            own = (seed + 104729 * (info.id + 1 if info else 0)) % 2**31
            torch.manual_seed(own)  # for a transform that draws from the global streams
            np.random.seed(own)
            random.seed(own)
            set_rnd(self.dataset, own)
            self._seen = seed
        return self.dataset[index]


def loader(dataset: torch.utils.data.Dataset, batch_size: int = 1, shuffle: bool = False,
           num_workers: int = 0, **kwargs: Any) -> DataLoader:
    """A MONAI ``DataLoader``; under a distributed run each process gets its share through
    ``DistributedSampler`` (training shards padded to equal size, validation shards not, so no
    case is counted twice: InputError when some process would get none; a loader without cases,
    the validation of ``num_folds`` 1, is one on every process). ``batch_size`` is per process. A shuffling loader's sampler and the
    workers' base seed have generators of their own, so creating an iterator (which a resumed run
    does one epoch later than the uninterrupted one) takes nothing from torch's global stream."""
    sampler, world, cases = None, idist.get_world_size(), len(dataset)  # type: ignore[arg-type]
    if world > 1 and not shuffle and 0 < cases < world:
        raise InputError(f"{cases} validation case(s) for {world} processes: under torchrun each process validates "
                         "a share of the cases and needs at least one (no case is counted twice); start at most "
                         f"{cases} processes (--nproc_per_node) or validate more cases (a lower num_folds)")
    if world > 1 and cases:  # none at all (num_folds 1): as on one process
        sampler = DistributedSampler(dataset, shuffle=shuffle, even_divisible=shuffle)
    elif shuffle:  # its own generator, seeded each epoch by attach_epoch_seeds
        sampler = EpochShuffle(dataset)
    if num_workers > 0:
        dataset = EpochSeeded(dataset)
    kwargs.setdefault("generator", torch.Generator())  # the workers' base seed: not a draw from torch's global stream
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(), **kwargs)
