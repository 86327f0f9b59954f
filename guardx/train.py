"""Train: a student on a distilled set — any distiller's — as its manifest says its labels are used.

    guardx train --config configs/demo.yaml

* ``labels: teacher`` (SRe2L, CDA): KL to the teacher's soft labels with temperature, on the exact crops
  relabel stored (store mode), or with the teacher labelling each batch (``relabel.mode=online``);
* ``labels: hard`` (DC, MTT): cross-entropy on each image's class, with ``train.augment``;
* ``labels: soft`` (TESLA): KL to the one stored logit vector per image, with ``train.augment``.

The optimiser (``train.optimizer``: AdamW as SRe2L, SGD as DC/MTT's evaluation) and its per-step schedule
come from ``train.*``; the loop is the one squeeze uses (resumable at any step). Writes
``<run>/train/student.pt`` and ``metrics.json``.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from guardx.config import Config, dump_config
from guardx.data import TorchLoader
from guardx.data.zca import ZCA
from guardx.data.distilled import DistilledSet, LabelledSet, ReplayDataset, crop_plan, expand_logits
from guardx.distributed import build_engine, init_distributed, per_rank_batch
from guardx.errors import DataError, GuardxError
from guardx.loop import fit
from guardx.models import create_model
from guardx.models._io import load_model, model_meta, save_model
from guardx.objectives import ObjectiveStep, build_objective
from guardx.objectives.kd import SoftLabelKD
from guardx.paths import RunLayout, layout
from guardx.stage_guard import stage_guard
from guardx.utils.checkpoint import Checkpointer, require_finite
from guardx.utils.io import load_torch, read_json, write_json, write_text
from guardx.utils.misc import lr_schedule, seed_everything


def _read_manifest(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DataError(f"{what} not found: {path} (run the stage that writes it first)")
    return read_json(path)


def student_recipe(cfg: Config, manifest: dict) -> Config:
    """``cfg`` with ``train.*`` set from the set's ``student`` recipe (``train.recipe=auto``): how the
    distiller's authors train a student on their sets (e.g. MTT: SGD at the learned lr, step decay)."""
    recipe = manifest.get("student") if cfg.train.recipe == "auto" else None
    if not recipe:
        return cfg
    keys = ("optimizer", "lr", "momentum", "weight_decay", "epochs", "batch_size", "augment", "dsa_strategy")
    values = {k: recipe[k] for k in keys if k in recipe}
    if manifest.get("model") and not cfg.train.model:  # the architecture the set was distilled with
        values.update(model=manifest["model"]["name"], width=manifest["model"]["width"])
    if "lr_decay" in recipe:  # x factor from a given epoch: guardx's step schedule (x0.1 at half the steps)
        values["schedule"] = "step"
    if recipe.get("loss") == "soft_ce":  # cross-entropy to softmax(stored logits) = KL at temperature 1
        values["temperature"] = 1.0
    return cfg.with_overrides({"train": values})


def training_data(cfg: Config, paths: RunLayout, manifest: dict, device):
    """``(dataset, objective)`` for the set's kind of labels (see the module docstring)."""
    distilled = DistilledSet(paths.distilled_images, manifest["classes"])
    if manifest.get("exact_tensors"):  # float pixels the PNGs can only approximate
        exact = load_torch(paths.distilled / manifest["exact_tensors"])
        distilled.use_exact(exact["images"], exact["paths"], paths.distilled)
    resolution = manifest["resolution"]
    if manifest["labels"] == "teacher":
        relabel = _read_manifest(paths.manifest("relabel"), "relabel manifest")
        online = relabel["mode"] == "online"
        teacher = load_model(paths.teacher, device)[0] if online else None

        def targets(epoch: int) -> torch.Tensor:  # stored epochs are reused cyclically
            path = paths.relabel_epoch(epoch % relabel["epochs"])
            try:
                return expand_logits(load_torch(path))
            except (GuardxError, FileNotFoundError) as e:
                raise DataError(f"{e}: delete it (and relabel/manifest.json) and rerun guardx relabel") from None

        dataset = ReplayDataset(distilled, resolution=resolution, plan_fn=crop_plan(cfg, distilled),
                                targets_fn=None if online else targets)
        return dataset, SoftLabelKD(cfg.train.temperature, teacher=teacher)
    crops = cfg.train.augment in ("auto", "crops")
    if manifest["labels"] == "hard":
        return LabelledSet(distilled, distilled.labels, resolution=resolution, augment=crops,
                           scale=cfg.relabel.rrc_scale, flip=cfg.relabel.flip), _augmented(cfg, build_objective("plain"))
    soft = load_torch(paths.distilled / manifest["soft_labels"])  # paths relative to the set's folder
    by_path = dict(zip(soft["paths"], soft["logits"]))
    rel = [Path(p).relative_to(paths.distilled).as_posix() for p in distilled.paths]
    missing = [r for r in rel if r not in by_path]
    if missing:
        raise DataError(f"{paths.distilled / manifest['soft_labels']} has no soft label for {missing[0]}")
    logits = torch.stack([torch.as_tensor(by_path[r]).float() for r in rel])
    return LabelledSet(distilled, logits, resolution=resolution, augment=crops, scale=cfg.relabel.rrc_scale,
                       flip=cfg.relabel.flip), _augmented(cfg, SoftLabelKD(cfg.train.temperature))


