"""Distillers: each turns real data (and, for some, a teacher) into a distilled set.

Every distiller writes the same thing into the folder of its output stage (see :mod:`guardx.paths`):
``images/<class>/<class>_<k>.png`` and, last, ``manifest.json``, whose ``labels`` says how a student
learns from the set:

* ``teacher`` — the teacher's soft labels on random crops (relabel's stored epochs, or the teacher online);
* ``hard`` — the class of each image's folder;
* ``soft`` — one stored logit vector per image (``soft_labels.pt``, e.g. TESLA's learned labels).

The shared ``train`` and ``evaluate`` stages consume any of them. GUARD is not a distiller: it is the
objective a distiller's real-data training uses (``objective.*``).

A distiller is one registry entry: a function ``configure(cfg) -> cfg`` (the config its stages run with,
e.g. CDA switches recover to its crop curriculum; most return ``cfg`` unchanged) with capabilities

* ``stages``: the stages that produce the set, in order (then ``train`` and ``evaluate`` follow),
* ``output``: the folder (under the run) that holds the set,
* ``labels``: what its manifest says (``teacher`` | ``hard`` | ``soft``),
* ``teacher``: True when a squeeze teacher exists to evaluate beside the student.

Adding a distiller = its module (a stage with ``run(cfg)``, listed in :mod:`guardx.stages`) + one
``@register_distiller`` entry.
"""
from __future__ import annotations

from guardx.registry import Registry

DISTILLERS = Registry("distiller")


def register_distiller(name: str, *, stages: tuple[str, ...], output: str, labels: str, teacher: bool,
                       help: str = ""):  # noqa: A002
    if labels not in ("teacher", "hard", "soft"):
        raise ValueError(f"distiller {name!r}: labels must be teacher, hard or soft, got {labels!r}")
    return DISTILLERS.register(name, stages=tuple(stages), output=output, labels=labels, teacher=teacher, help=help)


@register_distiller("sre2l", stages=("squeeze", "recover", "relabel"), output="recover", labels="teacher",
                    teacher=True, help="SRe2L (Yin et al. 2023): squeeze a teacher, recover images from its "
                                       "BatchNorm statistics, relabel random crops with its soft labels")
def configure_sre2l(cfg):
    return cfg


@register_distiller("cda", stages=("squeeze", "recover", "relabel"), output="recover", labels="teacher",
                    teacher=True, help="CDA (Yin & Shen 2023): SRe2L with a curriculum of crops in recover (the lower "
                                       "bound of the crop scale falls over the iterations, cda.*)")
def configure_cda(cfg):
    cfg.recover.crop_schedule = "cda"
    return cfg


@register_distiller("dc", stages=("dc",), output="dc", labels="hard", teacher=False,
                    help="DC (Zhao et al. 2021): match the gradients of real and synthetic batches, class by class, "
                         "on fresh networks (Algorithm 1 with GUARD's objective as the real-data loss: GUARD(DC))")
def configure_dc(cfg):
    return cfg


@register_distiller("mtt", stages=("buffers", "mtt"), output="mtt", labels="hard", teacher=False,
                    help="MTT (Cazenavette et al. 2022): match expert training trajectories (buffers) with a few "
                         "steps on the synthetic set and a learned step size")
def configure_mtt(cfg):
    cfg.mtt.tesla = False
    return cfg


@register_distiller("tesla", stages=("buffers", "mtt"), output="tesla", labels="soft", teacher=False,
                    help="TESLA (Cui et al. 2023): MTT's objective with a constant-memory gradient and soft labels")
def configure_tesla(cfg):
    cfg.mtt.tesla = True
    return cfg


def list_distillers() -> list[str]:
    return DISTILLERS.names()


__all__ = ["DISTILLERS", "register_distiller", "list_distillers"]
