"""Pieces every objective shares: BatchNorm handling, per-sample directions, gradient injection."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# The row-wise ops GUARD runs every step: Triton on CUDA tensors, their PyTorch references elsewhere.
from guardx.kernels import perturb_along, rowwise_sqdist, unit_direction  # noqa: F401  (re-exported)

_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.Dropout)


@contextmanager
def running_stats_mode(model: nn.Module, fold: bool | None = None, double_backprop: bool = False) -> Iterator[None]:
    """Eval mode for the regulariser's passes: BatchNorm uses (and does not update) running statistics.

    The official code's choice (``net.eval()`` inside the regulariser). Restores each module's flag.
    The passes see private copies of the running statistics: a later train-mode forward in the same
    step updates the buffers in place, which would otherwise silently change what these passes'
    backward reads (autograd saved the very same tensors).

    ``fold`` (default: on, see :func:`guardx.objectives._fold.bn_folding`): each BatchNorm that follows a
    convolution is folded into it for the passes inside (``_fold.py``): the same function and the same
    gradients, without BatchNorm's forward, backward and double backward.

    ``double_backprop``: the block's convolutions get a written-out double backward (``_conv.py``); the
    caller keeps its contract: input gradients only in a ``create_graph`` backward, parameter gradients
    only in a plain one.
    """
    from guardx.objectives._fold import folded_batchnorm, folding_enabled

    flags = [(m, m.training) for m in model.modules()]
    swapped = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            swapped.append((m, m.running_mean, m.running_var))
            m.running_mean, m.running_var = m.running_mean.clone(), m.running_var.clone()
    model.eval()
    try:
        fold = folding_enabled() if fold is None else fold
        with folded_batchnorm(model, fold=fold, double_backprop=double_backprop):
            yield
    finally:
        for m, was_training in flags:
            m.training = was_training
        for m, mean, var in swapped:
            m.running_mean, m.running_var = mean, var


def mode_independent(model: nn.Module) -> bool:
    """True when train and eval mode compute the same function here, so one clean pass can serve both
    the cross-entropy term and the regulariser (saves a forward and a backward per step)."""
    if not model.training:
        return True
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            return False
        if isinstance(m, (nn.modules.dropout._DropoutNd, nn.Dropout)) and m.p > 0:
            return False
    return True


def per_sample_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def param_grads(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """∂loss/∂params without touching ``.grad`` (so no DDP/ZeRO reduce hook fires); frees the graph.

    Each gradient comes back in its parameter's memory layout. A convolution's double backward returns
    its weight gradient transposed (input-channel-major strides); left so, every later sum with an
    ordinary gradient (the cross-entropy term's, in the engine's backward) runs a strided kernel ~20×
    slower than a dense one on CPU, and ``.grad`` accumulation copies it once more. One dense copy here
    costs less than either.
    """
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else in_layout_of(p, g) for p, g in zip(params, grads)]


def in_layout_of(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g`` with ``p``'s strides (a copy only when they differ)."""
    return g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)


def inject(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """A zero-valued scalar whose gradient w.r.t. each ``p`` is the precomputed ``g``.

    Lets an objective finish its expensive passes early (freeing their activations: peak memory stays
    near one forward) and still hand the engine a single differentiable loss, so DDP and DeepSpeed
    reduce the whole gradient in their normal backward. No arithmetic on the parameters in the forward;
    the backward hands over ``g`` (times the incoming scale, e.g. 1/micro-batches) and forgets it.
    """
    return _Inject.apply(list(grads), *params)


class _Inject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grads, *params):
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, scale):
        grads, ctx.grads = ctx.grads, None  # handed over once; not kept alive with the graph
        torch._foreach_mul_(grads, scale)  # in place: they are ours, and a fresh copy costs page faults on CPU
        return (None, *grads)


def stats_dict(**values: torch.Tensor | float) -> dict[str, float]:
    """Detach and convert in one host sync (one ``.tolist()``, not one ``.item()`` per entry)."""
    device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach().float().reshape(())
                           for v in values.values()])
    return dict(zip(values, stacked.tolist()))
