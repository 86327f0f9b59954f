"""DistributedDataParallel engine: every rank holds the whole model and optimiser; gradients are averaged.

GUARD works under DDP as is: the objective runs inside the wrapped module's forward, and its extra
gradients (``torch.autograd.grad`` w.r.t. the input, and w.r.t. the parameters in ``low_memory`` mode)
do not accumulate into ``.grad``, so DDP's reducer hooks fire once per step, in the engine's backward.
BatchNorm: each rank normalises its own micro-batch, and rank 0's running statistics are broadcast at
every forward (DDP's default), so the regulariser's passes, which read running statistics, see the
same values on every rank.
"""
from __future__ import annotations

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from guardx.distributed.engine import Engine


class DDPEngine(Engine):
    def __init__(self, step_module: nn.Module, optimizer, scheduler=None, grad_clip: float = 0.0, *, ctx, **kw):
        super().__init__(step_module, optimizer, scheduler, grad_clip, **kw)
        # the constructor broadcasts rank 0's parameters and buffers: all ranks start identical
        self.ddp = DistributedDataParallel(step_module, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                           else None, gradient_as_bucket_view=True)

    def train(self, mode: bool = True) -> "DDPEngine":
        self.ddp.train(mode)
        return self

    def _forward(self, x, y):
        # all-reduce only in the backward of the step's last micro-batch; setting the flag per forward is
        # what no_sync() does, without a context that would have to span forward and backward
        self.ddp.require_backward_grad_sync = self.last_micro_batch
        return self.ddp(x, y)
