"""Recover (SRe2L): synthesise images whose BatchNorm statistics in the teacher match the real data's.

    loss = CE(teacher(aug(x)), y) + r_bn · Σ_l m_l (‖μ_l(x) − μ̂_l‖₂ + ‖σ²_l(x) − σ̂²_l‖₂),   m_1 = first_bn_multiplier

optimised with Adam (betas 0.5/0.9, cosine lr) on the images in the teacher's normalised space, with a
random-resized-crop + flip + random roll (jitter) each iteration, then clipped to valid pixels.

Work is a flat list of (ipc index, class) pairs cut into batches ("jobs"); rank r of W takes jobs
r, r+W, ... — no communication, so it scales with the number of ranks. Each job is seeded by its index
(not by the rank), so the images do not depend on the world size. Output is an ImageFolder tree
``<run>/recover/images/<class>/<class>_<ipc>.png``; a job whose PNGs all exist is skipped on rerun.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from guardx.config import Config
from guardx.data.distilled import distilled_manifest, image_path, save_png
from guardx.data.transforms import random_resized_crop_batch
from guardx.distill.cda import scale_schedule
from guardx.distributed import init_distributed
from guardx.errors import GuardxError
from guardx.models import Normalized
from guardx.models._io import load_model
from guardx.paths import layout
from guardx.stage_guard import stage_guard
from guardx.utils.io import write_json
from guardx.utils.misc import cosine_lr, derive_seed, interactive, progress


class BNStatLoss:
    """Forward hooks on every BatchNorm layer: ‖μ(x) − running_mean‖₂ + ‖σ²(x) − running_var‖₂ per layer."""

    def __init__(self, model: nn.Module, first_multiplier: float):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not self.layers:
            raise GuardxError("recover needs a teacher with BatchNorm layers (e.g. resnet18); this one has none")
        self.weights = [first_multiplier] + [1.0] * (len(self.layers) - 1)
        self.terms: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module, inputs, output) -> None:
        x = inputs[0]
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        self.terms.append(torch.linalg.vector_norm(module.running_mean - mean)
                          + torch.linalg.vector_norm(module.running_var - var))

    def pop(self) -> torch.Tensor:
        loss = sum(w * t for w, t in zip(self.weights, self.terms))
        self.terms = []
        return loss

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def plan_jobs(num_classes: int, classes: list[int], ipc: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Batches of (class, ipc_index) pairs, ipc-major like SRe2L (a batch spans many classes)."""
    chosen = classes or list(range(num_classes))
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise GuardxError(f"recover.classes {bad} are outside the teacher's {num_classes} classes")
    pairs = [(c, k) for k in range(ipc) for c in chosen]
    return [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]


def synthesize(teacher: Normalized, targets: torch.Tensor, cfg: Config, *, resolution: int, seed: int,
               show_progress: bool = False, history: list | None = None, scale_at=None) -> torch.Tensor:
    """Optimise one batch of images for ``targets``; returns float images in [0, 1] (pixel space).
    ``history``, if given, receives the loss of every iteration (a host sync per step: tests/analysis only).
    ``scale_at(it) -> (lo, hi)``, if given, sets the crop scale range per iteration (CDA's curriculum,
    :func:`guardx.distill.cda.scale_schedule`); default: ``recover.rrc_scale`` throughout."""
    rc = cfg.recover
    net = teacher.net  # optimise in the normalised space, as the official code does
    device = targets.device
    gen = torch.Generator().manual_seed(seed)
    lo = teacher.normalize(torch.zeros(1, 3, 1, 1, device=device))  # valid-pixel bounds, normalised
    hi = teacher.normalize(torch.ones(1, 3, 1, 1, device=device))
    x = torch.randn((len(targets), 3, resolution, resolution), generator=gen).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=rc.lr, betas=tuple(rc.betas), eps=1e-8)
    bn = BNStatLoss(net, rc.first_bn_multiplier)
    try:
        bar = progress(range(rc.iterations), enabled=show_progress, desc="  iterations", unit="it")
        for it in bar:
            for group in opt.param_groups:
                group["lr"] = rc.lr * cosine_lr(it, rc.iterations)
            scale = rc.rrc_scale if scale_at is None else scale_at(it)
            xj = random_resized_crop_batch(x, resolution, scale, rc.flip, gen)
            if rc.jitter:
                dx, dy = torch.randint(0, rc.jitter + 1, (2,), generator=gen).tolist()
                xj = torch.roll(xj, shifts=(dx, dy), dims=(2, 3))
            ce = F.cross_entropy(net(xj), targets)
            loss = ce + rc.r_bn * bn.pop()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # keep the images inside the valid pixel range
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
            if history is not None:
                history.append(loss.item())
            if it % 50 == 0 or it == rc.iterations - 1:
                bar.set_postfix(loss=f"{loss.item():.3f}", ce=f"{ce.item():.3f}")
        bar.close()
    finally:
        bn.remove()
    return teacher.denormalize(x.detach()).clamp(0, 1)


