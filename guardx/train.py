"""Train: a student on the distilled set, matching the teacher's soft labels (KL with temperature).

    guardx train --config configs/demo.yaml

Replays relabel's stored crops and logits epoch by epoch (store mode) or lets the teacher label each
batch (online mode). AdamW with a cosine schedule; the same resumable loop as squeeze. Writes
``<run>/train/student.pt`` and ``metrics.json``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from guardx.config import Config, dump_config
from guardx.data import TorchLoader
from guardx.data.distilled import DistilledSet, ReplayDataset
from guardx.distributed import build_engine, init_distributed
from guardx.loop import fit
from guardx.models import create_model
from guardx.models._io import load_model, model_meta, save_model
from guardx.objectives import ObjectiveStep
from guardx.objectives.kd import SoftLabelKD
from guardx.recover import images_dir
from guardx.relabel import load_epoch_targets, plan_for, stage_dir as relabel_dir
from guardx.squeeze import per_rank_batch, teacher_path
from guardx.utils.checkpoint import Checkpointer
from guardx.utils.io import write_json, write_text
from guardx.utils.misc import cosine_lr, seed_everything


def stage_dir(cfg: Config) -> Path:
    return Path(cfg.run.out_dir) / "train"


def student_path(cfg: Config) -> Path:
    return stage_dir(cfg) / "student.pt"


def run(cfg: Config) -> Path:
    out = stage_dir(cfg)
    if student_path(cfg).is_file():
        return student_path(cfg)
    ctx = init_distributed(cfg)
    seed_everything(cfg.run.seed)
    teacher, tmeta = load_model(teacher_path(cfg), ctx.device)
    distilled = DistilledSet(images_dir(cfg), tmeta["classes"])
    relabel_manifest = json.loads((relabel_dir(cfg) / "manifest.json").read_text())
    online = relabel_manifest["mode"] == "online"
    targets_fn = None if online else (lambda e: load_epoch_targets(cfg, e, relabel_manifest["epochs"]))
    dataset = ReplayDataset(distilled, resolution=tmeta["resolution"], plan_fn=plan_for(cfg, distilled),
                            targets_fn=targets_fn)
    workers = 0 if distilled._cache is not None else cfg.data.workers  # cached sets crop fast in-process
    micro_batch = per_rank_batch(cfg.train.batch_size, ctx.world_size, "train.batch_size", cfg.distributed.grad_accum)
    loader = TorchLoader(dataset, batch_size=micro_batch,
                         rank=ctx.rank, world_size=ctx.world_size, seed=cfg.run.seed, train=True, shuffle=False,
                         workers=workers)  # the epoch plan already shuffles
    name = cfg.train.model or cfg.model.name
    width = cfg.train.width or cfg.model.width
    student = create_model(name, num_classes=tmeta["num_classes"], width=width, resolution=tmeta["resolution"],
                           mean=tmeta["mean"], std=tmeta["std"]).to(ctx.device)
    objective = SoftLabelKD(cfg.train.temperature, teacher=teacher if online else None)
    total_steps = cfg.train.epochs * math.ceil(len(loader) / cfg.distributed.grad_accum)  # optimiser steps
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, total_steps))
    engine = build_engine(ObjectiveStep(student, objective), optimizer=optimizer, scheduler=scheduler, cfg=cfg,
                          ctx=ctx, global_batch=cfg.train.batch_size)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(dump_config(cfg), out / "config.yaml")
    ckpt = Checkpointer(out / "ckpt", keep=cfg.train.keep_checkpoints, ctx=ctx)
    result = fit(engine=engine, loader=loader, epochs=cfg.train.epochs, ckpt=ckpt, ctx=ctx, stage="train",
                 seed=cfg.run.seed, device=ctx.device, show_progress=cfg.run.progress)
    if ctx.is_main:
        meta = model_meta(cfg, name=name, width=width, num_classes=tmeta["num_classes"], classes=tmeta["classes"])
        meta["resolution"] = tmeta["resolution"]
        write_json({"objective": repr(objective), "steps": result.steps, "epochs": result.epochs_done,
                    "distilled_images": len(distilled), "seconds_this_run": result.seconds,
                    "history": result.history}, out / "metrics.json")
        save_model(student_path(cfg), engine.model, meta)
    ctx.barrier()
    return student_path(cfg)
