"""A seeded, sharded, resumable sampler whose position is world-size independent.

The epoch order is one global permutation (seed + epoch). Rank ``r`` of ``W`` takes every ``W``-th
element of what is left, so the ``k``-th per-rank batches of all ranks together are exactly the
``k``-th global batch. A checkpoint therefore only records how many *global* samples were consumed,
and a run written by 2 ranks resumes on 1 (or 4) at the same place in the same order.
"""
from __future__ import annotations

import math

import torch

from guardx.utils.misc import derive_seed


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(derive_seed("order", int(seed), int(epoch)))
    return torch.randperm(n, generator=g)


class ShardedSampler(torch.utils.data.Sampler[int]):
    """Train sampler: pads the epoch (wrapping around) so every rank sees the same number of samples.

    ``eval`` mode (``pad=False, shuffle=False``) gives disjoint shards that exactly cover the set;
    ``block=B`` there deals out consecutive blocks of B samples instead of single samples, so that with
    batch size B every batch is one fixed global block (evaluation results then do not depend on W).
    """

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, pad: bool = True, block: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if block < 1 or (block > 1 and pad):
            raise ValueError(f"block={block}: block sharding needs block >= 1 and pad=False (eval splits)")
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self.shuffle, self.pad, self.block = shuffle, pad, block
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
        rest = perm[self.start:]
        if self.block == 1:
            return rest[self.rank::self.world_size]
        # block sharding (evaluation): the global order is cut into blocks of `block` consecutive samples
        # and rank r takes blocks r, r+W, ...; a block is then the same set of samples whatever W is
        mine = rest.split(self.block)[self.rank::self.world_size]
        return torch.cat(mine) if mine else rest[:0]

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        rest = max(self.global_size - self.start, 0)
        if self.block == 1:
            return len(range(self.rank, rest, self.world_size))
        blocks = range(self.rank, math.ceil(rest / self.block), self.world_size)
        return sum(min(self.block, rest - b * self.block) for b in blocks)