def run(cfg: Config) -> Path:
    paths = layout(cfg)
    # 1. distributed context; this run owns recover/ and resumes only images made with its settings
    ctx = init_distributed(cfg)
    with stage_guard(cfg, "recover", ctx=ctx) as guard:
        if not guard.finished(paths.manifest("recover")):
            _recover(cfg, ctx, guard)
    return paths.recover_images


def _recover(cfg: Config, ctx, guard) -> None:
    paths = layout(cfg)
    manifest = paths.manifest("recover")
    # 2. the frozen teacher on this rank's device
    teacher, meta = load_model(paths.teacher, ctx.device)
    for p in teacher.parameters():
        p.requires_grad_(False)  # gradients flow to the images only
    classes = meta["classes"]
    # 3. the work: every rank plans the same global job list and takes every W-th job (no communication)
    jobs = plan_jobs(meta["num_classes"], list(cfg.recover.classes), cfg.recover.ipc, cfg.recover.batch_size)
    mine = list(range(ctx.rank, len(jobs), ctx.world_size))
    root = paths.recover_images
    # CDA's curriculum (recover.crop_schedule=cda): the crop's lower scale bound falls over the iterations
    scale_at = scale_schedule(cfg.cda, cfg.recover.iterations) if cfg.recover.crop_schedule == "cda" else None
    t0, n_images, n_done_before = time.perf_counter(), 0, 0
    show = cfg.run.progress and ctx.is_main
    bar = progress(mine, enabled=show, desc="recover jobs", unit="job")
    for j in bar:
        job = jobs[j]
        files = [image_path(root, classes[c], k) for c, k in job]
        if all(p.is_file() for p in files):  # PNGs are written atomically: one on disk is complete
            n_done_before += len(job)
            continue
        targets = torch.tensor([c for c, _ in job], device=ctx.device)
        images = synthesize(teacher, targets, cfg, resolution=meta["resolution"],
                            seed=derive_seed("recover", cfg.run.seed, j), show_progress=show and interactive(),
                            scale_at=scale_at)
        for img, path in zip(images, files):
            save_png(img, path)
        n_images += len(job)
        bar.set_postfix(img_per_s=f"{n_images * cfg.recover.iterations / (time.perf_counter() - t0):.0f}")
    bar.close()
    # one row per rank (images made, images reused, seconds), summed so every rank holds the table
    table = torch.zeros(ctx.world_size, 3, dtype=torch.float64)
    table[ctx.rank] = torch.tensor([n_images, n_done_before, time.perf_counter() - t0], dtype=torch.float64)
    table = ctx.all_reduce_sum(table)
    ctx.barrier()
    if ctx.is_main:
        made, seconds = int(table[:, 0].sum()), table[:, 2].tolist()
        write_json({**distilled_manifest(cfg.run.distiller, "teacher", meta, ipc=cfg.recover.ipc,
                                         images=sum(len(j) for j in jobs)),
                    "jobs": len(jobs), "world_size": ctx.world_size, "iterations": cfg.recover.iterations,
                    "synthesized_this_run": made, "reused": int(table[:, 1].sum()), "rank_seconds": seconds,
                    # image-iterations per second of the slowest rank: the stage's throughput
                    "img_iters_per_s": made * cfg.recover.iterations / max(max(seconds), 1e-9),
                    "fingerprint": guard.stamp()}, manifest)  # last: the "done" mark
    ctx.barrier()
