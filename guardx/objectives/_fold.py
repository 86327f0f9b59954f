"""BatchNorm folded into the convolution before it, for the passes that run BatchNorm on running statistics.

With running statistics BatchNorm is an affine map per channel, y = γ·(x − μ)/√(σ² + ε) + β, so after a
convolution it folds into that convolution's weights:

    s = γ / √(σ² + ε)        W' = W · s  (per output channel)        b' = β + (b − μ) · s

and conv → BN → ReLU runs as conv' → ReLU. The regulariser's passes (GUARD's clean and perturbed passes,
gradnorm, the PGD attack of adversarial training) then skip BatchNorm's forward, its backward and — for
the double-backprop modes — its double backward, which on CPU is as costly as a convolution's.

Exactness: W' and b' are computed inside autograd from the real parameters (W, γ, β) and the running
statistics the passes read, so every parameter receives the gradient it receives without folding (the
chain rule through W·s and β + (b − μ)·s), to rounding. They are computed once per
:func:`folded_batchnorm` block, on first use, and shared by every pass inside it, so the block's
parameter gradient must come from one backward (GUARD exact/cure and gradnorm differentiate both passes
at once; the PGD attack takes input gradients only). An objective that takes a parameter backward per
pass (GUARD lossdiff) opens one block per pass; a second parameter backward in one block fails loudly
("backward through the graph a second time"), never silently. The running statistics are read, never
written.

Which pairs fold is found once per model (:func:`guardx.models.fold.conv_bn_pairs`, a ``torch.fx`` trace):
any model whose BatchNorms follow convolutions gets this automatically; a model fx cannot trace, or one
without BatchNorm (the DC ConvNet), runs unchanged. Evaluation folds with constants instead
(:func:`guardx.models.fold.folded_for_inference`): no parameter gradients are taken there.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from guardx.models.fold import conv_bn_pairs, folded_weights  # noqa: F401  (conv_bn_pairs re-exported)
from guardx.objectives._conv import conv2d as written_out_conv
from guardx.objectives._conv import supported as conv_supported

# Fold a pair when the convolution's output per channel (batch × output pixels) is at least this many times
# its weight per output channel; below, BatchNorm's activation passes are cheaper than folding's weight passes.
FOLD_OUTPUT_OVER_WEIGHT = 1.0
_ENABLED = [True]
_DOUBLE_BACKWARD = [True]


@contextmanager
def _switched(flag: list, enabled: bool) -> Iterator[None]:
    previous, flag[0] = flag[0], enabled
    try:
        yield
    finally:
        flag[0] = previous


def bn_folding(enabled: bool):
    """Switch folding on or off for the running-statistics passes inside (A/B tests and benchmarks)."""
    return _switched(_ENABLED, enabled)


def folding_enabled() -> bool:
    return _ENABLED[0]


def written_out_double_backward(enabled: bool):
    """Switch :mod:`guardx.objectives._conv`'s convolution on or off for the double-backprop passes inside
    (A/B tests and benchmarks; off = autograd's own double backward)."""
    return _switched(_DOUBLE_BACKWARD, enabled)


@contextmanager
def folded_batchnorm(model: nn.Module, *, fold: bool = True, double_backprop: bool = False) -> Iterator[int]:
    """Inside, every foldable conv → BN of ``model`` whose BN is in eval mode runs as one folded
    convolution (the BN becomes the identity), where folding is the cheaper of the two (see
    :class:`_FoldedConv`). Yields the number of pairs taken over. Call it with the model already in
    running-statistics mode (see ``running_stats_mode``).

    ``double_backprop``: every zero-padded convolution inside (folded or not) runs with its double backward
    written out (:mod:`guardx.objectives._conv`, whose contract the double-backprop objectives keep)."""
    patched = []
    written_out = double_backprop and _DOUBLE_BACKWARD[0]
    for conv, bn in conv_bn_pairs(model) if fold else []:
        if bn.training or bn.running_mean is None or "forward" in vars(conv) or "forward" in vars(bn):
            continue  # batch statistics, or already patched by an enclosing context
        conv.forward, bn.forward = _FoldedConv(conv, bn, written_out), _identity
        patched += [conv, bn]
    folded = len(patched) // 2
    if written_out:
        for conv in model.modules():
            if conv_supported(conv) and "forward" not in vars(conv):
                conv.forward = _WrittenOutConv(conv)
                patched.append(conv)
    try:
        yield folded
    finally:
        for module in patched:
            del module.forward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class _FoldedConv:
    """``conv``'s forward with ``bn`` folded in; W', b' computed on first use in the block (one set with
    autograd recording, one without, so a no-grad pass never hands a graph-less weight to one that needs it).

    Folding is not free: W' = W·s and its backward (∂W = ∂W'·s, ∂s = Σ ∂W'·W) are passes over the weight,
    where BatchNorm's are passes over the activations. So a convolution whose output (per channel: batch ×
    output pixels) is smaller than its weight (per output channel) keeps its BatchNorm — ResNet-18's last
    stages at low resolution, where the weights are large and the feature maps tiny; same function either way.
    """

    def __init__(self, conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm, written_out: bool = False):
        self.conv, self.bn, self.cache, self.fold = conv, bn, {}, None
        self.conv_forward = functools.partial(written_out_conv, conv) if written_out else conv._conv_forward

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = torch.is_grad_enabled()
        if key not in self.cache:
            self.cache[key] = folded_weights(self.conv, self.bn)
        return self.cache[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold is None:  # decided on the block's first pass (one batch size, one resolution)
            pixels = x.shape[0] * _output_pixels(self.conv, x.shape[2:])
            self.fold = pixels >= FOLD_OUTPUT_OVER_WEIGHT * self.conv.weight[0].numel()
        if not self.fold:  # the convolution, then BatchNorm itself (its module's own forward is the identity here)
            return type(self.bn).forward(self.bn, self.conv_forward(x, self.conv.weight, self.conv.bias))
        weight, bias = self.weights()
        return self.conv_forward(x, weight, bias)


class _WrittenOutConv:
    """A convolution with no BatchNorm to fold, in a double-backprop pass: its own weights, ``_conv.py``'s autograd."""

    def __init__(self, conv: nn.Module):
        self.conv = conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return written_out_conv(self.conv, x, self.conv.weight, self.conv.bias)


def _output_pixels(conv: nn.Module, size: torch.Size) -> int:
    """Output pixels (per sample and channel) of ``conv`` on an input of spatial ``size``."""
    out = 1
    for i, n in enumerate(size):
        if isinstance(conv.padding, str):  # "same" keeps the size, "valid" shrinks it by the kernel's reach
            pad = 0 if conv.padding == "valid" else None
        else:
            pad = conv.padding[i]
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        out *= n if pad is None else (n + 2 * pad - d * (k - 1) - 1) // s + 1
    return out
