"""The attack plan of an evaluation: which (attack, ε) pairs run, with which parameters, under which
metric names — all read from ``evaluate.*`` (each attack's parameters come from its registry entry)."""
from __future__ import annotations

import dataclasses

from guardx.attacks import attack_info, parse_attack, split_radius
from guardx.utils.misc import fmt_eps


@dataclasses.dataclass(frozen=True)
class Job:
    metric: str          # column name, e.g. "pgd100@1/255" or "cw"
    attack: str          # registered attack name
    eps: float | None    # None for unbounded attacks
    params: dict


def jobs(cfg) -> list[Job]:
    """One job per (attack, radius): every ``evaluate.eps``, or only the radius an ``attack@radius`` names."""
    out = []
    for spec in cfg.evaluate.attacks:
        name, params = parse_attack(spec)[0], cfg.evaluate.attack_params(spec)
        base, radius = split_radius(spec)
        if attack_info(spec).bounded:
            out += [Job(f"{base}@{fmt_eps(e)}", name, e, params)
                    for e in ([radius] if radius is not None else cfg.evaluate.eps)]
        else:
            out.append(Job(base, name, None, params))
    return out


def metric_names(cfg) -> list[str]:
    return ["clean"] + [j.metric for j in jobs(cfg)]


def describe(cfg) -> str:
    """One line naming every attack with its settings (for reports)."""
    parts = []
    for spec in cfg.evaluate.attacks:
        p = cfg.evaluate.attack_params(spec)
        parts.append(f"{spec} (" + ", ".join(f"{k}={_short(k, v)}" for k, v in p.items()) + ")" if p else spec)
    eps = ", ".join(fmt_eps(e) for e in cfg.evaluate.eps)
    return f"attacks: {'; '.join(parts)} · ε ∈ {{{eps}}} (L∞, pixel units; cw: unbounded L2)"


def _short(key: str, v):
    if key == "alpha" and not v:  # a step size of 0 means ε/4
        return "ε/4"
    return f"{v:.3g}" if isinstance(v, float) else v


def settings(cfg) -> dict:
    """Everything the numbers depend on (a cached result is reused only when this matches): evaluate's
    entry of the one fingerprint mechanism, :func:`guardx.stages.result_settings`, and the result format
    (2: per-sample results are stored)."""
    from guardx.stages import result_settings

    return {**result_settings(cfg, "evaluate"), "format": 2}
