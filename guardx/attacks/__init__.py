"""Adversarial attacks behind one call: ``run_attack(name, model, x, y, eps, **params)``.

Inputs are images in [0, 1] (the normaliser lives inside the model); the result is an adversarial batch
in [0, 1], within ``eps`` in L∞ for the bounded attacks. ``name`` may carry its budget as a suffix:
``pgd100`` is PGD with 100 steps, ``mim20`` MIM with 20, ``cw200`` CW with 200, ``square1000`` Square
with 1000 queries. ``seed`` makes the attack's randomness reproducible (the caller derives it from the
position in the data, so results do not depend on batching across ranks).

| name | norm | source |
|---|---|---|
| ``pgd``, ``fgsm``, ``mim`` | L∞ | guardx (``attacks/pgd.py``): torchattacks' update, seeded starts, early stop |
| ``cw`` | L2, unbounded | guardx (``attacks/cw.py``): fixes torchattacks' margin for negative logits |
| ``square``, ``autoattack`` | L∞ | torchattacks 3.5.1 (``attacks/library.py``), at the reference settings |
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from guardx.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class AttackInfo:
    name: str
    fn: Callable
    bounded: bool          # False: the attack ignores eps (CW-L2); reported once, not per radius
    budget: str | None     # the parameter a numeric suffix sets (pgd100 -> steps=100)
    source: str            # "guardx" | "torchattacks"


_ATTACKS: dict[str, AttackInfo] = {}


def register_attack(name: str, *, bounded: bool = True, budget: str | None = None, source: str = "guardx"):
    def deco(fn: Callable) -> Callable:
        _ATTACKS[name] = AttackInfo(name, fn, bounded, budget, source)
        return fn

    return deco


def list_attacks() -> list[str]:
    return sorted(_ATTACKS)


def attack_info(name: str) -> AttackInfo:
    return _ATTACKS[parse_attack(name)[0]]


_SPEC = re.compile(r"^([a-z_]+?)(\d+)?$")


def parse_attack(spec: str) -> tuple[str, dict]:
    """``"pgd100"`` -> ``("pgd", {"steps": 100})``; a one-line :class:`ConfigError` for an unknown name."""
    m = _SPEC.match(spec.strip().lower())
    name, budget = (m.group(1), m.group(2)) if m else (spec, None)
    if name not in _ATTACKS:
        raise ConfigError(f"unknown attack {spec!r}{did_you_mean(spec, [*_ATTACKS, 'pgd100'])}; known: "
                          f"{list_attacks()} (pgd100 = PGD with 100 steps)")
    if budget is None:
        return name, {}
    info = _ATTACKS[name]
    if info.budget is None:
        raise ConfigError(f"attack {spec!r}: {name} takes no numeric budget suffix")
    if int(budget) < 1:
        raise ConfigError(f"attack {spec!r}: the {info.budget} suffix must be >= 1")
    return name, {info.budget: int(budget)}


def run_attack(name: str, model, x: torch.Tensor, y: torch.Tensor, eps: float, **params) -> torch.Tensor:
    """Adversarial version of ``x`` (labels ``y``); ``params`` are the attack's options (see each module).
    A budget suffix in ``name`` overrides the matching parameter."""
    base, budget = parse_attack(name)
    return _ATTACKS[base].fn(model, x, y, eps, **{**params, **budget})


# registration on import (after the registry exists)
from guardx.attacks import cw, library, pgd  # noqa: E402,F401

__all__ = ["run_attack", "list_attacks", "parse_attack", "attack_info", "register_attack", "AttackInfo"]
