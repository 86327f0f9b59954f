"""Squeeze: train the teacher on real data with a chosen objective (plain | guard | adv | gradnorm).

    guardx squeeze --config configs/demo.yaml objective.name=guard objective.mode=exact
    torchrun --nproc-per-node 8 -m guardx squeeze --config configs/imagenet1k.yaml distributed.backend=ddp

With ``model.init`` the teacher starts from pretrained weights (``guardx.models.pretrained``): fine-tuned
by the objective, or, with ``squeeze.epochs=0``, taken as it is (SRe2L's ImageNet-1K baseline uses
torchvision's ResNet-18 so), optionally with ``squeeze.bn_recalibrate_batches``.

Writes ``<run>/squeeze/``: ``ckpt/step_*.pt`` (every epoch; resumable), ``teacher.pt`` (final weights +
metadata), ``metrics.json``. Rerunning resumes from the newest checkpoint that loads; a finished stage (a
``teacher.pt`` that loads, with this config's fingerprint) is skipped. The folder is locked while the
stage runs (:mod:`guardx.stage_guard`).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from guardx.config import Config, dump_config
from guardx.data import build_loader
from guardx.distributed import build_engine, init_distributed, per_rank_batch
from guardx.errors import ConfigError
from guardx.loop import fit, recalibrate_bn
from guardx.models import create_model
from guardx.models._io import model_meta, save_model
from guardx.models.pretrained import load_init
from guardx.objectives import ObjectiveStep, build_objective
from guardx.paths import layout
from guardx.stage_guard import stage_guard
from guardx.utils.checkpoint import Checkpointer, require_finite
from guardx.utils.io import write_json, write_text
from guardx.utils.misc import lr_schedule, seed_everything


def run(cfg: Config) -> Path:
    paths = layout(cfg)
    ctx = init_distributed(cfg)
    with stage_guard(cfg, "squeeze", ctx=ctx) as guard:  # this run owns squeeze/ and resumes only its own work
        if not guard.finished(paths.teacher):
            _squeeze(cfg, ctx, guard)
    return paths.teacher


def _squeeze(cfg: Config, ctx, guard) -> None:
    paths = layout(cfg)
    # 1. distributed context (above), then a seed shared by all ranks (same initial weights everywhere)
    seed_everything(cfg.run.seed)
    # 2. data: each rank its own shard of the global batch
    loader = build_loader(cfg.data, "train", ctx.rank, ctx.world_size,
                          batch_size=per_rank_batch(cfg.squeeze.batch_size, ctx.world_size, "squeeze.batch_size",
                                                    cfg.distributed.grad_accum),
                          seed=cfg.run.seed, device=ctx.device)
    num_classes = cfg.data.num_classes or loader.num_classes
    # 3. model from the registry, on its device before the optimiser is built
    model = create_model(cfg.model.name, num_classes=num_classes, width=cfg.model.width,
                         resolution=cfg.data.resolution, mean=cfg.data.mean, std=cfg.data.std)
    init = None
    if cfg.model.init:  # pretrained start: the teacher itself (squeeze.epochs=0) or what the objective fine-tunes
        if cfg.squeeze.epochs == 0 and cfg.objective.name != "plain":
            raise ConfigError(f"squeeze.epochs=0 takes model.init as the teacher unchanged, so objective.name="
                              f"{cfg.objective.name} would never act: set squeeze.epochs > 0 to fine-tune with it")
        init = load_init(model, cfg.model.init, head=cfg.model.init_head, classes=loader.classes,
                         model_name=cfg.model.name, width=cfg.model.width)
    model = model.to(ctx.device)
    objective = build_objective(cfg.objective.name, **cfg.objective.params())
    total_steps = cfg.squeeze.epochs * math.ceil(len(loader) / cfg.distributed.grad_accum)  # optimiser steps
    if cfg.squeeze.max_steps:
        total_steps = min(total_steps, cfg.squeeze.max_steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.squeeze.lr, momentum=cfg.squeeze.momentum,
                                weight_decay=cfg.squeeze.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.squeeze.schedule, total_steps))
    # 4. engine wraps model+objective (the objective's extra passes run inside the wrapped forward)
    engine = build_engine(ObjectiveStep(model, objective), optimizer=optimizer, scheduler=scheduler, cfg=cfg,
                          ctx=ctx, grad_clip=cfg.squeeze.grad_clip, global_batch=cfg.squeeze.batch_size)
    if ctx.is_main:
        write_text(dump_config(cfg), paths.config_file("squeeze"))
    ckpt = Checkpointer(paths.ckpt_dir("squeeze"), keep=cfg.squeeze.keep_checkpoints, ctx=ctx, guard=guard)
    result = fit(engine=engine, loader=loader, epochs=cfg.squeeze.epochs, ckpt=ckpt, ctx=ctx, stage="squeeze",
                 seed=cfg.run.seed, device=ctx.device, show_progress=cfg.run.progress,
                 max_steps=cfg.squeeze.max_steps, ckpt_every_steps=cfg.squeeze.ckpt_every_steps)
    recalibrated = recalibrate_bn(engine.model, loader, batches=cfg.squeeze.bn_recalibrate_batches, ctx=ctx,
                                  device=ctx.device, seed=cfg.run.seed)
    meta = model_meta(cfg, name=cfg.model.name, width=cfg.model.width, num_classes=num_classes,
                      classes=loader.classes)
    meta["objective"] = {"name": cfg.objective.name, **cfg.objective.params()}
    if init is not None:
        meta["init"] = {**init, "epochs": cfg.squeeze.epochs}
    require_finite(engine.model.state_dict(), f"squeeze: the teacher after {result.steps} steps", ckpt)
    if ctx.is_main:
        write_json({"objective": repr(objective), "steps": result.steps, "epochs": result.epochs_done,
                    "seconds_this_run": result.seconds, "samples_this_run": result.samples,
                    "img_per_s": result.samples / result.seconds if result.seconds else None,
                    "bn_recalibrated_batches": recalibrated, "init": init,
                    "skipped_files": sorted(getattr(loader, "skipped", [])), "history": result.history},
                   paths.metrics("squeeze"))
        save_model(paths.teacher, engine.model, meta, fingerprint=guard.stamp())  # last: the "done" mark
    ctx.barrier()
