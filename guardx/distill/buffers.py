"""Expert trajectories for MTT and TESLA: N networks trained on real data, parameters kept after every epoch.

    guardx buffers --config configs/tinyimagenet.yaml --config configs/mtt/tinyimagenet_ipc10.yaml
    torchrun --nproc-per-node 8 -m guardx buffers --config ... distributed.backend=ddp

MTT's ``buffer.py`` settings are the defaults: ConvNet (width 128, instance norm), SGD lr 0.01 without
momentum or weight decay, batch 256, 50 epochs, 100 experts, DSA augmentation on every batch, optional ZCA.
The training objective is the run's ``objective`` section: ``plain`` (cross-entropy) gives MTT's experts,
``guard`` gives GUARD(MTT) — the paper's criterion (a distiller whose target is a model trained on real data
can take GUARD in that model's training), applied to every expert.

Work and files (under ``<run>/buffers``):

* expert e runs on rank e % W; its randomness (initialisation, data order, augmentation, the objective's
  own draws) is a function of (run.seed, e, epoch, batch) only, so 2 ranks write the bytes 1 rank writes;
* ``partial/expert_XXXX/epoch_YYYY.pt`` after every epoch (model + optimiser); a rerun resumes the expert
  at its last finished epoch; when the expert is done they become one ``expert_XXXX.pt``
  (``params``: float32 (epochs + 1, P), ``names``, ``shapes``, ``history``) and the folder is removed;
* ``zca.pt`` (buffers.zca) fitted by rank 0 on the training split; ``manifest.json`` last (rank 0).
Every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from guardx.config import Config, dump_config
from guardx.data.zca import ZCA
from guardx.distill.trajectory import (build_augment, build_model, expert_path, input_space, load_real, model_spec,
                                       num_batches)
from guardx.distributed import init_distributed
from guardx.objectives import build_objective
from guardx.paths import layout
from guardx.stage_guard import stage_guard
from guardx.utils.io import load_torch, save_torch, write_json, write_text
from guardx.utils.misc import check_finite, derive_seed, progress, reseed


def stage_dir(cfg: Config) -> Path:
    return layout(cfg).stage("buffers")


def expert_seed(seed: int, expert: int) -> int:
    """The seed of expert ``expert``: the same on whichever rank trains it."""
    return derive_seed("expert", seed, expert)


def my_experts(num_experts: int, rank: int, world_size: int) -> list[int]:
    return list(range(rank, num_experts, world_size))


def _epoch_file(folder: Path, epoch: int) -> Path:
    return folder / f"epoch_{epoch:04d}.pt"


def _last_epoch(folder: Path) -> int:
    found = sorted(int(p.stem.split("_")[1]) for p in folder.glob("epoch_*.pt")) if folder.is_dir() else []
    return found[-1] if found else -1


def train_expert(*, index: int, spec: dict, images: torch.Tensor, labels: torch.Tensor, space, objective,
                 augment, bcfg, seed: int, device, partial_dir: Path, show_progress: bool = False) -> dict:
    """Train expert ``index`` (resuming from ``partial_dir``) and return its trajectory record.

    ``images`` are uint8 pixels on any device; each batch goes to ``device`` and into the input space.
    """
    s = expert_seed(seed, index)
    reseed(derive_seed("init", s))  # the initial weights: a function of the expert alone
    model = build_model(spec).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=bcfg.lr, momentum=bcfg.momentum,
                                weight_decay=bcfg.weight_decay)
    last = _last_epoch(partial_dir)
    history: list[dict] = []
    if last >= 0:
        state = load_torch(_epoch_file(partial_dir, last))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
    else:
        save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": []},
                   _epoch_file(partial_dir, 0))
        last = 0
    model.train()
    n = len(labels)
    bar = progress(range(last, bcfg.epochs), enabled=show_progress, desc=f"expert {index}", unit="epoch")
    for epoch in bar:  # `epoch` epochs are done; this trains epoch + 1
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed("order", s, epoch)))
        sums: dict[str, float] = {}
        for b in range(num_batches(n, bcfg.batch_size)):
            idx = order[b * bcfg.batch_size:(b + 1) * bcfg.batch_size]
            x = space.to_input(images[idx].to(device, non_blocking=True).float().div_(255))
            y = labels[idx].to(device, non_blocking=True)
            if augment is not None:
                x = augment(x, derive_seed("augment", s, epoch, b))
            reseed(derive_seed("step", s, epoch, b))  # the objective's own randomness (e.g. PGD starts)
            loss, stats = objective(model, x, y)
            check_finite(stats.get("loss", stats["ce"]), stage=f"buffers expert {index}", step=epoch,
                         last_good=str(_epoch_file(partial_dir, epoch)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if bcfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), bcfg.grad_clip)
            optimizer.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
        history.append({"epoch": epoch + 1, **{k: v / n for k, v in sums.items()}})
        bar.set_postfix(loss=f"{history[-1].get('loss', history[-1]['ce']):.4g}")
        save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history},
                   _epoch_file(partial_dir, epoch + 1))
    bar.close()
    return consolidate(partial_dir, bcfg.epochs, model, seed=s, index=index, history=history)


def consolidate(partial_dir: Path, epochs: int, model, *, seed: int, index: int, history: list) -> dict:
    """The per-epoch files as one trajectory: row k = the flattened parameters after k epochs."""
    names = [n for n, _ in model.named_parameters()]
    rows = []
    for epoch in range(epochs + 1):
        state = load_torch(_epoch_file(partial_dir, epoch))["model"]
        rows.append(torch.cat([state[n].reshape(-1).float() for n in names]))
    return {"params": torch.stack(rows), "names": names,
            "shapes": [list(p.shape) for _, p in model.named_parameters()],
            "epochs": epochs, "expert": index, "seed": seed, "history": history}


def _prepare_zca(cfg: Config, images: torch.Tensor, out: Path, ctx) -> Path | None:
    if not cfg.buffers.zca:
        return None
    path = out / "zca.pt"
    if ctx.is_main and not path.is_file():
        save_torch(ZCA.fit(images, eps=cfg.buffers.zca_eps, device=ctx.device).to_state(), path)
    ctx.barrier()
    return path  # every rank (rank 0 included) uses the saved float32 transform


def run(cfg: Config) -> Path:
    out = stage_dir(cfg)
    augment = build_augment(cfg.buffers.dsa_strategy)  # first: a missing DSA module fails before any work
    # 1. distributed context (ranks share nothing but the file system and the final barriers)
    ctx = init_distributed(cfg)
    with stage_guard(cfg, "buffers", ctx=ctx) as guard:  # this run owns buffers/ and resumes only its own experts
        if not guard.finished(out / "manifest.json"):
            _train_experts(cfg, ctx, guard, augment)
    return out


def _train_experts(cfg: Config, ctx, guard, augment) -> None:
    out, bcfg = stage_dir(cfg), cfg.buffers
    # 2. the real training split in memory, and the input space (ZCA fitted once, by rank 0)
    resolution = bcfg.resolution or cfg.data.resolution
    images, labels, classes = load_real(cfg.data, "train", resolution=resolution)
    num_classes = cfg.data.num_classes or len(classes)
    zca_file = _prepare_zca(cfg, images, out, ctx)
    space = input_space(cfg.data, zca_file).to(ctx.device)
    # 3. what every expert shares: architecture, objective (plain = MTT; guard = GUARD(MTT))
    spec = model_spec(bcfg, num_classes=num_classes, resolution=resolution)
    objective = build_objective(cfg.objective.name, **cfg.objective.params())
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(dump_config(cfg), out / "config.yaml")
    t0, trained = time.perf_counter(), 0
    show = cfg.run.progress and ctx.is_main
    mine = my_experts(bcfg.num_experts, ctx.rank, ctx.world_size)
    with ctx.on_peer_loss(lambda: "buffers"):
        for e in progress(mine, enabled=show, desc="experts", unit="expert"):
            if expert_path(out, e).is_file():
                continue
            partial = out / "partial" / f"expert_{e:04d}"
            record = train_expert(index=e, spec=spec, images=images, labels=labels, space=space,
                                  objective=objective, augment=augment, bcfg=bcfg, seed=cfg.run.seed,
                                  device=ctx.device, partial_dir=partial, show_progress=show)
            record["objective"] = {"name": cfg.objective.name, **cfg.objective.params()}
            save_torch(record, expert_path(out, e))
            shutil.rmtree(partial, ignore_errors=True)
            trained += 1
        ctx.barrier()
    if ctx.is_main:
        shutil.rmtree(out / "partial", ignore_errors=True)
        write_json({"distiller_input": "expert_trajectories", "num_experts": bcfg.num_experts,
                    "epochs": bcfg.epochs, "experts": [expert_path(out, e).name for e in range(bcfg.num_experts)],
                    "model": spec, "classes": classes, "num_classes": num_classes,
                    "resolution": resolution,
                    "input_space": {"kind": space.kind, "mean": list(cfg.data.mean) if zca_file is None else None,
                                    "std": list(cfg.data.std) if zca_file is None else None,
                                    "zca": zca_file.name if zca_file else None, "zca_eps": bcfg.zca_eps},
                    "objective": {"name": cfg.objective.name, **cfg.objective.params()},
                    "optimizer": {"name": "sgd", "lr": bcfg.lr, "momentum": bcfg.momentum,
                                  "weight_decay": bcfg.weight_decay, "batch_size": bcfg.batch_size},
                    "dsa_strategy": bcfg.dsa_strategy, "seed": cfg.run.seed, "world_size": ctx.world_size,
                    "experts_trained_by_rank0_this_run": trained,
                    "seconds_rank0_this_run": time.perf_counter() - t0, "fingerprint": guard.stamp()},
                   out / "manifest.json")  # last: the "done" mark
    ctx.barrier()
