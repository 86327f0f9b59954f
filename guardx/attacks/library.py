"""The attacks guardx takes from torchattacks 3.5.1: Square and AutoAttack.

Both are faithful ports of the reference code (fra31/auto-attack); guardx only sets them to the
reference strength and makes them reproducible:

* ``square``: L∞ Square Attack, margin loss, ``p_init`` 0.8, one restart, 5000 queries by default, and
  ``resc_schedule`` (``evaluate.square_resc_schedule``): torchattacks' default ``True`` rescales the
  p-schedule when fewer than 10,000 queries are run; the reference AutoAttack builds its Square with
  ``False``. Default here: ``False``, AutoAttack's (on digits students ``True`` was 6-8 points stronger).
* ``autoattack``, ``version="standard"``: APGD-CE, APGD-T, FAB-T, Square run in sequence, each on the
  samples the previous ones did not break (the reference's ``run_standard_evaluation``), with the
  reference budgets and settings (fra31/auto-attack ``autoattack.py``, ``set_version('standard')`` at
  commit a392200): 100 iterations for APGD/APGD-T/FAB-T, ρ = 0.75 and one EOT iteration for APGD, 9
  target classes for APGD-T and FAB-T, one restart each, Square with 5000 queries, p_init 0.8 and
  ``resc_schedule=False`` (:func:`autoattack_components` builds exactly these). torchattacks' own ``AutoAttack`` is *not* used: it runs
  APGD/APGD-T/FAB-T for 10 iterations (Harry24k/adversarial-attacks-pytorch#196) and targets all
  ``n_classes − 1`` classes (999 on ImageNet instead of 9).
* ``autoattack``, ``version="fast"``: APGD-CE + APGD-T only (same iterations and targets), without
  FAB-T and Square, which rarely break a point the APGD pair did not on models without gradient
  masking (Croce & Hein, 2020) but cost the most.

torchattacks re-seeds the global RNG inside its attacks; here every call runs in a forked RNG state
seeded with the caller's ``seed``, so the caller's random stream is untouched and a call is reproducible.
torchattacks is installed separately (``pip install --no-deps torchattacks==3.5.1``, see the Makefile):
it pins ``requests~=2.25.1``, which it never imports.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from guardx.attacks import register_attack
from guardx.errors import ConfigError, MissingDependencyError

AUTOATTACK_VERSIONS = ("standard", "fast")


def _torchattacks(what: str):
    try:
        import torchattacks
    except ImportError:
        err = MissingDependencyError("torchattacks", "attacks", what)
        err.args = (f"{err} && pip install --no-deps torchattacks==3.5.1",)
        raise err from None
    return torchattacks


@contextmanager
def _forked_rng(seed: int | None, device: torch.device):
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def _seed(seed: int | None) -> int:
    return 0 if seed is None else int(seed)  # torchattacks takes None as "seed from the clock"


@register_attack("square", budget="queries", source="torchattacks", params={
    "queries": "Square attack queries per sample (also the Square inside autoattack standard)",
    "p_init": "Square attack initial fraction of pixels changed per query",
    "resc_schedule": "Square: rescale the p-schedule to the query budget (torchattacks' default True); "
                     "false = the reference AutoAttack's setting (always used inside autoattack)"},
    ranges={"queries": (1, None), "p_init": (0, 1)})
def _square(model, x, y, eps, *, queries: int = 5000, p_init: float = 0.8, resc_schedule: bool = False,
            seed: int | None = None):
    ta = _torchattacks("the square attack")
    atk = ta.Square(model, norm="Linf", eps=eps, n_queries=queries, n_restarts=1, p_init=p_init,
                    loss="margin", resc_schedule=resc_schedule, seed=_seed(seed))
    with _forked_rng(_seed(seed), x.device):
        return atk(x, y)


@register_attack("autoattack", source="torchattacks", keys={"square_queries": "square_queries"}, params={
    "version": "standard (APGD-CE, APGD-T, FAB-T, Square) | fast (APGD-CE, APGD-T)",
    "steps": "iterations of APGD-CE, APGD-T and FAB-T (reference: 100)",
    "targets": "target classes of APGD-T and FAB-T (reference: 9)",
    "square_queries": "Square attack queries per sample (also the Square inside autoattack standard)"},
    ranges={"steps": (1, None), "targets": (1, None), "square_queries": (1, None)})
def _autoattack(model, x, y, eps, *, version: str = "standard", steps: int = 100, targets: int = 9,
                square_queries: int = 5000, seed: int | None = None):
    with torch.no_grad():
        n_classes = model(x[:1]).shape[1]
    s = _seed(seed)
    attacks = autoattack_components(model, eps, n_classes=n_classes, version=version, steps=steps, targets=targets,
                                    square_queries=square_queries, seed=s)
    with _forked_rng(s, x.device):
        return _torchattacks("autoattack").MultiAttack(attacks)(x, y)


def autoattack_components(model, eps: float, *, n_classes: int, version: str = "standard", steps: int = 100,
                          targets: int = 9, square_queries: int = 5000, seed: int = 0) -> list:
    """AutoAttack's attacks in their order, configured as the reference ``set_version(version)`` does (L∞):
    APGD-CE, APGD-T (``targets`` classes), and for ``standard`` FAB-T and Square (resc_schedule=False)."""
    ta = _torchattacks("autoattack")
    if version not in AUTOATTACK_VERSIONS:
        raise ConfigError(f"autoattack version {version!r} is not one of {list(AUTOATTACK_VERSIONS)}")
    if n_classes < 4:  # APGD-T's targeted DLR loss reads the 3rd and 4th largest logits
        raise ConfigError(f"autoattack needs a model with at least 4 classes, this one has {n_classes}")
    apgd_t = ta.APGDT(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, n_classes=n_classes,
                      eot_iter=1, rho=0.75)
    apgd_t.n_target_classes = min(targets, n_classes - 1)
    attacks = [ta.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, loss="ce", eot_iter=1,
                       rho=0.75), apgd_t]
    if version == "standard":
        fab_t = ta.FAB(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, multi_targeted=True,
                       n_classes=n_classes)
        fab_t.n_target_classes = min(targets, n_classes - 1)
        attacks += [fab_t, ta.Square(model, norm="Linf", eps=eps, n_queries=square_queries, n_restarts=1,
                                     p_init=0.8, loss="margin", resc_schedule=False, seed=seed)]
    return attacks
