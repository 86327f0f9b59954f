"""GUARD: curvature regularisation, ℓ_R(x) = ℓ(x) + λ‖∇ℓ(x + h z) − ∇ℓ(x)‖², z = ∇ℓ/‖∇ℓ‖ (paper eq. 11).

Three modes (DESIGN.md has the contract):

* ``exact``: reg = λ/B Σ_i ‖∇ℓ_i(x_i + h z_i) − ∇ℓ_i(x_i)‖², differentiated through (double backprop).
* ``cure``: the official CIFAR code (CURE-style): reg = λ · mean_i ‖∇_{x_i}L(x+hz) − ∇_{x_i}L(x)‖ with L the
  batch-mean loss, i.e. a 1/B factor inside and an un-squared norm — λ/B² times weaker per unit
  difference than ``exact``'s squared form near zero, so the same λ regularises far less.
* ``lossdiff``: the official ImageNet code, first order: reg = β·|L(x+hz) − L(x)|, no double backprop.

Work shared between passes (why a step costs what it costs; FLOPs in units of one forward):

* the clean regulariser pass yields both z and ∇ℓ(x) (exact/cure) or both z and ∇θL(x) (lossdiff):
  one pass where the official code runs two;
* with no mode-dependent layers (no BatchNorm/Dropout, e.g. ConvNet) or a model in eval mode, the
  cross-entropy term reuses that same clean pass instead of a third forward;
* ``low_memory`` (default): the regulariser's parameter gradient is taken inside the objective and its
  graphs freed *before* the cross-entropy forward, then handed to the engine through a zero-valued
  surrogate (:func:`inject`). Peak activation memory is one pass, not three, and DDP/DeepSpeed still see
  a single loss whose ordinary backward carries the whole gradient.
* in the regulariser's passes BatchNorm runs on running statistics, an affine map: it is folded into the
  convolution before it (``_fold.py``: W', b' recomputed inside autograd from W, γ, β and the running
  statistics), so those passes run conv → ReLU — no BatchNorm forward, backward or double backward —
  with the same gradients. This is why a GUARD step can cost less than its FLOP ratio to a plain step,
  whose cross-entropy pass keeps train-mode BatchNorm;
* exact/cure differentiate every convolution's input gradient; that double backward is written out
  (``_conv.py``): the forward convolution and the ordinary weight-gradient kernel instead of autograd's
  convolutions over transposed activations, so no activation copies and dense weight gradients;
* the per-step row ops, x + h·g/‖g‖ and Σ(gz − g0)², are fused Triton kernels on CUDA tensors
  (``kernels/``; PyTorch references elsewhere): about a third of the memory traffic, and the exact
  regulariser's autograd no longer keeps a copy of gz − g0 alive.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from guardx.models.wrapper import split_normalizer
from guardx.objectives._common import (inject, mode_independent, param_grads, per_sample_ce, perturb_along,
                                       rowwise_sqdist, running_stats_mode, stats_dict, trainable)

MODES = ("exact", "lossdiff", "cure")
SPACES = ("normalized", "pixel")


def check_space(space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")


def input_gradient(net, x: torch.Tensor, y: torch.Tensor, create_graph: bool):
    """Per-sample losses ℓ_i(x_i) and their input gradients ∇_{x_i}ℓ_i (= ∇ of Σ_i ℓ_i, since samples are
    independent with running-statistics BatchNorm)."""
    x = x.detach().requires_grad_(True)
    losses = per_sample_ce(net(x), y)
    (g,) = torch.autograd.grad(losses.sum(), x, create_graph=create_graph)
    return losses, g


def finish_double_backprop(net, xin, y, params, *, shared: bool, low_memory: bool,
                           clean_losses: torch.Tensor, reg: torch.Tensor):
    """Combine a double-backprop regulariser with the cross-entropy term; returns ``(loss, ce)``."""
    if not low_memory:
        ce = clean_losses.mean() if shared else F.cross_entropy(net(xin), y)
        return ce + reg, ce
    if shared:  # one graph carries both terms
        ce = clean_losses.mean()
        grads = param_grads(ce + reg, params)
        return (ce + reg).detach() + inject(params, grads), ce.detach()
    grads = param_grads(reg, params)  # frees the regulariser's graphs before the CE forward
    ce = F.cross_entropy(net(xin), y)  # current mode: BatchNorm batch statistics, running stats updated
    return ce + reg.detach() + inject(params, grads), ce


class Guard:
    """``obj(model, x, y) -> (loss, stats)``; ``x`` are images in [0, 1] as the model receives them."""

    def __init__(self, mode: str = "exact", h: float = 3.0, lam: float = 100.0, beta: float = 1e-4,
                 space: str = "normalized", low_memory: bool = True):
        if mode not in MODES:
            raise ValueError(f"guard mode must be one of {MODES}, got {mode!r}")
        check_space(space)
        for key, value in (("h", h), ("lam", lam), ("beta", beta)):
            if not value >= 0:  # also catches NaN
                raise ValueError(f"guard {key} must be >= 0, got {value}")
        self.mode, self.h, self.lam, self.beta, self.space, self.low_memory = mode, h, lam, beta, space, low_memory

    @property
    def backward_in_forward(self) -> str:
        if self.mode in ("exact", "cure"):
            return "it differentiates through input gradients (double backprop) inside the forward"
        if self.low_memory:
            return "it takes parameter gradients inside the forward (low_memory)"
        return "it takes input gradients inside the forward"

    def __repr__(self) -> str:
        weight = f"beta={self.beta:g}" if self.mode == "lossdiff" else f"lam={self.lam:g}"
        return f"Guard(mode={self.mode}, h={self.h:g}, {weight}, space={self.space})"

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor):
        to_input, net = split_normalizer(model, self.space)
        xin = to_input(x).detach()  # the tensor the (inner) network receives; perturbations act here
        shared = mode_independent(model)
        params = trainable(model)
        if self.mode == "lossdiff":
            return self._lossdiff(net, xin, y, params, shared)
        with running_stats_mode(net, double_backprop=True):
            l0, g0 = input_gradient(net, xin, y, create_graph=True)
            # x + h·z with z = g0/‖g0‖ from the same pass as ∇ℓ(x) (no separate direction-finding pass),
            # in one fused kernel on GPU
            _, gz = input_gradient(net, perturb_along(xin, g0.detach(), self.h), y, create_graph=True)
            if self.mode == "exact":  # fused reduction; its backward feeds gz's and g0's graphs
                reg = self.lam * rowwise_sqdist(gz, g0).mean()
            else:  # cure: gradients of the batch-mean loss (1/B each), un-squared norm
                reg = self.lam * _safe_norm((gz - g0).flatten(1) / len(y)).mean()
        loss, ce = finish_double_backprop(net, xin, y, params, shared=shared, low_memory=self.low_memory,
                                          clean_losses=l0, reg=reg)
        return loss, stats_dict(ce=ce, reg=reg, loss=loss)

    def _lossdiff(self, net, xin, y, params, shared):
        x0 = xin.detach().requires_grad_(True)  # xin is already a detached tensor: no copy
        if not self.low_memory:
            with running_stats_mode(net):
                clean = per_sample_ce(net(x0), y).mean()
                (g,) = torch.autograd.grad(clean, x0, retain_graph=True)
                pert = per_sample_ce(net(perturb_along(xin, g, self.h)), y).mean()
            reg = self.beta * (pert - clean).abs()
            ce = clean if shared else F.cross_entropy(net(xin), y)
            loss = ce + reg
            return loss, stats_dict(ce=ce, reg=reg, loss=loss)
        # One running-statistics block per pass: each pass takes its own parameter backward, which frees
        # its graph (and its folded BatchNorm weights, see _fold.py) before the next pass runs.
        with running_stats_mode(net):  # one backward gives z's gradient and ∇θ L(x)
            clean = per_sample_ce(net(x0), y).mean()
            g, *grads0 = torch.autograd.grad(clean, [x0, *params], allow_unused=True)
        grads0 = [torch.zeros_like(p) if q is None else q for p, q in zip(params, grads0)]
        with running_stats_mode(net):
            pert = per_sample_ce(net(perturb_along(xin, g, self.h)), y).mean()
            grads = param_grads(pert, params)  # frees the perturbed pass before the CE forward
        clean, pert = clean.detach(), pert.detach()
        reg = self.beta * (pert - clean).abs()
        # ∇θ reg = β·sign(L(x+hz) − L(x))·(∇θ L(x+hz) − ∇θ L(x)), in place over the gradient lists
        torch._foreach_sub_(grads, grads0)
        torch._foreach_mul_(grads, self.beta * torch.sign(pert - clean))
        if shared:
            torch._foreach_add_(grads, grads0)
            ce = clean
        else:
            ce = F.cross_entropy(net(xin), y)
        loss = ce + reg + inject(params, grads)
        return loss, stats_dict(ce=ce, reg=reg, loss=loss)


def _safe_norm(v: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 norm whose gradient at 0 is 0 instead of NaN."""
    sq = v.pow(2).sum(1)
    nz = sq > 0
    return torch.where(nz, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), torch.zeros_like(sq))
