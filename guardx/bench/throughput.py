"""Stage throughput through the real code paths: squeeze step, recover, loader, the whole pipeline.

    guardx bench throughput                                   # tiny built-in demo settings (CPU-sized)
    guardx bench throughput --config configs/demo.yaml --what squeeze,recover,loader
    guardx bench throughput --config configs/imagenet1k.yaml data.train_dir=/data/train --what loader

* squeeze — img/s of the fixed-batch squeeze step (``guardx.bench.measure.fixed_batch_step``: forward
  with the configured objective, backward, SGD step) through the squeeze stage's own engine
  (``build_engine``), one fixed batch of ``squeeze.batch_size`` images at ``data.resolution`` already on
  the device (no loader);
* recover — image-iterations/s of :func:`guardx.recover.synthesize` (the recover stage's inner loop,
  one batch of ``recover.batch_size`` images, ``--iters`` optimisation steps) on a freshly initialised
  teacher built from ``model.*`` (cost does not depend on the teacher's weights);
* loader — img/s of :func:`guardx.data.build_loader` for the training split with the configured
  backend, batches moved to the device (epochs restart as needed);
* e2e — wall seconds of :func:`guardx.pipeline.run` on the config (per stage and total), in a
  temporary run directory.

Each of squeeze/recover/loader: warm-up, then ``--repeats`` timed blocks, mean ± sample std.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import torch

from guardx.bench.measure import (Timer, device_tag, environment, fixed_batch_step, resolve_device, save_result,
                                  summary, synchronize, timed_blocks)
from guardx.errors import GuardxError

PARTS = ("squeeze", "recover", "loader", "e2e")

# Used when no --config is given: the demo's data and model, cut to seconds per stage.
TINY_DEMO = [
    "data.dataset=digits", "data.resolution=32", "data.rrc_scale=[0.5,1.0]", "data.flip=false",
    "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "model.name=resnet18_small", "model.width=8",
    "squeeze.epochs=1", "squeeze.batch_size=32", "squeeze.max_steps=10", "squeeze.grad_clip=10.0",
    "recover.iterations=20", "recover.ipc=2", "recover.batch_size=20", "recover.jitter=4",
    "relabel.epochs=2", "train.epochs=2", "train.batch_size=20",
    "evaluate.pgd_steps=5", "evaluate.max_samples=40", "evaluate.batch_size=40", "evaluate.eps=[1/255]",
    "pipeline.methods=[{name: sre2l, objective: {name: plain}}, {name: guard, objective: {name: guard}}]",
    "run.progress=false",
]


def parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise GuardxError(f"--what takes a comma-separated subset of {','.join(PARTS)}; got {text!r}")
    return parts


def _model(cfg, num_classes: int, device: torch.device):
    from guardx.models import create_model

    torch.manual_seed(cfg.run.seed)
    return create_model(cfg.model.name, num_classes=num_classes, width=cfg.model.width,
                        resolution=cfg.data.resolution, mean=cfg.data.mean, std=cfg.data.std).to(device)


def squeeze_throughput(cfg, device, *, warmup: int, repeats: int, iters: int, num_classes: int) -> dict:
    from guardx.distributed import build_engine, init_distributed
    from guardx.objectives import build_objective

    objective = build_objective(cfg.objective.name, **cfg.objective.params())
    bs, res = cfg.squeeze.batch_size, cfg.data.resolution

    def engine(step_module, optimizer):  # the squeeze stage's engine
        return build_engine(step_module, optimizer=optimizer, cfg=cfg, ctx=init_distributed(cfg),
                            grad_clip=cfg.squeeze.grad_clip, global_batch=bs)

    step = fixed_batch_step(objective, model=cfg.model.name, num_classes=num_classes, width=cfg.model.width,
                            batch_size=bs, resolution=res, device=device, mean=cfg.data.mean, std=cfg.data.std,
                            seed=cfg.run.seed, momentum=cfg.squeeze.momentum,
                            weight_decay=cfg.squeeze.weight_decay, build_engine=engine)
    times = timed_blocks(step, device, warmup=warmup, repeats=repeats, iters=iters)
    rates = [bs / t for t in times]
    return {"what": f"squeeze step ({objective!r}, {cfg.distributed.precision}), fixed batch {bs} at {res} px",
            "unit": "img/s",
            "per_repeat": rates, **summary(rates), "s_per_iter": times}


def recover_throughput(cfg, device, *, warmup: int, repeats: int, iters: int, num_classes: int) -> dict:
    from guardx.recover import synthesize

    teacher = _model(cfg, num_classes, device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    n = cfg.recover.batch_size
    targets = (torch.arange(n) % num_classes).to(device)

    def run_iters(k: int, seed: int) -> float:
        c = dataclasses.replace(cfg, recover=dataclasses.replace(cfg.recover, iterations=k))
        timer = Timer(device)
        timer.start()
        synthesize(teacher, targets, c, resolution=cfg.data.resolution, seed=seed)
        return timer.stop()

    if warmup:
        run_iters(warmup, seed=0)
    synchronize(device)
    rates = [n * iters / run_iters(iters, seed=r + 1) for r in range(repeats)]
    return {"what": f"recover.synthesize, batch {n} at {cfg.data.resolution} px, {iters} iterations per repeat",
            "unit": "image-iterations/s", "per_repeat": rates, **summary(rates)}


def loader_throughput(cfg, device, *, warmup: int, repeats: int, iters: int) -> dict:
    from guardx.data import build_loader

    loader = build_loader(cfg.data, "train", 0, 1, batch_size=cfg.squeeze.batch_size, seed=cfg.run.seed,
                          device=device)
    state = {"epoch": 0, "it": None}

    def next_batch():
        while True:
            if state["it"] is None:
                loader.set_epoch(state["epoch"])
                state["it"] = iter(loader)
            try:
                return next(state["it"])
            except StopIteration:
                state["epoch"] += 1
                state["it"] = None

    def take(k: int) -> int:
        images = 0
        for _ in range(k):
            x, y = next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            images += len(y)
        return images

    take(warmup)  # worker start-up and first-epoch set-up are excluded
    synchronize(device)
    rates = []
    for _ in range(repeats):
        timer = Timer(device)
        timer.start()
        images = take(iters)
        rates.append(images / timer.stop())
    backend = "digits (in memory)" if cfg.data.dataset == "digits" else cfg.data.backend
    return {"what": f"build_loader train split, backend {backend}, batch {cfg.squeeze.batch_size} at "
                    f"{cfg.data.resolution} px, {iters} batches per repeat, to {device}",
            "unit": "img/s", "per_repeat": rates, **summary(rates)}


def e2e_seconds(cfg, keep_dir: str | None) -> dict:
    from guardx import pipeline

    out = Path(keep_dir) if keep_dir else Path(tempfile.mkdtemp(prefix="guardx-bench-e2e-"))
    cfg.run.out_dir = str(out)
    t0 = time.perf_counter()
    try:
        report = pipeline.run(cfg)
    finally:
        if not keep_dir:
            shutil.rmtree(out, ignore_errors=True)
    return {"what": f"guardx.pipeline.run: {len(cfg.pipeline.methods)} method(s) × stages "
                    f"{','.join(cfg.pipeline.stages)}", "unit": "s", "seconds": time.perf_counter() - t0,
            "stage_seconds": report["stage_seconds"]}


def _measure_parts(args, cfg, overrides: list[str], parts: list[str], device, num_classes: int, progress) -> dict:
    from guardx.config import load_config

    results, kw = {}, dict(warmup=args.warmup, repeats=args.repeats, iters=args.iters)
    for part in parts:
        progress(f"  measuring {part} ...")
        if part == "squeeze":
            results[part] = squeeze_throughput(cfg, device, num_classes=num_classes, **kw)
        elif part == "recover":
            results[part] = recover_throughput(cfg, device, num_classes=num_classes, **kw)
        elif part == "loader":
            results[part] = loader_throughput(cfg, device, **kw)
        else:  # a fresh config: the pipeline writes into cfg.run.out_dir
            e2e_cfg = load_config(args.config or None, overrides + [f"run.device={device.type}"])
            results[part] = e2e_seconds(e2e_cfg, args.keep_e2e)
    return results


def run_throughput(args, progress=print) -> dict:
    from guardx.config import load_config
    from guardx.distributed import finalize
    from guardx.kernels import kernel_backend

    for key in ("repeats", "iters"):
        if getattr(args, key) < 1:
            raise GuardxError(f"--{key} must be >= 1, got {getattr(args, key)}")
    parts = parse_parts(args.what)
    overrides = ([] if args.config else list(TINY_DEMO)) + list(args.overrides)
    cfg = load_config(args.config or None, overrides)
    device = resolve_device(args.device)
    cfg.run.device = device.type
    num_classes = cfg.data.num_classes or (10 if cfg.data.dataset == "digits" else 1000)
    threads = torch.get_num_threads()
    with kernel_backend(args.kernels):
        try:
            if args.threads:
                torch.set_num_threads(args.threads)
            results = _measure_parts(args, cfg, overrides, parts, device, num_classes, progress)
            env = environment(device)
        finally:
            finalize()  # the squeeze engine and the pipeline share one process-wide context
            torch.set_num_threads(threads)
    result = {"benchmark": "throughput", "env": env,
              "config": {"what": parts, "warmup": args.warmup, "repeats": args.repeats, "iters": args.iters,
                         "config_files": list(args.config), "overrides": overrides, "kernels": args.kernels,
                         "resolved": cfg.to_dict()},
              "results": results}
    stem = args.name or f"throughput-{device_tag(device)}"
    json_path, md_path = save_result(args.out, stem, result, render_throughput(result))
    result["files"] = [str(json_path), str(md_path)]
    return result


def render_throughput(result: dict) -> str:
    env, cfg = result["env"], result["config"]
    lines = [f"# Throughput — {env['device_name']}", "",
             f"torch {env['torch']} · CUDA {env.get('cuda')} · {env['threads']} threads · git "
             f"{env.get('git_revision')} · {env['timestamp_utc']}; config: "
             f"{' '.join(cfg['config_files']) or 'built-in tiny demo'}"
             f"{' + ' + ' '.join(cfg['overrides']) if cfg['config_files'] and cfg['overrides'] else ''}", "",
             f"{cfg['repeats']} repeats × {cfg['iters']} iterations after {cfg['warmup']} warm-up; mean ± sample "
             "std over repeats.", "", "| Part | Throughput | What |", "|---|---|---|"]
    for part, r in result["results"].items():
        if part == "e2e":
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in r["stage_seconds"].items())
            lines.append(f"| end-to-end | {r['seconds']:.1f} s | {r['what']} ({stages}) |")
        else:
            lines.append(f"| {part} | {r['mean']:.4g} ± {r['std']:.2g} {r['unit']} | {r['what']} |")
    return "\n".join(lines) + "\n"
