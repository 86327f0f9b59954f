"""Evaluate: clean and adversarial accuracy of saved models on the test split.

    guardx evaluate --config configs/demo.yaml                   # the run's teacher and student
    guardx evaluate --config C --checkpoint sre2l=a/train/student.pt --checkpoint guard=b/train/student.pt \\
        --attacks pgd100,square,autoattack,cw,mim --eps 1/255 --out results/
    torchrun --nproc-per-node 8 -m guardx evaluate --config C distributed.backend=ddp ...

How the numbers are made (each choice is what the field does, or says why it differs):

* Attacks see images in [0, 1] (the normaliser is inside the model), ε is in pixel units (1/255 means
  what the paper means), and BatchNorm uses running statistics (eval mode).
* A sample misclassified when clean counts as broken under every attack and is not attacked, so robust
  accuracy ≤ clean accuracy by construction. Every bounded attack's output is projected onto the
  ε-ball ∩ [0, 1] before it is counted (a no-op for a correct attack; a warning if it was not).
* CW-L2 is unbounded (the paper exempts it from ε): it is reported once, as ``cw``, the share of samples
  for which CW found no misclassified point at any distance.
* Work is dealt out in fixed global blocks of ``evaluate.batch_size`` samples: rank r of W takes blocks
  r, r+W, ...; each block's attack randomness is seeded by (run.seed, block, metric). A block's result is
  therefore the same whatever the world size, and the summed counts of W ranks equal one rank's
  (tested with 2 gloo ranks). Loaders without block sharding fall back to per-rank seeding
  (reproducible for a fixed world size only; the results record which).
* Resumable: each rank logs finished blocks to ``<out>/.partial/``; a rerun with the same settings
  reuses them (any world size in block mode) and a finished model's json is reused outright.

Writes ``<out>/<label>.json`` per model and ``<out>/results.{md,json,csv}`` (``out`` =
``evaluate.out_dir`` or ``<run>/evaluate``), with every attack setting and the seed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import time
from pathlib import Path

from guardx.attacks.accuracy import BlockLog, evaluate_model
from guardx.attacks.plan import settings
from guardx.config import Config
from guardx.data import build_loader
from guardx.distributed import init_distributed
from guardx.errors import ConfigError, GuardxError
from guardx.models._io import load_model
from guardx.paths import layout
from guardx.report import write_evaluation
from guardx.stage_guard import own_folder
from guardx.utils.env import environment
from guardx.utils.io import read_json, write_json
from guardx.utils.misc import labelled_paths


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "model"


def evaluate_checkpoint(path: Path, cfg: Config, *, label: str) -> dict:
    """Evaluate one saved model; reuses ``<out>/<label>.json`` when its settings and checkpoint match."""
    path = Path(path)
    if not path.is_file():
        raise GuardxError(f"checkpoint not found: {path}")
    out_dir = layout(cfg).evaluate
    out = out_dir / f"{_safe(label)}.json"
    key_settings = {**settings(cfg), "checkpoint": _fingerprint(path)}
    ctx = init_distributed(cfg)
    if out.is_file():
        try:
            previous = read_json(out)
        except (OSError, ValueError):
            previous = {}  # an unreadable cached result is evaluated again
        if previous.get("settings") == key_settings:
            return previous
    model, meta = load_model(path, ctx.device)
    data_cfg = dataclasses.replace(cfg.data, resolution=meta.get("resolution", cfg.data.resolution))
    split = "holdout" if cfg.evaluate.split == "holdout" else "test" if cfg.data.dataset == "digits" else "val"
    loader = build_loader(data_cfg, split, ctx.rank, ctx.world_size, batch_size=cfg.evaluate.batch_size,
                          seed=cfg.run.seed, augment=False, device=ctx.device, max_samples=cfg.evaluate.max_samples,
                          shard_block=True, classes=meta.get("classes"))  # val labels follow the model's classes
    if loader.num_classes != meta.get("num_classes", loader.num_classes):
        raise ConfigError(f"{path} predicts {meta['num_classes']} classes but the {split} split has "
                          f"{loader.num_classes}: point data.* at the data it was trained on")
    digest = hashlib.sha256(json.dumps(key_settings, sort_keys=True).encode()).hexdigest()[:12]
    partial = out_dir / ".partial" / f"{_safe(label)}-{digest}"
    log = BlockLog(partial, ctx.rank)
    ctx.barrier()  # every rank has read the logs before any rank rewrites its own
    t0 = time.perf_counter()
    acc, counts, block_mode, per_sample = evaluate_model(model, loader, cfg, ctx, desc=f"evaluate {label}", log=log)
    seconds = time.perf_counter() - t0
    result = {"label": label, "checkpoint": str(path), "architecture": meta.get("name"), "accuracy": acc,
              "counts": counts, "per_sample": per_sample, "settings": key_settings, "seconds": seconds, "world_size": ctx.world_size,
              "sharding": "block" if block_mode else "per-rank (reproducible for this world size only)",
              "split": split, "resolution": data_cfg.resolution, "device": str(ctx.device),
              "environment": environment(ctx.device)}
    ctx.barrier()  # every rank has flushed its block log before rank 0 replaces it with the result
    if ctx.is_main:
        write_json(result, out)
        shutil.rmtree(partial, ignore_errors=True)
        if partial.parent.is_dir() and not any(partial.parent.iterdir()):
            partial.parent.rmdir()
    ctx.barrier()
    return result


def run(cfg: Config) -> list[dict]:
    """Evaluate ``evaluate.checkpoints``, or else the run's teacher (when ``pipeline.eval_teacher``) and student.

    The results folder is this run's while it runs (a lock; leftovers of killed writes are removed first).
    Nothing to evaluate is an error, not an empty table."""
    paths = layout(cfg)
    if cfg.evaluate.checkpoints:
        todo = [(label, path, None) for label, path in labelled_paths(cfg.evaluate.checkpoints)]
    else:
        wanted = [("teacher", paths.teacher)] if cfg.pipeline.eval_teacher else []
        todo = [(label, path, Path(cfg.run.out_dir).name) for label, path in [*wanted, ("student", paths.student)]
                if path.is_file()]
        if not todo:
            teacher = f"{paths.teacher} nor " if cfg.pipeline.eval_teacher else ""
            raise GuardxError(f"nothing to evaluate: neither {teacher}{paths.student} exists; run the stages that "
                              "write them (guardx pipeline), or name models with --checkpoint / evaluate.checkpoints")
    ctx = init_distributed(cfg)
    rows = []
    with own_folder(paths.evaluate, ctx, recursive=False, also=[paths.evaluate / ".partial"]):
        for label, path, method in todo:
            result = evaluate_checkpoint(path, cfg, label=label)
            if method is None:  # named checkpoints: the label is the method
                rows.append({"method": label, "model": result.get("architecture") or path.stem, **result})
            else:
                rows.append({"method": method, "model": label, **result})
        if ctx.is_main:
            write_evaluation(rows, cfg, paths.evaluate)
    return rows
