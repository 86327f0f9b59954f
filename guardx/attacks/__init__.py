"""Adversarial attacks: ``run_attack(name, model, x, y, eps, **params)`` returns an adversarial batch in [0, 1]."""
from __future__ import annotations

import difflib

import torch

from guardx.attacks.pgd import pgd


def _run_pgd(model, x, y, eps, *, steps: int = 100, alpha: float | None = None, random_start: bool = True,
             generator: torch.Generator | None = None, early_stop: bool = False):
    return pgd(model, x, y, eps=eps, alpha=eps / 4 if not alpha else alpha, steps=steps,
               random_start=random_start, generator=generator, early_stop=early_stop)


_ATTACKS = {"pgd": _run_pgd}


def list_attacks() -> list[str]:
    return sorted(_ATTACKS)


def run_attack(name: str, model, x: torch.Tensor, y: torch.Tensor, eps: float, **params) -> torch.Tensor:
    if name not in _ATTACKS:
        close = difflib.get_close_matches(name, _ATTACKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown attack {name!r}{hint}; known: {list_attacks()}")
    return _ATTACKS[name](model, x, y, eps, **params)
