"""Resumable stage state: numbered checkpoint files that stay good.

* **Written only when finite.** :meth:`Checkpointer.save` checks every floating tensor of the state
  (model, optimiser, scaler) in one fused reduction per device first; a non-finite state is not written,
  and the run stops naming the newest checkpoint that *is* good. All ranks take the same decision.
* **Written atomically by rank 0**, stamped with the stage's fingerprint (see :mod:`guardx.stage_guard`);
  the newest ``keep`` are kept.
* **Loaded newest to oldest.** A file that does not load (truncated, corrupt, non-finite, not a guardx
  checkpoint) is set aside as ``<file>.corrupt`` with a one-line warning and the next older one is
  tried; only when none loads is it an error. A file stamped with other settings goes through the
  stage's ``run.on_config_change`` policy.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from guardx.errors import GuardxError, NonFiniteLossError, warn
from guardx.utils.io import load_torch, save_torch, set_aside

_NAME = re.compile(r"^step_(\d{9})\.pt$")


def floating_tensors(obj) -> list[torch.Tensor]:
    """Every floating-point tensor in a nested dict/list/tuple (a state dict, a checkpoint)."""
    out: list[torch.Tensor] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            if o.is_floating_point() and o.numel():
                out.append(o.detach())
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif isinstance(o, float) and not math.isfinite(o):
            out.append(torch.tensor(o))
    return out


def all_finite(obj) -> bool:
    """True when no floating tensor (or float) in ``obj`` holds NaN or ±inf: one ``_foreach_norm(inf)`` per
    device (a fused kernel on GPUs; NaN propagates through the max) and one host sync."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in floating_tensors(obj):
        by_device.setdefault(t.device, []).append(t)
    for tensors in by_device.values():
        norms = torch._foreach_norm(tensors, float("inf"))
        if not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
            return False
    return True


# The step size to lower when a stage's loss or weights stop being finite (the stage's config key).
LR_KEYS = {"mtt": "mtt.lr_img", "tesla": "mtt.lr_img", "dc": "dc.lr_img", "recover": "recover.lr"}


def nonfinite_advice(stage: str) -> str:
    clip = ", or clip gradients with squeeze.grad_clip" if stage == "squeeze" else ""
    return (f"lower {LR_KEYS.get(stage, stage + '.lr')}{clip}, then rerun with run.on_config_change=restart (or =resume to continue from "
            "the last good checkpoint with the new settings)")


def require_finite(obj, what: str, ckpt: "Checkpointer | None" = None) -> None:
    """NonFiniteLossError unless ``obj`` (a state dict) is finite: a final model is never written with NaNs."""
    if not all_finite(obj):
        stage = what.split(":")[0]
        last = f"; last good checkpoint: {ckpt.last_saved}" if ckpt is not None and ckpt.last_saved else ""
        raise NonFiniteLossError(f"{what} holds non-finite values, so it was not saved "
                                 f"({nonfinite_advice(stage)}){last}")


