"""Convolution with a written-out double backward, for the passes of the double-backprop regularisers.

GUARD exact/cure and gradnorm differentiate an input gradient: the first-order backward of every convolution,
``gx = conv_backward_input(gy, W)``, is itself differentiated. Autograd's generic formula for that
(``aten::_convolution_double_backward``) computes the weight part, ∂/∂W ⟨ggx, gx⟩ = Σ_batch gy ⋆ ggx, as a
convolution over batch-transposed copies of the activations: extra copies, a convolution shape the CPU
kernels run slowly (3× on ResNet-18's 3-channel stem), and a result with transposed strides that every later
sum with an ordinary weight gradient pays for (a strided add is ~20× a dense one on CPU). Here each piece is
the kernel made for it: ``gy``'s part is the forward convolution ``conv(ggx, W)``, ``W``'s part is the
ordinary weight-gradient kernel ``convolution_backward(gy, ggx)``: the same maths, 1.7 % fewer counted FLOPs
on a ResNet-18 exact step, dense results. On CPU it saves 0–2 % of that step (paired A/Bs in
benchmarks/README.md); the `guard_exact_autograd` row of ``guardx bench overhead`` measures it.

Contract inside a pass built with :func:`conv2d` (the regulariser's own blocks keep it):

* a backward with ``create_graph=True`` takes input gradients only (∇x of the pass, differentiable);
* a backward without it takes parameter gradients (and the activation gradients its chain needs), never the
  gradient of the pass's leaf input.

A request outside it fails loudly (the tensor "appears to not have been used in the graph"), never silently.
``tests/test_conv_double_backward.py`` and ``tests/test_fold.py`` check every first- and second-order gradient
against autograd's own formula in fp64.
The pure-PyTorch reference is the module's own forward (``conv._conv_forward``), used whenever the convolution
is not a plain zero-padded one.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

_conv = torch.ops.aten.convolution
_conv_backward = torch.ops.aten.convolution_backward


class _Geometry(NamedTuple):
    stride: list
    padding: list
    dilation: list
    groups: int

    def output_padding(self) -> list:
        return [0] * len(self.stride)


def supported(conv: nn.Module) -> bool:
    """A plain zero-padded N-d convolution with numeric padding (what ResNets and the DC ConvNet use)."""
    return (isinstance(conv, nn.modules.conv._ConvNd) and not conv.transposed and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def conv2d(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv``'s forward with ``weight`` and ``bias`` (e.g. BatchNorm-folded ones), double backward written out."""
    if not supported(conv):
        return conv._conv_forward(x, weight, bias)
    device = x.device.type
    if torch.is_autocast_enabled(device):  # autocast casts F.conv2d's inputs, not aten calls inside a Function
        dtype = torch.get_autocast_dtype(device)
        x, weight, bias = (_autocast(t, dtype) for t in (x, weight, bias))
    geometry = _Geometry(list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
    return _Conv.apply(x, weight, bias, geometry)


def _autocast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """What autocast does to a convolution's input: lower-precision for float tensors other than float64."""
    return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, geometry: _Geometry):
        ctx.geometry, ctx.bias_sizes = geometry, None if bias is None else list(bias.shape)
        ctx.x_is_leaf = x.grad_fn is None  # the pass's input: its gradient is only ever taken with create_graph
        ctx.save_for_backward(x, weight)
        return _conv(x, weight, bias, geometry.stride, geometry.padding, geometry.dilation, False,
                     geometry.output_padding(), geometry.groups)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        g = ctx.geometry
        if torch.is_grad_enabled():  # create_graph: the input gradient, itself differentiable
            gx = _InputGradient.apply(gy, weight, x, g) if ctx.needs_input_grad[0] else None
            return gx, None, None, None
        need_x = ctx.needs_input_grad[0] and not ctx.x_is_leaf
        mask = [need_x, ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        if not any(mask):
            return None, None, None, None
        gx, gw, gb = _conv_backward(gy, x, weight, ctx.bias_sizes, g.stride, g.padding, g.dilation, False,
                                    g.output_padding(), g.groups, mask)
        return gx, gw, gb, None


class _InputGradient(torch.autograd.Function):
    """``gx = conv_backward_input(gy, W)`` (``x`` only lends its shape); backward: (conv(ggx, W), Σ gy ⋆ ggx)."""

    @staticmethod
    def forward(ctx, gy, weight, x, geometry: _Geometry):
        ctx.geometry = geometry
        ctx.save_for_backward(gy, weight, x)
        g = geometry
        return _conv_backward(gy, x, weight, None, g.stride, g.padding, g.dilation, False, g.output_padding(),
                              g.groups, [True, False, False])[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ggx):
        gy, weight, x = ctx.saved_tensors
        g = ctx.geometry
        g_gy = g_w = None
        if ctx.needs_input_grad[0]:
            g_gy = _conv(ggx, weight, None, g.stride, g.padding, g.dilation, False, g.output_padding(), g.groups)
        if ctx.needs_input_grad[1]:  # the weight gradient of conv(ggx, W) at output gradient gy
            g_w = _conv_backward(gy, ggx, weight, None, g.stride, g.padding, g.dilation, False,
                                 g.output_padding(), g.groups, [False, True, False])[1]
        return g_gy, g_w, None, None
