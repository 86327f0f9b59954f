"""The only place that knows the distributed backend.

Stages call :func:`init_distributed` (reads torchrun's ``env://`` variables) and :func:`build_engine`,
then drive the engine with ``engine.start_step(n); loss, stats = engine(x, y); engine.backward(loss);
engine.step()`` (see :mod:`guardx.distributed.engine`). No stage imports DDP or DeepSpeed itself.

* ``context.py`` — process group from torchrun's environment, rank helpers, clean shutdown, and
  :class:`PeerLostError` (a dead or stalled rank ends the run with one line instead of a hang);
* ``engine.py`` — the engine interface and the single-process engine (autocast, accumulation, clipping);
* ``ddp.py`` — DistributedDataParallel;
* ``deepspeed_engine.py`` — DeepSpeed ZeRO-0/1/2 with consolidated, world-size-independent checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from guardx.distributed.context import DistContext, PeerLostError, finalize, init_distributed
from guardx.distributed.engine import Engine
from guardx.errors import ConfigError


def per_rank_batch(global_batch: int, world_size: int, key: str, grad_accum: int = 1) -> int:
    """Micro-batch per rank: the global batch is split over ranks and accumulation steps."""
    if global_batch % (world_size * grad_accum):
        raise ConfigError(f"{key}={global_batch} is not divisible by the world size {world_size}"
                          + (f" × distributed.grad_accum {grad_accum}" if grad_accum > 1 else ""))
    return global_batch // (world_size * grad_accum)


def build_engine(step_module: nn.Module, *, optimizer: torch.optim.Optimizer, scheduler=None, cfg, ctx,
                 grad_clip: float = 0.0, global_batch: int = 0) -> Engine:
    """Wrap ``step_module`` (an :class:`~guardx.objectives.ObjectiveStep`) for ``cfg.distributed.backend``.

    The optimiser is built by the caller on the model's parameters, after the model is on its device.
    ``global_batch`` (samples per optimiser step over all ranks) is needed by DeepSpeed's config.
    """
    d = cfg.distributed
    common = dict(grad_accum=d.grad_accum, precision=d.precision, device=ctx.device)
    if d.backend == "deepspeed":
        from guardx.distributed.deepspeed_engine import DeepSpeedEngine, check_zero_stage

        check_zero_stage(d, step_module)  # before DeepSpeed is imported: a config error costs nothing
        return DeepSpeedEngine(step_module, optimizer, scheduler, grad_clip, cfg=d, ctx=ctx,
                               global_batch=global_batch, **common)
    if d.backend == "ddp" and ctx.world_size > 1:
        from guardx.distributed.ddp import DDPEngine

        return DDPEngine(step_module, optimizer, scheduler, grad_clip, ctx=ctx, **common)
    if d.backend in ("none", "ddp"):
        return Engine(step_module, optimizer, scheduler, grad_clip, **common)
    raise ConfigError(f"distributed.backend={d.backend!r} is not one of none, ddp, deepspeed")


__all__ = ["DistContext", "PeerLostError", "init_distributed", "finalize", "Engine", "build_engine", "per_rank_batch"]
