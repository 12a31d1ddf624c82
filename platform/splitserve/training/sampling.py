"""Deterministic data order: epoch ``e`` visits the data in the order ``randperm(seed, e)``, and
item ``i`` of epoch ``e`` is augmented under its own RNG seed ``(seed, e, i)``, so what a step sees
depends neither on the number of workers nor on where a run was interrupted.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from a few ints (SplitMix64 steps)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class SeededItems(Dataset):
    """Wraps a dataset so item ``(epoch, index)`` is produced under its own RNG seed.

    Random augmentations then depend only on (seed, epoch, index), not on which worker loads the
    item or on what ran before; the caller's RNG state is left untouched.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            s = mix_seed(self.seed, epoch, index)
            torch.manual_seed(s)
            state = random.getstate()
            random.seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(state)


class EpochBatches(Sampler):
    """Batches of ``(epoch, index)`` for one rank: a seeded permutation per epoch, padded so every
    rank gets the same number of batches (as ``DistributedSampler``), from batch ``start`` on."""

    def __init__(self, size: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, drop_last: bool = True, start: int = 0):
        g = torch.Generator().manual_seed(mix_seed(seed, epoch, 0x5EED))
        order = torch.randperm(size, generator=g).tolist() if shuffle else list(range(size))
        if world > 1:
            per = math.ceil(size / world)
            order = (order * math.ceil(per * world / max(size, 1)))[: per * world]
            order = order[rank::world]
        if drop_last and len(order) >= batch_size:
            n = len(order) // batch_size
        else:
            n = math.ceil(len(order) / batch_size)
        self.batches = [[(epoch, i) for i in order[b * batch_size:(b + 1) * batch_size]] for b in range(n)]
        self.start = start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches[self.start:])

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)

    @property
    def total(self) -> int:
        return len(self.batches)


def move_to(obj: Any, device: torch.device) -> Any:
    """Tensors (inside dataclasses, dicts, lists, tuples) moved to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: move_to(getattr(obj, f.name), device) for f in dataclasses.fields(obj)
                                           if f.init})
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [move_to(v, device) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(move_to(v, device) for v in obj)
    return obj


def batch_images(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):  # a batch per task (finetune --tasks)
        return sum(batch_images(b) for b in batch.values())
    images = getattr(batch, "images", None)
    if isinstance(images, Tensor):
        return int(images.shape[0])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return int(batch[0].shape[0])
    return 0
