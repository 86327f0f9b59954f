"""Process-group set-up from torchrun's environment, and rank-aware helpers."""
from __future__ import annotations

import datetime
import gc
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from guardx.errors import ConfigError
from guardx.utils.misc import pick_device


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj, src: int = 0):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


_CONTEXT: DistContext | None = None


def init_distributed(cfg) -> DistContext:
    """Initialise once per process from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun).

    A single process (no torchrun) gets a world of one whatever the backend. Under torchrun with
    ``distributed.backend=none`` the ranks would silently duplicate work, so that is an error.
    """
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = cfg.distributed.backend
    if world > 1 and backend == "none":
        raise ConfigError(f"launched with WORLD_SIZE={world} but distributed.backend=none: "
                          "set distributed.backend=ddp (or deepspeed)")
    device = pick_device(cfg.run.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        pg_backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(pg_backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s))
    _CONTEXT = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)
    return _CONTEXT


def finalize() -> None:
    """End a distributed run cleanly: barrier → gc → destroy (avoids gloo's exit-time abort race)."""
    global _CONTEXT
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        gc.collect()
        time.sleep(0.2)
        dist.destroy_process_group()
    _CONTEXT = None
