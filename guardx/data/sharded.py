"""The part of the loader contract the FFCV and DALI backends share: epoch, order and shard bookkeeping.

Both are driven by the same :class:`~guardx.data.sampler.ShardedSampler` as the folder backend, so for
a given (seed, epoch) every backend visits the samples in the same order, pads train epochs the same
way, gives each rank the same shard, and resumes mid-epoch exactly (``set_epoch(epoch, start)``
re-plans the rest of the epoch; nothing is skipped by iterating).
"""
from __future__ import annotations

import math

import torch

from guardx.data.sampler import ShardedSampler


class ShardedLoaderBase:
    def __init__(self, n: int, classes: list[str], *, batch_size: int, rank: int, world_size: int, seed: int,
                 train: bool, shard_block: int = 0):
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed, self.train = rank, world_size, seed, train
        self.sampler = ShardedSampler(n, rank=rank, world_size=world_size, seed=seed, shuffle=train, pad=train,
                                      block=max(shard_block, 1))
        # shard_block = B >= 1 (eval, batch_size == B): batch k of rank r is global block r + k*W (see build_loader)
        self.shard_block = shard_block
        self.skipped: set[str] = set()

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """``start`` = global samples of this epoch already consumed: the rest of the epoch is re-planned."""
        self.sampler.set_epoch(epoch, start)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def shard_indices(self, rank: int | None = None) -> torch.Tensor:
        """Dataset indices rank ``rank`` (default: this one) reads in the current epoch, in order."""
        if rank is None or rank == self.rank:
            return self.sampler.indices()
        other = ShardedSampler(self.sampler.n, rank=rank, world_size=self.world_size, seed=self.seed,
                               shuffle=self.sampler.shuffle, pad=self.sampler.pad, block=self.sampler.block)
        other.set_epoch(self.sampler.epoch, self.sampler.start)
        return other.indices()


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in any memory format → a new contiguous float32 tensor in [0, 1], on x's device.

    The last step of the FFCV pipeline: on a GPU the batch crosses PCIe as uint8 (4x fewer bytes) and is
    converted there; the new tensor also frees FFCV's reusable output buffer for the next batch.
    """
    return x.to(dtype=torch.float32, memory_format=torch.contiguous_format).div_(255)
