"""Training objectives: each is a callable ``obj(model, x, y) -> (loss, stats)``.

``loss`` is a differentiable scalar; ``stats`` a dict of floats with at least ``"ce"`` and, for the
regularised objectives, ``"reg"``. ``x`` are images in [0, 1]; the model carries its normaliser.

    obj = build_objective("guard", mode="exact", h=3.0, lam=100.0)
    loss, stats = obj(model, x, y); loss.backward()
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from guardx.models.wrapper import split_normalizer
from guardx.objectives._common import mode_independent, running_stats_mode, stats_dict, trainable
from guardx.objectives.guard import Guard, check_space, finish_double_backprop, input_gradient
from guardx.registry import Registry

# Each objective declares its config-settable parameters (help text here; defaults and types from its
# signature) and, as the attribute ``backward_in_forward``, whether it differentiates inside its forward
# (engines read that, e.g. to refuse ZeRO-3, without knowing objective classes).
OBJECTIVES = Registry("objective")
register_objective = OBJECTIVES.register


def list_objectives() -> list[str]:
    return OBJECTIVES.names()


def build_objective(name: str, **params) -> Callable:
    """``obj(model, x, y) -> (loss, stats)``; an unknown name or parameter is a one-line ConfigError, a bad
    value a ValueError naming it."""
    return OBJECTIVES.build(name, **params)


@register_objective("plain")
class Plain:
    """Cross-entropy: the SRe2L squeeze."""

    backward_in_forward = None

    def __repr__(self) -> str:
        return "Plain()"

    def __call__(self, model, x, y):
        ce = F.cross_entropy(model(x), y)
        return ce, stats_dict(ce=ce, loss=ce)


register_objective("guard", params={
    "mode": "exact (eq. 11, double backprop) | lossdiff (official ImageNet code) | cure (official CIFAR code)",
    "h": "discretisation step along z (in units of `space`)",
    "lam": "exact/cure: regulariser weight lambda",
    "beta": "lossdiff: weight of |L(x+hz) - L(x)|",
    "space": "where the perturbation acts: normalized (after the model's normaliser) | pixel",
}, ranges={"h": (0, None), "lam": (0, None), "beta": (0, None)})(Guard)


@register_objective("gradnorm", params={"lam_g": "weight lambda_g of ||grad_x loss||^2",
                                        "space": "where the perturbation acts: normalized | pixel"},
                    ranges={"lam_g": (0, None)})
class GradNorm:
    """Input-gradient regularisation (Table 3 ablation): reg = λ_g/B Σ_i ‖∇_{x_i} ℓ_i‖², double backprop.

    Same conventions as GUARD exact: running-statistics BatchNorm in the regulariser pass, gradient in
    ``space`` (normalised input by default), shared clean pass when the model allows it.
    """

    backward_in_forward = "it differentiates through input gradients (double backprop) inside the forward"

    def __init__(self, lam_g: float = 1e-2, space: str = "normalized", low_memory: bool = True):
        check_space(space)
        self.lam_g, self.space, self.low_memory = lam_g, space, low_memory

    def __repr__(self) -> str:
        return f"GradNorm(lam_g={self.lam_g:g}, space={self.space})"

    def __call__(self, model, x, y):
        to_input, net = split_normalizer(model, self.space)
        xin = to_input(x).detach()
        with running_stats_mode(net, double_backprop=True):
            losses, g = input_gradient(net, xin, y, create_graph=True)
            reg = self.lam_g * g.flatten(1).pow(2).sum(1).mean()
        loss, ce = finish_double_backprop(net, xin, y, trainable(model), shared=mode_independent(model),
                                          low_memory=self.low_memory, clean_losses=losses, reg=reg)
        return loss, stats_dict(ce=ce, reg=reg, loss=loss)


@register_objective("adv", params={"eps": "L-inf radius in pixel units (accepts k/255)",
                                   "alpha": "PGD step size in pixel units", "steps": "PGD steps k",
                                   "random_start": "start PGD from a uniform point in the eps-ball"},
                    ranges={"eps": "pixels", "alpha": "pixels", "steps": (1, None)})
class Adversarial:
    """PGD-k adversarial training (the SRe2L+Adv baseline of Table 1).

    The attack runs with running-statistics BatchNorm (not updated), in pixel space with ε in pixel
    units; the training loss is the cross-entropy on the adversarial batch in the model's current mode.
    """

    backward_in_forward = "it runs PGD's input-gradient backward passes inside the forward"

    def __init__(self, eps: float = 1 / 255, alpha: float = 0.25 / 255, steps: int = 10, random_start: bool = True):
        if not (0 <= eps <= 1 and 0 <= alpha <= 1):
            raise ValueError(f"adv: eps and alpha are in pixel units, within [0, 1] (got eps={eps:g}, "
                             f"alpha={alpha:g}; did you mean {eps:g}/255?)")
        if steps < 1:
            raise ValueError(f"adv: steps must be >= 1, got {steps}")
        self.eps, self.alpha, self.steps, self.random_start = eps, alpha, steps, random_start

    def __repr__(self) -> str:
        return f"Adversarial(eps={self.eps:.4g}, alpha={self.alpha:.4g}, steps={self.steps})"

    def __call__(self, model, x, y):
        from guardx.attacks.pgd import pgd

        with running_stats_mode(model):
            x_adv = pgd(model, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps, random_start=self.random_start)
        ce = F.cross_entropy(model(x_adv), y)
        return ce, stats_dict(ce=ce, loss=ce)


class ObjectiveStep(nn.Module):
    """``model`` + ``objective`` as one module whose ``forward(x, y)`` returns ``(loss, stats)``.

    Engines wrap this module, not the bare model: DeepSpeed requires any double-backward term to be
    computed inside the wrapped module's forward, and DDP then sees every pass of the objective.
    """

    def __init__(self, model: nn.Module, objective: Callable):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return self.objective(self.model, x, y)

    @property
    def backward_in_forward(self) -> str | None:
        """Why the objective differentiates inside the forward (None: it does not)."""
        return getattr(self.objective, "backward_in_forward", None)


__all__ = ["OBJECTIVES", "build_objective", "list_objectives", "register_objective", "ObjectiveStep", "Guard",
           "Plain", "GradNorm", "Adversarial"]
