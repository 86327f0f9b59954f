"""Clean and robust accuracy of one model over a loader, in resumable, world-size-independent blocks.

Work is dealt out in fixed global blocks of ``evaluate.batch_size`` samples: rank r of W takes blocks
r, r+W, ...; each block's attack randomness is seeded by (run.seed, block, metric), so a block's result is
the same whatever the world size and the summed counts of W ranks equal one rank's. A sample
misclassified when clean counts as broken under every attack and is not attacked, and every bounded
attack's output is projected onto the ε-ball ∩ [0, 1] before it is counted.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from guardx.attacks import run_attack
from guardx.attacks.plan import Job, jobs
from guardx.models.fold import folded_for_inference
from guardx.utils.io import read_json, write_json
from guardx.utils.misc import derive_seed, progress


BLOCK_LOG_EVERY_S = 30.0  # how often a rank rewrites its log of finished blocks


def pack_bits(flags: torch.Tensor) -> str:
    """Bool vector → hex string (8 samples per byte): per-sample results stay small in JSON."""
    return np.packbits(flags.cpu().numpy().astype(bool)).tobytes().hex()


def unpack_bits(text: str, n: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool))


class BlockLog:
    """Finished blocks' results (counts and per-sample bits), so an interrupted evaluation resumes. Each rank rewrites (atomically) its
    own ``rank<r>.json``; on start every rank reads all of them, so a rerun on another world size still
    reuses them (block keys are global in block mode)."""

    def __init__(self, folder: Path | None, rank: int, every_s: float | None = None):
        self.folder, self.rank = folder, rank
        self.every_s = BLOCK_LOG_EVERY_S if every_s is None else every_s
        self.done: dict[str, dict] = {}
        self.mine: dict[str, dict] = {}
        self._last = time.monotonic()
        if folder is not None and folder.is_dir():
            for f in sorted(folder.glob("rank*.json")):
                try:
                    self.done.update(read_json(f))
                except (OSError, ValueError):
                    pass  # a log from a crashed writer is only a cache

    def add(self, key: str, block: dict) -> None:
        self.mine[key] = block
        if self.folder is not None and time.monotonic() - self._last > self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.folder is not None and self.mine:
            write_json(self.mine, self.folder / f"rank{self.rank}.json")
            self._last = time.monotonic()


def evaluate_model(model, loader, cfg, ctx, *, desc: str = "evaluate",
                   log: BlockLog | None = None) -> tuple[dict, dict, bool, dict | None]:
    """``(accuracy % per metric with "n", counts per metric, block_mode, per_sample)`` over all ranks' blocks.

    ``per_sample`` (block mode only, else None) maps each metric to a hex bit string over the evaluated
    samples in split order (bit i: sample i counted correct), for paired statistics between models."""
    model.eval()
    if cfg.evaluate.fold_bn:  # BatchNorm on running statistics is an affine map: fold it away once
        model = folded_for_inference(model)
    todo = jobs(cfg)
    names = ["clean"] + [j.metric for j in todo]
    block_mode = getattr(loader, "shard_block", 0) == cfg.evaluate.batch_size
    log = log or BlockLog(None, ctx.rank)
    totals = torch.zeros(len(names) + 1, dtype=torch.float64)  # [n, clean, metric...]
    warned: set[str] = set()
    bar = progress(loader, enabled=cfg.run.progress and ctx.is_main, total=len(loader), desc=desc, unit="batch")
    t0, seen = time.perf_counter(), 0
    for k, (x, y) in enumerate(bar):
        key = str(ctx.rank + k * ctx.world_size) if block_mode else f"w{ctx.world_size}r{ctx.rank}b{k}"
        if key in log.done:
            block = log.done[key]
        elif len(y) == 0:
            block = {"counts": [0] * (len(names) + 1), "bits": {m: "" for m in names}}
        else:
            block = _evaluate_block(model, x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True),
                                    todo, seed=cfg.run.seed, key=key, warned=warned)
        log.add(key, block)
        counts = block["counts"]
        totals += torch.tensor(counts, dtype=torch.float64)
        seen += len(y)
        n = max(totals[0].item(), 1)
        bar.set_postfix({"img/s": f"{seen / (time.perf_counter() - t0):.1f}",
                         **{m: f"{100 * c / n:.1f}" for m, c in zip(names, totals[1:].tolist())}})
    bar.close()
    log.flush()
    summed = ctx.all_reduce_sum(totals.to(ctx.device)).cpu()
    n = int(summed[0])
    counts = {m: int(c) for m, c in zip(names, summed[1:].tolist())}
    per_sample = _gather_bits(log.mine, names, ctx) if block_mode else None
    return {"n": n, **{m: 100.0 * c / max(n, 1) for m, c in counts.items()}}, counts, block_mode, per_sample


def _gather_bits(mine: dict, names: list[str], ctx) -> dict:
    """Every rank's blocks' bits, concatenated in global block order (block keys are global positions)."""
    blocks = {}
    for part in ctx.all_gather_object(mine):
        blocks.update(part)
    ordered = [blocks[k] for k in sorted(blocks, key=int)]
    out = {}
    for m in names:
        flags = [unpack_bits(b["bits"][m], b["counts"][0]) for b in ordered if b["counts"][0]]
        out[m] = pack_bits(torch.cat(flags)) if flags else ""
    return out


def _evaluate_block(model, x, y, todo: list[Job], *, seed: int, key: str, warned: set) -> dict:
    """``{"counts": [n, clean, metric...], "bits": {metric: hex per sample}}`` for one block."""
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    flags = {"clean": clean_ok}
    # a sample misclassified when clean counts as broken under every attack: attack only the rest
    xs, ys = x[clean_ok], y[clean_ok]
    for job in todo:
        robust = torch.zeros_like(clean_ok)
        if len(ys):
            x_adv = run_attack(job.attack, model, xs, ys, job.eps, seed=derive_seed(seed, key, job.metric),
                               **job.params)
            x_adv = _admissible(x_adv, xs, job, warned)
            with torch.no_grad():
                robust[clean_ok] = model(x_adv).argmax(1) == ys
        flags[job.metric] = robust
    # one host sync per block and metric, nothing per step
    return {"counts": [len(y), *(int(f.sum()) for f in flags.values())],
            "bits": {m: pack_bits(f) for m, f in flags.items()}}


def _admissible(x_adv: torch.Tensor, x: torch.Tensor, job: Job, warned: set) -> torch.Tensor:
    """Project onto the threat model (ε-ball ∩ [0, 1]) so that a faulty attack can never overstate its success."""
    finite = torch.isfinite(x_adv)
    x_adv = torch.where(finite, x_adv.detach(), x)
    bad = (x_adv < 0).flatten(1).any(1) | (x_adv > 1).flatten(1).any(1) | ~finite.flatten(1).all(1)
    if job.eps is not None:
        bad |= (x_adv - x).abs().flatten(1).amax(1) > job.eps + 1e-5
        x_adv = torch.min(torch.max(x_adv, x - job.eps), x + job.eps)
    x_adv = x_adv.clamp(0, 1)
    if bad.any() and job.metric not in warned:
        warned.add(job.metric)
        warnings.warn(f"{job.metric}: the attack returned {int(bad.sum())} point(s) outside the ε-ball or [0, 1]; "
                      "projected before counting", stacklevel=2)
    return x_adv
