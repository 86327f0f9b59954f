"""The one training loop squeeze (teacher on real data) and train (student on distilled data) share.

Resumable at any step: a checkpoint records the engine state (model, optimiser, scheduler), the epoch,
the *global* samples consumed in that epoch and the step count. The data order is a function of
(seed, epoch) and the per-rank RNG is reseeded from (seed, epoch, position, rank), so a resumed run —
on the same or a different number of ranks — continues with the same global order. An optimiser step
takes ``distributed.grad_accum`` micro-batches per rank; checkpoints fall between optimiser steps.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch

from guardx.errors import GuardxError
from guardx.utils.checkpoint import Checkpointer
from guardx.utils.misc import check_finite, derive_seed, progress, reseed


@dataclass
class FitResult:
    steps: int = 0
    epochs_done: int = 0
    seconds: float = 0.0
    samples: int = 0
    history: list = field(default_factory=list)  # per-epoch mean stats


def fit(*, engine, loader, epochs: int, ckpt: Checkpointer, ctx, stage: str, seed: int, device,
        show_progress: bool = True, max_steps: int = 0, ckpt_every_steps: int = 0,
        extra_state: dict | None = None) -> FitResult:
    state = ckpt.load(required=("engine", "epoch", "consumed", "step"))
    epoch, consumed, step = 0, 0, 0
    history: list = []
    # running sums of this epoch's stats; a checkpoint inside an epoch carries them, so the epoch's entry in
    # the history averages all of its batches, before and after a resume
    sums: dict[str, float] = {}
    n_batches = 0
    if state is not None:
        try:
            engine.load_state_dict(state["engine"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise GuardxError(f"{stage}: cannot resume from {ckpt.loaded}: {str(e).strip().splitlines()[0][:200]}; "
                              "it was written for another model or optimiser") from None
        epoch, consumed, step = state["epoch"], state["consumed"], state["step"]
        history = list(state.get("history", []))
        if consumed:
            sums, n_batches = dict(state.get("epoch_sums", {})), int(state.get("epoch_batches", 0))
    result = FitResult(steps=step, epochs_done=epoch, history=history)
    if max_steps and step >= max_steps or epoch >= epochs:
        return result

    def snapshot(ep: int, cons: int) -> None:
        partial = {"epoch_sums": sums, "epoch_batches": n_batches} if cons else {}
        ckpt.save({"engine": engine.state_dict(), "epoch": ep, "consumed": cons, "step": step,
                   "history": history, "world_size": ctx.world_size, **partial, **(extra_state or {})}, step)

    engine.train()
    t0 = time.perf_counter()
    # a dead or stalled rank ends the run with one clear error instead of a hang or a gloo traceback
    with ctx.on_peer_loss(lambda: f"{stage} step {step + 1}"):
        while epoch < epochs:
            loader.set_epoch(epoch, start=consumed)
            epoch_steps = 0
            bar = progress(total=len(loader), enabled=show_progress and ctx.is_main,
                           desc=f"{stage} {epoch + 1}/{epochs}", unit="batch")
            # one optimiser step = up to distributed.grad_accum micro-batches (fewer at an epoch's end); the
            # group is drawn first so the engine knows its size before the first backward (loss scale, sync)
            for group in _groups(loader, engine.grad_accum):
                engine.start_step(len(group))
                for x, y in group:
                    x = x.to(device, non_blocking=True)
                    y = y.to(device, non_blocking=True)
                    # the objective's randomness (e.g. PGD random starts) is a function of the position in
                    # the data, so a resumed run draws what the uninterrupted run would have (the loaders
                    # seed their augmentation per sample the same way)
                    reseed(derive_seed("step", seed, epoch, consumed, ctx.rank))
                    loss, stats = engine(x, y)
                    # stats are host floats already (one sync per micro-batch, inside the objective)
                    check_finite(stats["loss"] if "loss" in stats else stats["ce"], stage=stage, step=step,
                                 last_good=_name(ckpt.last_saved))
                    engine.backward(loss)
                    engine.step()
                    consumed += x.shape[0] * ctx.world_size
                    result.samples += x.shape[0] * ctx.world_size
                    n_batches += 1
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                    bar.update(1)
                step += 1
                epoch_steps += 1
                if epoch_steps % 10 == 1:
                    rate = result.samples / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix({**{k: f"{v / max(n_batches, 1):.4g}" for k, v in sums.items()},
                                     "img/s": f"{rate:.0f}"})
                if max_steps and step >= max_steps:
                    break
                if ckpt_every_steps and step % ckpt_every_steps == 0:
                    snapshot(epoch, consumed)
            bar.close()
            epoch_done = not (max_steps and step >= max_steps) or consumed >= loader_global_size(loader)
            if epoch_done:
                check_readable_classes(loader, ctx)
                history.append({"epoch": epoch + 1, **{k: v / max(n_batches, 1) for k, v in sums.items()}})
                epoch, consumed = epoch + 1, 0
                sums, n_batches = {}, 0
            snapshot(epoch, consumed)
            if max_steps and step >= max_steps:
                break
    result.steps, result.epochs_done, result.history = step, epoch, history
    result.seconds = time.perf_counter() - t0
    return result


def check_readable_classes(loader, ctx) -> None:
    """After an epoch (every rank): a class none of whose images decoded is an error naming it. Each rank
    has seen only its shard, so the ranks pool the files they could not read first (loaders without a
    ``check_classes`` method — in-memory data, FFCV, which checks at conversion — are skipped)."""
    check = getattr(loader, "check_classes", None)
    if check is None:
        return
    if ctx.world_size > 1:
        for skipped in ctx.all_gather_object(sorted(loader.skipped)):
            loader.skipped.update(skipped)
    check()


def _groups(loader, size: int):
    """The loader's batches in lists of ``size`` (the last one shorter)."""
    batches = iter(loader)
    while group := list(itertools.islice(batches, size)):
        yield group


def loader_global_size(loader) -> int:
    sampler = getattr(loader, "sampler", None)
    return getattr(sampler, "global_size", math.inf)


def _name(path) -> str | None:
    return None if path is None else str(path)


@torch.no_grad()
def recalibrate_bn(model, loader, *, batches: int, ctx, device, seed: int) -> int:
    """Precise BN: re-estimate BatchNorm running statistics as a plain average over ``batches`` training
    batches with the final weights (removes the lag of the exponential averages; recover matches these
    statistics, so their accuracy matters). Ranks average their estimates. Returns batches used."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or batches <= 0:
        return 0
    saved = [(m, m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = plain mean over the batches seen
    was_training = model.training
    model.train()
    loader.set_epoch(10**6)  # an order of its own, independent of the training epochs
    used = 0
    for x, _ in loader:
        model(x.to(device, non_blocking=True))
        used += 1
        if used >= batches:
            break
    for m, momentum, training in saved:
        m.momentum = momentum
        if ctx.world_size > 1:
            for buf in (m.running_mean, m.running_var):
                ctx.all_reduce_sum(buf)
                buf.div_(ctx.world_size)
    model.train(was_training)
    return used
