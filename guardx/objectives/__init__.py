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

from guardx.errors import did_you_mean
from guardx.models.wrapper import split_normalizer
from guardx.objectives._common import running_stats_mode, stats_dict
from guardx.objectives.guard import Guard, finish_double_backprop, input_gradient
from guardx.objectives._common import mode_independent, trainable

_OBJECTIVES: dict[str, Callable[..., Callable]] = {}


def register_objective(name: str):
    def deco(factory):
        if name in _OBJECTIVES:
            raise ValueError(f"objective {name!r} registered twice")
        _OBJECTIVES[name] = factory
        return factory
    return deco


def list_objectives() -> list[str]:
    return sorted(_OBJECTIVES)


def build_objective(name: str, **params) -> Callable:
    if name not in _OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}{did_you_mean(name, _OBJECTIVES)}; known: {list_objectives()}")
    params = {k: v for k, v in params.items() if v is not None}
    return _OBJECTIVES[name](**params)


@register_objective("plain")
class Plain:
    """Cross-entropy: the SRe2L squeeze."""

    def __repr__(self) -> str:
        return "Plain()"

    def __call__(self, model, x, y):
        ce = F.cross_entropy(model(x), y)
        return ce, stats_dict(ce=ce, loss=ce)


register_objective("guard")(Guard)


@register_objective("gradnorm")
class GradNorm:
    """Input-gradient regularisation (Table 3 ablation): reg = λ_g/B Σ_i ‖∇_{x_i} ℓ_i‖², double backprop.

    Same conventions as GUARD exact: running-statistics BatchNorm in the regulariser pass, gradient in
    ``space`` (normalised input by default), shared clean pass when the model allows it.
    """

    def __init__(self, lam_g: float = 1e-2, space: str = "normalized", low_memory: bool = True):
        self.lam_g, self.space, self.low_memory = lam_g, space, low_memory

    def __repr__(self) -> str:
        return f"GradNorm(lam_g={self.lam_g:g}, space={self.space})"

    def __call__(self, model, x, y):
        to_input, net = split_normalizer(model, self.space)
        xin = to_input(x).detach()
        with running_stats_mode(net):
            losses, g = input_gradient(net, xin, y, create_graph=True)
            reg = self.lam_g * g.flatten(1).pow(2).sum(1).mean()
        loss, ce = finish_double_backprop(net, xin, y, trainable(model), shared=mode_independent(model),
                                          low_memory=self.low_memory, clean_losses=losses, reg=reg)
        return loss, stats_dict(ce=ce, reg=reg, loss=loss)


@register_objective("adv")
class Adversarial:
    """PGD-k adversarial training (the SRe2L+Adv baseline of Table 1).

    The attack runs with running-statistics BatchNorm (not updated), in pixel space with ε in pixel
    units; the training loss is the cross-entropy on the adversarial batch in the model's current mode.
    """

    def __init__(self, eps: float = 1 / 255, alpha: float = 0.25 / 255, steps: int = 10, random_start: bool = True):
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


__all__ = ["build_objective", "list_objectives", "register_objective", "ObjectiveStep", "Guard", "Plain",
           "GradNorm", "Adversarial"]
