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

from guardx.distributed.context import DistContext, PeerLostError, finalize, init_distributed
from guardx.distributed.engine import Engine, build_engine

__all__ = ["DistContext", "PeerLostError", "init_distributed", "finalize", "Engine", "build_engine"]
