"""BASELINES for the overhead benchmark — reference implementations, NOT product code.

They compute the same regularisers as guardx's GUARD modes, but the way a straightforward
implementation does, so ``guardx bench overhead`` can measure in one run what guardx's shared passes
and early freeing buy (see guardx/objectives/guard.py for those):

* :class:`OfficialLossDiff` — the structure of the official ImageNet squeeze step: the training
  forward, then a separate direction-finding forward with a full backward, then a perturbed and a
  clean forward, all graphs alive until one final backward. Four forwards (guardx: three).
* :class:`NaiveExact` — GUARD exact by plain double backprop: a separate pass to find z, the clean and
  perturbed gradient graphs and the cross-entropy graph all alive until the one backward
  (``low_memory=False`` style). guardx takes z from the clean pass and frees the regulariser's graphs
  before the cross-entropy forward.
* :class:`OfficialAdv` — PGD-k adversarial training as the official code runs it: the attack in the
  model's training mode (BatchNorm batch statistics, running statistics updated by every attack step)
  with a full backward per attack step (input *and* every weight: ``loss.backward()``, the weight
  gradients then thrown away). guardx's ``adv`` attacks with running statistics (folded BatchNorm) and
  asks autograd for the input gradient only.

Both GUARD baselines follow guardx's conventions (normalised-space perturbation, running-statistics
BatchNorm in the regulariser's passes) but run BatchNorm as BatchNorm (no folding, see
guardx/objectives/_fold.py), so on a model in eval mode or without BatchNorm their loss and gradient
equal guardx's (``tests/test_bench.py`` checks this): the benchmark compares cost, not different maths.
:class:`Unfolded` runs any guardx objective with BatchNorm folding switched off, :class:`AutogradDoubleBackward`
with autograd's own convolution double backward instead of guardx/objectives/_conv.py's (the A/B rows).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from guardx.models.wrapper import split_normalizer
from guardx.objectives._common import per_sample_ce, running_stats_mode, stats_dict, trainable, unit_direction
from guardx.objectives._fold import bn_folding, written_out_double_backward
from guardx.objectives.guard import input_gradient


class OfficialLossDiff:
    """Baseline: β·|L(x + h z) − L(x)| with the official code's four forwards (see module docstring)."""

    def __init__(self, h: float = 3.0, beta: float = 1e-4):
        self.h, self.beta = h, beta

    def __repr__(self) -> str:
        return f"OfficialLossDiff(h={self.h:g}, beta={self.beta:g})  # baseline"

    def __call__(self, model, x, y):
        to_input, net = split_normalizer(model, "normalized")
        xin = to_input(x).detach()
        ce = F.cross_entropy(net(xin), y)  # forward 1: the training loss, current mode
        with running_stats_mode(net, fold=False):  # the official code switches to eval mode for the regulariser
            x0 = xin.clone().requires_grad_(True)  # stays requires_grad, as the official image tensor does
            loss_z = F.cross_entropy(net(x0), y)  # forward 2: find the direction ...
            g, *_ = torch.autograd.grad(loss_z, [x0, *trainable(model)], allow_unused=True)  # ... full backward
            pos = F.cross_entropy(net(x0 + self.h * unit_direction(g)), y)  # forward 3
            orig = F.cross_entropy(net(x0), y)  # forward 4: the clean loss again
        reg = self.beta * (pos - orig).abs()
        loss = ce + reg
        return loss, stats_dict(ce=ce, reg=reg, loss=loss)


class NaiveExact:
    """Baseline: λ/B Σ‖∇ℓ_i(x_i + h z_i) − ∇ℓ_i(x_i)‖² by naive double backprop (see module docstring)."""

    def __init__(self, h: float = 3.0, lam: float = 100.0):
        self.h, self.lam = h, lam

    def __repr__(self) -> str:
        return f"NaiveExact(h={self.h:g}, lam={self.lam:g})  # baseline"

    def __call__(self, model, x, y):
        to_input, net = split_normalizer(model, "normalized")
        xin = to_input(x).detach()
        with running_stats_mode(net, fold=False):
            xd = xin.clone().requires_grad_(True)
            (g_dir,) = torch.autograd.grad(per_sample_ce(net(xd), y).sum(), xd)  # pass 1: the direction only
            z = unit_direction(g_dir)
            _, g0 = input_gradient(net, xin, y, create_graph=True)  # pass 2: clean gradient, graph kept
            _, gz = input_gradient(net, xin + self.h * z, y, create_graph=True)  # pass 3: perturbed
            reg = self.lam * (gz - g0).flatten(1).pow(2).sum(1).mean()
        ce = F.cross_entropy(net(xin), y)  # pass 4: the training loss; every graph lives until backward
        loss = ce + reg
        return loss, stats_dict(ce=ce, reg=reg, loss=loss)


class OfficialAdv:
    """Baseline: PGD-k adversarial training as the official code runs it (see module docstring)."""

    def __init__(self, eps: float = 1 / 255, alpha: float = 0.25 / 255, steps: int = 10, random_start: bool = True):
        self.eps, self.alpha, self.steps, self.random_start = eps, alpha, steps, random_start

    def __repr__(self) -> str:
        return f"OfficialAdv(eps={self.eps:.4g}, alpha={self.alpha:.4g}, steps={self.steps})  # baseline"

    def __call__(self, model, x, y):
        params = trainable(model)
        x = x.detach()
        adv = (x + torch.empty_like(x).uniform_(-self.eps, self.eps)).clamp(0, 1) if self.random_start else x
        for _ in range(self.steps):  # the model's own mode: train mode in the squeeze, BatchNorm updated
            adv = adv.detach().requires_grad_(True)
            loss = F.cross_entropy(model(adv), y)
            g, *_ = torch.autograd.grad(loss, [adv, *params], allow_unused=True)  # = loss.backward(), weights too
            adv = (x + (adv.detach() + self.alpha * g.sign() - x).clamp(-self.eps, self.eps)).clamp(0, 1)
        ce = F.cross_entropy(model(adv), y)
        return ce, stats_dict(ce=ce, loss=ce)


class _SwitchedOff:
    """A/B: ``objective`` with one of guardx's optimisations switched off (``switch(False)``) inside."""

    note = ""

    def __init__(self, objective):
        self.objective = objective

    def __repr__(self) -> str:
        return f"{self.objective!r}  # {self.note}"

    def __getattr__(self, name):  # mode, low_memory, ...: what the engines read off an objective
        if name == "objective":
            raise AttributeError(name)
        return getattr(self.objective, name)

    @staticmethod
    def switch(enabled: bool):
        raise NotImplementedError

    def __call__(self, model, x, y):
        with self.switch(False):
            return self.objective(model, x, y)


class Unfolded(_SwitchedOff):
    """A/B: ``objective`` with BatchNorm run as BatchNorm in its running-statistics passes."""

    note = "BatchNorm not folded"
    switch = staticmethod(bn_folding)


class AutogradDoubleBackward(_SwitchedOff):
    """A/B: ``objective`` with autograd's own convolution double backward (guardx/objectives/_conv.py off)."""

    note = "autograd's convolution double backward"
    switch = staticmethod(written_out_double_backward)
