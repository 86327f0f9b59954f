"""Training engines: one interface over a single process, DDP and DeepSpeed.

    engine = build_engine(ObjectiveStep(model, objective), optimizer=opt, scheduler=sched, cfg=cfg, ctx=ctx)
    loss, stats = engine(x, y)      # the objective runs inside the wrapped module's forward
    engine.backward(loss)
    engine.step()                   # clip, optimiser step, zero grads, scheduler step
    engine.model                    # the bare model (for saving / evaluation)
    engine.state_dict()             # model + optimiser + scheduler, independent of the world size
"""
from __future__ import annotations

import torch
import torch.nn as nn

from guardx.errors import ConfigError


class Engine:
    """Single-process engine (``distributed.backend=none``)."""

    def __init__(self, step_module: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, grad_clip: float = 0.0):
        self.step_module = step_module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_clip = grad_clip

    @property
    def model(self) -> nn.Module:
        return self.step_module.model

    def train(self, mode: bool = True) -> "Engine":
        self.step_module.train(mode)
        return self

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        return self.step_module(x, y)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])


def build_engine(step_module: nn.Module, *, optimizer: torch.optim.Optimizer, scheduler=None, cfg, ctx,
                 grad_clip: float = 0.0) -> Engine:
    """Wrap ``step_module`` for ``cfg.distributed.backend`` (optimizer built by the caller, after the model
    is on its device)."""
    backend = cfg.distributed.backend
    if backend == "none" or ctx.world_size == 1 and backend == "ddp":
        return Engine(step_module, optimizer, scheduler, grad_clip)
    raise ConfigError(f"distributed.backend={backend!r} is not available in this build")