class DSAObjective:
    """``objective`` on a DSA-augmented batch (``train.augment=dsa``): one random transform per batch, its seed
    drawn from the generator the training loop reseeds at every step (so a resumed run draws the same)."""

    backward_in_forward = None

    def __init__(self, objective, dsa):
        self.objective, self.dsa = objective, dsa

    def __repr__(self) -> str:
        return f"DSA({self.objective!r})"

    def __call__(self, model, x, targets):
        seed = int(torch.randint(0, 2**62, (1,)))
        return self.objective(model, self.dsa(x, seed, per_sample=True), targets)  # DC/MTT train: per image


def _augmented(cfg: Config, objective):
    if cfg.train.augment != "dsa":
        return objective
    from guardx.errors import ConfigError

    try:
        from guardx.data.dsa import DSA
    except ImportError:
        raise ConfigError("train.augment=dsa needs guardx.data.dsa, which this checkout lacks; "
                          "set train.augment=crops or none") from None
    return DSAObjective(objective, DSA(strategy=cfg.train.dsa_strategy))


def run(cfg: Config) -> Path:
    paths = layout(cfg)
    ctx = init_distributed(cfg)
    with stage_guard(cfg, "train", ctx=ctx) as guard:  # this run owns train/ and resumes only its own work
        if not guard.finished(paths.student):
            _train(cfg, ctx, guard)
    return paths.student


def _train(cfg: Config, ctx, guard) -> None:
    paths = layout(cfg)
    # 1. distributed context (above), then a seed shared by all ranks (same initial weights everywhere)
    seed_everything(cfg.run.seed)
    # 2. data: the distilled set with its labels, each rank its shard of the global batch
    manifest = _read_manifest(paths.distilled_manifest, "distilled set manifest")
    cfg = student_recipe(cfg, manifest)
    dataset, objective = training_data(cfg, paths, manifest, ctx.device)
    workers = 0 if dataset.distilled.cached else cfg.data.workers  # cached sets crop fast in-process
    micro_batch = per_rank_batch(cfg.train.batch_size, ctx.world_size, "train.batch_size", cfg.distributed.grad_accum)
    # the epoch plan (teacher labels) or the sampler's seeded permutation shuffles
    loader = TorchLoader(dataset, batch_size=micro_batch, rank=ctx.rank, world_size=ctx.world_size,
                         seed=cfg.run.seed, train=True, shuffle=manifest["labels"] != "teacher", workers=workers)
    # 3. the student from the registry, on its device before the optimiser is built
    name = cfg.train.model or cfg.model.name
    width = cfg.train.width or cfg.model.width
    whiten = ZCA.from_state(load_torch(paths.distilled / manifest["zca"])) if manifest.get("zca") else None
    spec = manifest.get("model") or {}
    depth = spec.get("depth") if spec.get("name") == name else None  # e.g. an explicit ConvNet depth
    student = create_model(name, num_classes=manifest["num_classes"], width=width, resolution=manifest["resolution"],
                           mean=manifest["mean"], std=manifest["std"], whiten=whiten, depth=depth).to(ctx.device)
    total_steps = cfg.train.epochs * math.ceil(len(loader) / cfg.distributed.grad_accum)  # optimiser steps
    if cfg.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(student.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                    weight_decay=cfg.train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.train.schedule, total_steps))
    # 4. engine wraps student + loss; the loop is squeeze's
    engine = build_engine(ObjectiveStep(student, objective), optimizer=optimizer, scheduler=scheduler, cfg=cfg,
                          ctx=ctx, global_batch=cfg.train.batch_size)
    if ctx.is_main:
        write_text(dump_config(cfg), paths.config_file("train"))
    ckpt = Checkpointer(paths.ckpt_dir("train"), keep=cfg.train.keep_checkpoints, ctx=ctx, guard=guard)
    result = fit(engine=engine, loader=loader, epochs=cfg.train.epochs, ckpt=ckpt, ctx=ctx, stage="train",
                 seed=cfg.run.seed, device=ctx.device, show_progress=cfg.run.progress)
    require_finite(engine.model.state_dict(), f"train: the student after {result.steps} steps", ckpt)
    if ctx.is_main:
        meta = model_meta(cfg, name=name, width=width, num_classes=manifest["num_classes"],
                          classes=manifest["classes"])
        meta.update(resolution=manifest["resolution"], mean=manifest["mean"], std=manifest["std"])
        if whiten is not None:
            meta["zca"] = {"shape": list(whiten.shape), "eps": whiten.eps}
        if depth is not None:
            meta["depth"] = depth
        write_json({"objective": repr(objective), "labels": manifest["labels"], "steps": result.steps,
                    "epochs": result.epochs_done, "distilled_images": len(dataset), "seconds_this_run": result.seconds,
                    "history": result.history}, paths.metrics("train"))
        save_model(paths.student, engine.model, meta, fingerprint=guard.stamp())  # last: the "done" mark
    ctx.barrier()
