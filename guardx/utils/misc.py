"""Small shared helpers: seeding, device choice, progress bars, finite-loss checks."""
from __future__ import annotations

import hashlib
import math
import random
import sys
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from guardx.errors import ConfigError, NonFiniteLossError


def derive_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes, machines and Python
    versions). Every random stream in guardx is seeded through it with a leading name, e.g.
    ``derive_seed("augment", seed, epoch, index)``, so no two streams collide by arithmetic accident."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def parse_fraction(value) -> float:
    """``"1/255"``, ``"0.5"`` or a number → float (ε and α are written as k/255 in the paper); ValueError
    for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, (int, float)):
        return float(value)
    num, slash, den = str(value).replace(" ", "").partition("/")
    try:
        return float(num) / float(den) if slash else float(num)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{value!r} is not a number (write e.g. 0.5 or 1/255)") from None


def fmt_eps(eps: float) -> str:
    """``1/255``-style label when ε is a multiple of 1/255, else the plain number."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return str(Fraction(eps).limit_denominator(10000)) if eps else "0"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def reseed(seed: int) -> None:
    """Reseed torch's default generators in a hot loop: the CPU one, and CUDA's once CUDA is up.
    (``torch.manual_seed`` would also queue a lazy CUDA seed with a captured stack on every call.)"""
    torch.random.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible")
    return torch.device("cuda", local_rank)


def progress(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr, disabled on non-zero ranks (callers pass ``enabled=ctx.is_main and cfg.run.progress``).

    Redirected to a file or CI log, bars refresh every 10 s instead of continuously.
    """
    kwargs.setdefault("mininterval", 0.2 if sys.stderr.isatty() else 10.0)
    return tqdm(iterable, disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)


def interactive() -> bool:
    """True when stderr is a terminal (nested per-iteration bars are shown only then)."""
    return sys.stderr.isatty()


def check_finite(value: float, *, stage: str, step: int, last_good: str | None) -> None:
    """NonFiniteLossError for a NaN/inf loss, naming the newest good checkpoint (checkpoints are written
    only when finite, see :mod:`guardx.utils.checkpoint`)."""
    if not math.isfinite(value):
        from guardx.utils.checkpoint import nonfinite_advice

        where = f"; last good checkpoint: {last_good}" if last_good else "; no checkpoint written yet"
        raise NonFiniteLossError(f"{stage}: loss became {value} at step {step} ({nonfinite_advice(stage)}){where}")


def cosine_lr(step: int, total: int) -> float:
    """Multiplier of the base learning rate: cosine from 1 to 0 over ``total`` steps."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def lr_schedule(name: str, total: int):
    """``step -> multiplier`` of the base learning rate: ``cosine`` (1 → 0), ``step`` (×0.1 from half of
    ``total`` on, DC/MTT's evaluation schedule) or ``constant``."""
    if name == "cosine":
        return lambda step: cosine_lr(step, total)
    if name == "step":
        return lambda step: 0.1 if step >= total // 2 else 1.0
    if name == "constant":
        return lambda step: 1.0
    raise ValueError(f"unknown learning-rate schedule {name!r} (cosine | step | constant)")


def labelled_paths(specs: list[str], what: str = "evaluate.checkpoints") -> list[tuple[str, Path]]:
    """``["guard=a/student.pt", "b/student.pt"]`` -> unique ``(label, path)`` pairs; unnamed entries are
    labelled by their file stem, with parent folders added until the labels are unique."""
    named = []
    for s in specs:
        label, sep, p = s.partition("=")
        named.append((label, Path(p)) if sep and label and p else (None, Path(s)))
    unnamed = [p for label, p in named if label is None]
    depth = 1
    while True:
        auto = {p: "/".join(p.with_suffix("").parts[-depth:]) for p in unnamed}
        if len(set(auto.values())) == len(auto) or depth > max((len(p.parts) for p in unnamed), default=1):
            break
        depth += 1
    entries = [(label if label is not None else auto[p], p) for label, p in named]
    labels = [lab for lab, _ in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{what}: labels must be unique, got {labels}")
    return entries
