"""The only place that knows the distributed backend.

Stages call :func:`init_distributed` (reads torchrun's ``env://`` variables) and :func:`build_engine`,
then drive the engine with ``loss, stats = engine(x, y); engine.backward(loss); engine.step()``.
No stage imports DDP or DeepSpeed itself.
"""
from __future__ import annotations

from guardx.distributed.context import DistContext, finalize, init_distributed
from guardx.distributed.engine import Engine, build_engine

__all__ = ["DistContext", "init_distributed", "finalize", "Engine", "build_engine"]
