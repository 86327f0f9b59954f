"""Relabel (SRe2L/FKD): the teacher's soft labels on random crops of the distilled images.

For each epoch e (rank r of W takes epochs r, r+W, ...) the epoch plan — image order plus one
random-resized crop + flip per position, a pure function of (seed, e) — is labelled by the teacher and
stored as ``<run>/relabel/epoch_XXXX.pt``: ``order`` (int32), ``crops`` (int16, top/left/h/w/flip) and
the logits as fp16 (all classes, or the top-k with int16/int32 indices). Train replays the exact crops.
No torchvision internals are patched: the crop parameters come from our own seeded sampler.

``relabel.mode=online`` stores nothing: train runs the teacher on each batch instead.
"""
from __future__ import annotations

from pathlib import Path

import torch

from guardx.config import Config
from guardx.data.distilled import DistilledSet, compress_logits, crop_plan
from guardx.data.transforms import apply_crop_params
from guardx.distributed import init_distributed
from guardx.models._io import load_model
from guardx.paths import layout
from guardx.stage_guard import stage_guard
from guardx.utils.io import save_torch, write_json
from guardx.utils.misc import progress


@torch.no_grad()
def label_epoch(teacher, distilled: DistilledSet, order, crops, *, resolution: int, batch_size: int,
                device) -> torch.Tensor:
    out = []
    for s in range(0, len(order), batch_size):
        batch = torch.stack([apply_crop_params(distilled.image(int(i)), c, resolution)
                             for i, c in zip(order[s:s + batch_size], crops[s:s + batch_size])])
        out.append(teacher(batch.to(device)).float().cpu())
    return torch.cat(out)


def run(cfg: Config) -> Path:
    paths = layout(cfg)
    ctx = init_distributed(cfg)
    with stage_guard(cfg, "relabel", ctx=ctx) as guard:  # this run owns relabel/, resumes only its own epochs
        if not guard.finished(paths.manifest("relabel")):
            _relabel(cfg, ctx, guard)
    return paths.stage("relabel")


def _relabel(cfg: Config, ctx, guard) -> None:
    paths = layout(cfg)
    manifest = paths.manifest("relabel")
    if cfg.relabel.mode == "online":
        if ctx.is_main:
            write_json({"mode": "online", "fingerprint": guard.stamp()}, manifest)
        ctx.barrier()
        return
    # 1. the frozen teacher and the distilled set; 2. rank r labels epochs r, r+W, ... not yet on disk
    teacher, meta = load_model(paths.teacher, ctx.device)
    distilled = DistilledSet(paths.distilled_images, meta["classes"])
    plan = crop_plan(cfg, distilled)
    mine = [e for e in range(ctx.rank, cfg.relabel.epochs, ctx.world_size) if not paths.relabel_epoch(e).is_file()]
    for e in progress(mine, enabled=cfg.run.progress and ctx.is_main, desc="relabel epochs", unit="epoch"):
        order, crops = plan(e)
        logits = label_epoch(teacher, distilled, order, crops, resolution=meta["resolution"],
                             batch_size=cfg.relabel.batch_size, device=ctx.device)
        save_torch({"order": order.to(torch.int32), "crops": crops, **compress_logits(logits, cfg.relabel.topk)},
                   paths.relabel_epoch(e))
    ctx.barrier()
    if ctx.is_main:
        write_json({"mode": "store", "epochs": cfg.relabel.epochs, "images": len(distilled),
                    "topk": cfg.relabel.topk, "seed": cfg.run.seed, "fingerprint": guard.stamp()}, manifest)
    ctx.barrier()
