"""A seeded, sharded, resumable sampler whose position is world-size independent.

The epoch order is one global permutation (seed + epoch). Rank ``r`` of ``W`` takes every ``W``-th
element of what is left, so the ``k``-th per-rank batches of all ranks together are exactly the
``k``-th global batch. A checkpoint therefore only records how many *global* samples were consumed,
and a run written by 2 ranks resumes on 1 (or 4) at the same place in the same order.
"""
from __future__ import annotations

import math

import torch


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(int(seed) * 100003 + int(epoch))
    return torch.randperm(n, generator=g)


class ShardedSampler(torch.utils.data.Sampler[int]):
    """Train sampler: pads the epoch (wrapping around) so every rank sees the same number of samples.

    ``eval`` mode (``pad=False, shuffle=False``) gives disjoint shards that exactly cover the set.
    """

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, pad: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self.shuffle, self.pad = shuffle, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """``start`` = global samples of this epoch already consumed (from a checkpoint)."""
        self.epoch, self.start = epoch, start

    @property
    def global_size(self) -> int:
        return math.ceil(self.n / self.world_size) * self.world_size if self.pad else self.n

    def indices(self) -> torch.Tensor:
        perm = epoch_permutation(self.n, self.seed, self.epoch, self.shuffle)
        extra = self.global_size - self.n
        if extra > 0:  # wrap around, like DistributedSampler, so all ranks take equal steps
            perm = torch.cat([perm, perm.repeat(math.ceil(extra / max(self.n, 1)))[:extra]])
        return perm[self.start:][self.rank::self.world_size]

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        rest = max(self.global_size - self.start, 0)
        return len(range(self.rank, rest, self.world_size))
