"""CDA (Yin & Shen, "Dataset Distillation via Curriculum Data Synthesis in Large Data Era", TMLR 2024):
SRe2L's recover with a curriculum on the random-resized crop — global to local, easy to hard.

At recover iteration ``it`` of ``total`` the crop scale range is ``(lo, hi)`` with ``hi = 1`` and ``lo``
falling from 1 (the whole image) to 0.08 (SRe2L's fixed lower bound) over the first ``milestone · total``
iterations, then staying at 0.08. As the authors' code (VILA-Lab/SRe2L, ``CDA/recover_cda_in1k.py``
l. 51-71; the same in ``recover_cda_tiny.py`` and ``recover_cda_in21k.py``) computes it:

* ``step``:   lo = 1.0 before the milestone;
* ``linear``: lo = 0.08 + (1 − 0.08) · (1 − it / (milestone·total));
* ``cosine``: lo = 0.08 + (1 − 0.08) · (1 + cos(π · it / (milestone·total))) / 2;
* at and after the milestone (``it ≥ milestone·total``): lo = 0.08.

Defaults: ``cosine`` with ``milestone = 1`` — the schedule of every recover command in CDA's README
(Tiny-ImageNet, ImageNet-1K, ImageNet-21K: ``--easy2hard-mode "cosine" --milestone 1``; the argparse
default ``milestone=0`` would switch the curriculum off). GUARD(CDA) = GUARD squeeze + this recover.

CDA's README recover settings, for reference (guardx's ``recover.*`` keys): Tiny-ImageNet lr 0.4,
r_bn 0.05, 4000 iterations, jitter 4 (its argparse default), batch 100; ImageNet-1K lr 0.25, r_bn 0.01,
4000 iterations, jitter 32; ImageNet-21K lr 0.05, r_bn 0.25, 2000 iterations.
"""
from __future__ import annotations

import math
from typing import Callable

SCHEDULES = ("step", "linear", "cosine")


def crop_scale_at(it: int, total: int, *, schedule: str = "cosine", milestone: float = 1.0, start: float = 1.0,
                  end: float = 0.08, hi: float = 1.0) -> tuple[float, float]:
    """The random-resized-crop scale range ``(lo, hi)`` at recover iteration ``it`` (0-based) of ``total``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"CDA schedule must be one of {SCHEDULES}, got {schedule!r}")
    span = milestone * total
    if it >= span:  # past the milestone (or milestone 0: no curriculum)
        return end, hi
    frac = it / span
    if schedule == "step":
        lo = start
    elif schedule == "linear":
        lo = end + (start - end) * (1 - frac)
    else:
        lo = end + (start - end) * (1 + math.cos(math.pi * frac)) / 2
    return lo, hi


def scale_schedule(cda_cfg, total: int) -> Callable[[int], tuple[float, float]]:
    """``scale_at(it) -> (lo, hi)`` for :func:`guardx.recover.synthesize` from a ``cda`` config section."""
    def scale_at(it: int) -> tuple[float, float]:
        return crop_scale_at(it, total, schedule=cda_cfg.schedule, milestone=cda_cfg.milestone,
                             start=cda_cfg.scale_start, end=cda_cfg.scale_end, hi=cda_cfg.scale_max)
    return scale_at


__all__ = ["SCHEDULES", "crop_scale_at", "scale_schedule"]