class Checkpointer:
    """``load()`` / ``save(state, step)`` for a resumable stage (see the module docstring).

    ``ctx``: the distributed context (rank 0 writes and decides; every rank calls ``save`` and ``load``);
    ``guard``: the stage's :class:`~guardx.stage_guard.StageGuard` (fingerprint stamp and policy);
    ``stage``: the name used in messages (default: the guard's stage).
    """

    def __init__(self, folder: str | Path, *, keep: int = 3, ctx=None, guard=None, stage: str | None = None):
        self.folder = Path(folder)
        self.keep = max(int(keep), 1)
        self.ctx = ctx
        self.guard = guard
        self.stage = stage or (guard.stage if guard is not None else self.folder.parent.name)
        self.last_saved: Path | None = None  # the newest checkpoint known good: loaded or written by this run
        self.loaded: Path | None = None

    def _all(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def latest(self) -> Path | None:
        found = self._all()
        return found[-1][1] if found else None

    # ------------------------------------------------------------------ load
    def load(self, required: tuple[str, ...] = ()) -> dict | None:
        """The newest checkpoint that loads (every rank gets the same one), or None on a fresh start.

        ``required``: keys a usable checkpoint must have. Raises :class:`GuardxError` when checkpoints
        exist but none loads (they are all set aside then, so a rerun starts the stage afresh)."""
        mine: dict = {}

        def choose() -> str | None:
            path, state = self._choose(required)
            mine["state"] = state
            return None if path is None else str(path)

        on_main = self.ctx.on_main if self.ctx is not None else (lambda fn: fn())
        chosen = on_main(choose)
        if chosen is None:
            return None
        self.last_saved = self.loaded = Path(chosen)
        if "state" in mine:  # rank 0 has it already
            return mine["state"]
        try:
            return load_torch(chosen)
        except (GuardxError, FileNotFoundError) as e:
            raise GuardxError(f"rank {self.ctx.rank} cannot read the checkpoint rank 0 resumes from ({e}): every "
                              "rank must see run.out_dir") from None

    def _choose(self, required: tuple[str, ...]) -> tuple[Path | None, dict | None]:
        found = self._all()
        failed = []
        for _, path in reversed(found):
            try:
                state = load_torch(path)
                problem = _problem(state, required)
            except GuardxError as e:
                problem = str(e).replace(f"cannot read {path}: ", "")
            if problem is None:
                if self.guard is None or self.guard.accepts(state.get("fingerprint"), path):
                    return path, state
                path.unlink()  # run.on_config_change=restart: work of other settings goes
                continue
            aside = set_aside(path)
            failed.append(path.name)
            warn(f"{self.stage}: checkpoint {path} does not load ({problem}); set aside as {aside.name}, trying "
                 "the next older one")
        if failed:
            raise GuardxError(f"{self.stage}: none of the checkpoints in {self.folder} loads ({', '.join(failed)}; "
                              "set aside as *.corrupt); rerun to start the stage from scratch")
        return None, None

    # ------------------------------------------------------------------ save
    def save(self, state: dict, step: int) -> Path:
        """Write ``state`` as ``step_<step>.pt`` if it is finite (collective: every rank calls it with the
        same state); else raise :class:`NonFiniteLossError` naming the last good checkpoint."""
        finite = all_finite(state)
        if self.ctx is not None and self.ctx.world_size > 1:  # all ranks decide alike (one rank's fault stops all)
            flag = torch.tensor([0.0 if finite else 1.0], device=self.ctx.device)
            finite = self.ctx.all_reduce_sum(flag).item() == 0
        if not finite:
            last = f"last good checkpoint: {self.last_saved}" if self.last_saved else "no checkpoint written yet"
            raise NonFiniteLossError(f"{self.stage}: the weights or optimiser state became non-finite by step {step}, "
                                     f"so it was not saved ({nonfinite_advice(self.stage)}); {last}")
        path = self.folder / f"step_{step:09d}.pt"
        if self.guard is not None:
            state = {**state, "fingerprint": self.guard.stamp()}
        if self.ctx is None or self.ctx.is_main:
            save_torch(state, path)
            # a checkpoint of a later step belongs to a run this one does not continue (it resumed from before
            # it): it goes, so the step just written is the newest and rotation never removes it
            found = self._all()
            for _, old in [f for f in found if f[0] > step] + [f for f in found if f[0] <= step][:-self.keep]:
                old.unlink(missing_ok=True)
        if self.ctx is not None:
            self.ctx.barrier()
        self.last_saved = path
        return path


def _problem(state, required: tuple[str, ...]) -> str | None:
    """Why a loaded checkpoint cannot be used, or None."""
    if not isinstance(state, dict):
        return "not a guardx checkpoint"
    missing = [k for k in required if k not in state]
    if missing:
        return f"not a guardx checkpoint: no {missing[0]!r}"
    if not all_finite(state):
        return "it holds non-finite values"
    return None
