"""Training engines: one interface over a single process, DDP and DeepSpeed.

    engine = build_engine(ObjectiveStep(model, objective), optimizer=opt, scheduler=sched, cfg=cfg, ctx=ctx,
                          grad_clip=0.0, global_batch=cfg.squeeze.batch_size)
    engine.start_step(n)            # the next optimiser step accumulates n (<= distributed.grad_accum) micro-batches
    loss, stats = engine(x, y)      # the objective runs inside the wrapped module's forward
    engine.backward(loss)           # scaled by 1/n; ranks exchange gradients on the step's last micro-batch only
    engine.step()                   # after the n-th micro-batch: clip, optimiser step, zero grads, scheduler step
    engine.model                    # the bare model: full fp32 weights on every rank, every backend
    engine.state_dict()             # model + optimiser + scheduler exactly as one process holds them

``state_dict()`` is the same structure on every backend and world size (full, unsharded fp32 model and
a ``torch.optim`` optimiser state), so a checkpoint written by 2 DeepSpeed ZeRO-2 ranks loads into one
plain process and vice versa. Without ``start_step`` every micro-batch is its own optimiser step.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn


_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Engine:
    """Single-process engine (``distributed.backend=none``); DDP and DeepSpeed build on it.

    ``precision`` bf16/fp16 runs the forward (every pass of the objective) under ``torch.autocast``
    with fp32 weights; fp16 adds a gradient scaler. The regulariser's inner gradients, taken inside
    the forward, are not loss-scaled, so bf16 is the precision to use for GUARD.
    """

    def __init__(self, step_module: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, grad_clip: float = 0.0, *,
                 grad_accum: int = 1, precision: str = "fp32", device: torch.device | None = None):
        self.step_module = step_module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_clip = grad_clip
        self.grad_accum = grad_accum
        self.precision = precision
        self.device = device or next(step_module.parameters()).device
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self._micro_total, self._micro_done = 1, 0

    # ------------------------------------------------------------------ the step protocol
    @property
    def model(self) -> nn.Module:
        return self.step_module.model

    def train(self, mode: bool = True) -> "Engine":
        self.step_module.train(mode)
        return self

    def start_step(self, micro_batches: int) -> None:
        if not 1 <= micro_batches <= self.grad_accum:
            raise ValueError(f"an optimiser step takes 1..{self.grad_accum} micro-batches, got {micro_batches}")
        self._micro_total, self._micro_done = micro_batches, 0

    @property
    def last_micro_batch(self) -> bool:
        """True while running the micro-batch whose backward completes this optimiser step."""
        return self._micro_done == self._micro_total - 1

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        dtype = _AUTOCAST[self.precision]
        with torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext():
            return self._forward(x, y)

    def _forward(self, x: torch.Tensor, y: torch.Tensor):
        return self.step_module(x, y)

    def backward(self, loss: torch.Tensor) -> None:
        # mean over the step's micro-batches, so the gradient is the one of the whole global batch
        loss = loss / self._micro_total if self._micro_total > 1 else loss
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> bool:
        """Call after every micro-batch; returns True when it took an optimiser step."""
        self._micro_done += 1
        if self._micro_done < self._micro_total:
            return False
        self._micro_total, self._micro_done = 1, 0
        self._optimizer_step()
        return True

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._load_scheduler_and_scaler(state)

    def _load_scheduler_and_scaler(self, state: dict) -> None:
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
