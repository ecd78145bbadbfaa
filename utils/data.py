"""Data loaders whose augmentation is a function of (seed, epoch, sample index).

Each sample draws its random crop and flip from its own seed, so results do not depend on the number of workers,
on persistent workers, or on where an interrupted run was resumed: epoch e of a resumed run sees exactly the same
batches as epoch e of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.dist import get_rank, get_world_size, is_distributed

_SEED_MIX = 1_000_003  # spreads (seed, epoch) pairs apart


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Run a block under ``seed`` (torch, numpy, random) and give the caller its own CPU random states back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededDataset(Dataset):
    """Wraps a dataset; an item key ``(index, seed)`` runs the wrapped ``__getitem__`` under that seed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with seeded_rng(seed):
            return self.dataset[index]


class EpochSampler(Sampler):
    """Yields ``(index, seed)``: shuffled (and sharded under DDP) per epoch, seeds derived from (seed, epoch, index)."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, drop_last: bool = False):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0
        self.rank, self.world = get_rank(), get_world_size()
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * _SEED_MIX + self.epoch)
            return torch.randperm(self.n, generator=g).tolist()
        return list(range(self.n))

    def __iter__(self):
        order = self._order()
        if self.world > 1:
            per_rank = len(order) // self.world if self.drop_last else -(-len(order) // self.world)
            order = (order * 2)[: per_rank * self.world][self.rank::self.world]
        base = (self.seed * _SEED_MIX + self.epoch) * _SEED_MIX
        return iter([(i, (base + i) % 2**63) for i in order])

    def __len__(self) -> int:
        if self.world == 1:
            return self.n
        return self.n // self.world if self.drop_last else -(-self.n // self.world)


def build_loader(dataset: Dataset, *, batch_size: int, train: bool, num_workers: int, seed: int,
                 pin_memory: bool = False) -> DataLoader:
    """Training loaders shuffle and drop the last incomplete batch; evaluation loaders keep every image once."""
    if train:
        sampler = EpochSampler(len(dataset), shuffle=True, seed=seed, drop_last=True)
        data = SeededDataset(dataset)
    elif is_distributed():
        sampler = _EvalShardSampler(len(dataset))
        data = dataset
    else:
        sampler, data = None, dataset
    extra = {"persistent_workers": True, "prefetch_factor": 4} if num_workers > 0 else {}
    return DataLoader(data, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=train,
                      num_workers=num_workers, pin_memory=pin_memory, **extra)


class _EvalShardSampler(Sampler):
    """Every image on exactly one rank (no padding duplicates, unlike DistributedSampler)."""

    def __init__(self, n: int):
        self.indices = list(range(get_rank(), n, get_world_size()))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


__all__ = ["build_loader", "seeded_rng", "SeededDataset", "EpochSampler"]
