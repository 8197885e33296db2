"""Randomness that a --resume replays exactly, whatever --workers: the shuffle of each epoch and the augmentation of
each image are drawn from seeds derived from (--seed, epoch, image), never from a process's running random state.

A loader's worker processes keep their own random state from epoch to epoch (persistent workers) and a resumed
run starts new ones, so augmentation drawn from that state differs after a --resume; so does a shuffle seeded from
the main process's state, which the loader's start consumes differently. Here each epoch's order comes from
(seed, epoch), and the sampler hands the dataset `epoch * len + index`, so a worker knows which epoch an image is
drawn for and seeds its augmentation from that alone.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
from torch.utils.data import Dataset, Sampler


def seed_of(*keys) -> int:
    """A 63-bit seed from any tuple of ints and strings (Python's hash() is salted per process: not usable)."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def seeded(*keys):
    """Torch's CPU random state set from `keys` inside, and put back after (the main process's state, which the
    Trainer saves in its checkpoints, is not disturbed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(*keys))
        yield


class EpochSampler(Sampler):
    """A shuffle of the training set per epoch from (seed, epoch) alone; yields `epoch * n + index` (see the module
    docstring). The Trainer (through accelerate) calls set_epoch before each epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(seed_of(self.seed, "order", self.epoch))
        offset = self.epoch * self.size
        return iter((offset + torch.randperm(self.size, generator=generator)).tolist())


class SeededDataset(Dataset):
    """A training dataset whose item `epoch * n + index` is image `index` augmented under seed (seed, epoch,
    index)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int):
        epoch, index = divmod(int(key), len(self.dataset))
        with seeded(self.seed, "augment", epoch, index):
            return self.dataset[index]
