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
from typing import Callable

import torch

from guardx.errors import ConfigError, did_you_mean
from guardx.registry import Entry, Registry

# Capabilities every attack declares: ``bounded`` (False: ignores eps, e.g. CW-L2; reported once, not per
# radius), ``budget`` (the parameter a numeric suffix sets: pgd100 -> steps=100), ``source`` (guardx |
# torchattacks). Its config-settable parameters become ``evaluate.<attack>_<param>`` keys.
ATTACKS = Registry("attack")


def register_attack(name: str, *, params: dict[str, str] | None = None, keys: dict[str, str] | None = None,
                    ranges: dict[str, tuple] | None = None, bounded: bool = True, budget: str | None = None,
                    source: str = "guardx") -> Callable:
    """``fn(model, x, y, eps, *, <params>, seed=None)``; each documented parameter is read from the config
    key ``evaluate.<name>_<param>`` unless ``keys`` names another (attacks may share a key)."""
    keys = {p: (keys or {}).get(p, f"{name}_{p}") for p in (params or {})}
    return ATTACKS.register(name, params=params, keys=keys, ranges=ranges, bounded=bounded, budget=budget,
                            source=source)


def list_attacks() -> list[str]:
    return ATTACKS.names()


def attack_info(name: str) -> Entry:
    return ATTACKS.get(parse_attack(name)[0])


_SPEC = re.compile(r"^([a-z_]+?)(\d+)?$")


def split_radius(spec: str) -> tuple[str, float | None]:
    """``"autoattack@1/255"`` -> ``("autoattack", 1/255)``: an attack run at that radius only (instead of every
    ``evaluate.eps``); ``"pgd100"`` -> ``("pgd100", None)``."""
    from guardx.utils.misc import parse_fraction

    base, at, radius = spec.partition("@")
    if not at:
        return spec, None
    try:
        eps = parse_fraction(radius)
    except ValueError:
        raise ConfigError(f"attack {spec!r}: {radius!r} after @ is not a radius (write e.g. autoattack@1/255)") from None
    if not 0 <= eps <= 1:
        raise ConfigError(f"attack {spec!r}: the radius is in pixel units, within [0, 1]"
                          + (f" (did you mean @{radius}/255?)" if 1 < eps <= 255 else ""))
    return base, eps


def parse_attack(spec: str) -> tuple[str, dict]:
    """``"pgd100"`` -> ``("pgd", {"steps": 100})`` (a ``@radius`` suffix is ignored here, see
    :func:`split_radius`); a one-line :class:`ConfigError` for an unknown name."""
    spec = split_radius(spec)[0]
    m = _SPEC.match(spec.strip().lower())
    name, budget = (m.group(1), m.group(2)) if m else (spec, None)
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {spec!r}{did_you_mean(spec, [*ATTACKS.names(), 'pgd100'])}; known: "
                          f"{list_attacks()} (pgd100 = PGD with 100 steps)")
    if budget is None:
        return name, {}
    info = ATTACKS.get(name)
    if info.budget is None:
        raise ConfigError(f"attack {spec!r}: {name} takes no numeric budget suffix")
    if int(budget) < 1:
        raise ConfigError(f"attack {spec!r}: the {info.budget} suffix must be >= 1")
    return name, {info.budget: int(budget)}


def run_attack(name: str, model, x: torch.Tensor, y: torch.Tensor, eps: float, **params) -> torch.Tensor:
    """Adversarial version of ``x`` (labels ``y``); ``params`` are the attack's options (see each module).
    A budget suffix in ``name`` overrides the matching parameter."""
    base, budget = parse_attack(name)
    return ATTACKS.get(base).factory(model, x, y, eps, **{**params, **budget})


# registration on import (after the registry exists)
from guardx.attacks import cw, library, pgd  # noqa: E402,F401

__all__ = ["ATTACKS", "split_radius", "run_attack", "list_attacks", "parse_attack", "attack_info", "register_attack"]
