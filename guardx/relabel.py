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
from guardx.data.distilled import DistilledSet, epoch_plan
from guardx.data.transforms import apply_crop_params
from guardx.distributed import init_distributed
from guardx.models._io import load_model
from guardx.recover import images_dir
from guardx.squeeze import teacher_path
from guardx.utils.io import load_torch, save_torch, write_json
from guardx.utils.misc import progress


def stage_dir(cfg: Config) -> Path:
    return Path(cfg.run.out_dir) / "relabel"


def epoch_file(cfg: Config, epoch: int) -> Path:
    return stage_dir(cfg) / f"epoch_{epoch:04d}.pt"


def plan_for(cfg: Config, distilled: DistilledSet):
    """The epoch → (order, crops) function relabel and train agree on."""
    h, w = distilled.size
    return lambda epoch: epoch_plan(len(distilled), h, w, seed=cfg.run.seed, epoch=epoch,
                                    scale=cfg.relabel.rrc_scale, flip=cfg.relabel.flip)


def compress_logits(logits: torch.Tensor, topk: int) -> dict:
    if topk <= 0 or topk >= logits.shape[1]:
        return {"logits": logits.half()}
    values, index = logits.topk(topk, dim=1)
    index_dtype = torch.int16 if logits.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
    return {"topk_values": values.half(), "topk_index": index.to(index_dtype), "num_classes": logits.shape[1]}


def expand_logits(blob: dict) -> torch.Tensor:
    """Dense float logits; classes outside the stored top-k get -inf (probability 0 at any temperature)."""
    if "logits" in blob:
        return blob["logits"].float()
    values, index = blob["topk_values"].float(), blob["topk_index"].long()
    dense = torch.full((values.shape[0], int(blob["num_classes"])), float("-inf"))
    return dense.scatter_(1, index, values)


def load_epoch_targets(cfg: Config, epoch: int, stored_epochs: int) -> torch.Tensor:
    """Stored logits for train epoch ``epoch`` (cycling when train runs longer than relabel stored)."""
    return expand_logits(load_torch(epoch_file(cfg, epoch % stored_epochs)))


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
    out = stage_dir(cfg)
    manifest = out / "manifest.json"
    if manifest.is_file():
        return out
    ctx = init_distributed(cfg)
    if cfg.relabel.mode == "online":
        if ctx.is_main:
            write_json({"mode": "online"}, manifest)
        ctx.barrier()
        return out
    teacher, meta = load_model(teacher_path(cfg), ctx.device)
    distilled = DistilledSet(images_dir(cfg), meta["classes"])
    plan = plan_for(cfg, distilled)
    mine = [e for e in range(ctx.rank, cfg.relabel.epochs, ctx.world_size) if not epoch_file(cfg, e).is_file()]
    for e in progress(mine, enabled=cfg.run.progress and ctx.is_main, desc="relabel epochs", unit="epoch"):
        order, crops = plan(e)
        logits = label_epoch(teacher, distilled, order, crops, resolution=meta["resolution"],
                             batch_size=cfg.relabel.batch_size, device=ctx.device)
        save_torch({"order": order.to(torch.int32), "crops": crops, **compress_logits(logits, cfg.relabel.topk)},
                   epoch_file(cfg, e))
    ctx.barrier()
    if ctx.is_main:
        write_json({"mode": "store", "epochs": cfg.relabel.epochs, "images": len(distilled),
                    "topk": cfg.relabel.topk, "seed": cfg.run.seed}, manifest)
    ctx.barrier()
    return out
