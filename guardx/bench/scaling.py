"""Weak scaling across ranks: the squeeze step (plain / GUARD, DDP / ZeRO) and the recover stage.

    guardx bench squeeze-scaling --device cpu --ranks 1,2 --backends ddp,zero2       # CPU: one core per rank
    guardx bench squeeze-scaling --ranks 1,2,4,8 --backends ddp,zero2 --model resnet18 --width 64 \\
        --resolution 224 --per-rank-batch 64 --precision bf16                       # one 8-GPU node
    guardx bench recover-scaling --ranks 1,2

Squeeze: for every (backend, objective, ranks) a fresh ``torchrun --standalone --nproc-per-node R`` launch
of this module's worker. Each rank builds the fixed-batch squeeze step (``measure.fixed_batch_step``, the
one step definition) with the squeeze stage's engine for the backend (``build_engine``: gradient
exchange included), its own fixed batch (as with a sharded loader) and the same weights; ``--warmup``
untimed steps, then ``--repeats`` blocks of ``--iters`` steps, each block started after a barrier and
timed as a whole; a block's time is the slowest rank's. img/s = global batch / seconds per step;
efficiency = img/s(R) / (R · img/s(1 rank, same backend)). On CPU a rank is one core
(``--threads-per-rank 1``), the analogue of one GPU per rank: keep ranks × threads within the machine's
idle cores, or the numbers measure contention.

Recover: each run launches ``torchrun --nproc-per-node R -m guardx recover`` on a fresh run folder with
``recover.ipc`` scaled by R, so every rank synthesises the same number of images. The stage records each
rank's loop time in its manifest; throughput is image-iterations per second of the slowest rank. Excluded:
process start-up, teacher loading (a randomly initialised teacher: recover's cost does not depend on the
weights).

Writes ``squeeze-scaling-<device>.{json,md}`` and ``recover-scaling-<device>.{json,md}``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from guardx.bench.measure import (REPO_ROOT, Timer, device_tag, environment, fixed_batch_step, load_average,
                                  save_result, summary, synchronize)
from guardx.errors import GuardxError

OBJECTIVES = {
    "plain": ["objective.name=plain"],
    "guard_exact": ["objective.name=guard", "objective.mode=exact"],
    "guard_lossdiff": ["objective.name=guard", "objective.mode=lossdiff"],
}
BACKENDS = {
    "ddp": ["distributed.backend=ddp"],
    "zero1": ["distributed.backend=deepspeed", "distributed.zero_stage=1"],
    "zero2": ["distributed.backend=deepspeed", "distributed.zero_stage=2"],
}


# ---------------------------------------------------------------- squeeze: one launch (runs on every rank)
def squeeze_worker(spec: dict) -> None:
    from guardx.config import load_config
    from guardx.distributed import build_engine, finalize, init_distributed
    from guardx.objectives import build_objective

    cfg = load_config(None, spec["overrides"])
    ctx = init_distributed(cfg)
    try:
        if ctx.device.type == "cpu":
            torch.set_num_threads(spec["threads"])

        def engine(step_module, optimizer):
            return build_engine(step_module, optimizer=optimizer, cfg=cfg, ctx=ctx,
                                global_batch=spec["batch"] * ctx.world_size)

        step = fixed_batch_step(build_objective(cfg.objective.name, **cfg.objective.params()), model=spec["model"],
                                num_classes=spec["classes"], width=spec["width"], batch_size=spec["batch"],
                                resolution=spec["resolution"], device=ctx.device, rank=ctx.rank, build_engine=engine)
        step.engine.train()
        for _ in range(spec["warmup"]):
            step()
        timer, seconds = Timer(ctx.device), []
        for _ in range(spec["repeats"]):
            synchronize(ctx.device)
            ctx.barrier()
            timer.start()
            for _ in range(spec["iters"]):
                step()
            t = torch.tensor([timer.stop() / spec["iters"]], dtype=torch.float64, device=ctx.device)
            if ctx.distributed:  # the ranks run in lock-step; the slowest one is the step time
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            seconds.append(t.item())
        if ctx.is_main:
            Path(spec["out"]).write_text(json.dumps({"seconds_per_step": seconds, "world_size": ctx.world_size,
                                                     "threads_per_rank": torch.get_num_threads()}))
    finally:
        finalize()


def _launch(spec: dict, ranks: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="guardx-scaling-") as tmp:
        spec = {**spec, "out": str(Path(tmp) / "result.json")}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "DS_ACCELERATOR": os.environ.get(
            "DS_ACCELERATOR", "cpu" if spec["device"] == "cpu" else "cuda"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "guardx.bench.scaling", str(Path(tmp) / "spec.json")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not Path(spec["out"]).is_file():
            raise GuardxError(f"squeeze-scaling launch failed ({ranks} ranks, {' '.join(spec['overrides'][-3:])}): "
                              + (proc.stderr.strip().splitlines() or ["(no output)"])[-1])
        return json.loads(Path(spec["out"]).read_text())


def run_squeeze_scaling(args, progress=print) -> dict:
    from guardx.bench.measure import parse_ints, resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    defaults = dict(model=("resnet18", "resnet18_small"), width=(64, 16), resolution=(224, 32), classes=(1000, 10),
                    per_rank_batch=(64, 32))
    for key, (gpu, cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu if cuda else cpu)
    ranks = parse_ints(args.ranks, "--ranks")
    backends, objectives = args.backends.split(","), args.objectives.split(",")
    for name, values, table in (("backend", backends, BACKENDS), ("objective", objectives, OBJECTIVES)):
        bad = [v for v in values if v not in table]
        if bad:
            raise GuardxError(f"unknown {name} {bad}; known: {list(table)}")
    if cuda and max(ranks) > torch.cuda.device_count():
        raise GuardxError(f"--ranks {max(ranks)} needs {max(ranks)} GPUs, {torch.cuda.device_count()} visible")

    load_before, rows = load_average(), []
    for backend in backends:
        for objective in objectives:
            base = None
            for r in ranks:
                threads = args.threads_per_rank if not cuda else 1
                spec = {"model": args.model, "width": args.width, "resolution": args.resolution,
                        "classes": args.classes, "batch": args.per_rank_batch, "threads": threads,
                        "warmup": args.warmup, "repeats": args.repeats, "iters": args.iters, "device": device.type,
                        "overrides": [f"run.device={device.type}", "run.progress=false",
                                      f"distributed.precision={args.precision}",
                                      *BACKENDS[backend], *OBJECTIVES[objective]]}
                result = _launch(spec, r, args.timeout)
                global_batch = args.per_rank_batch * r
                per_block = [global_batch / s for s in result["seconds_per_step"]]
                row = {"backend": backend, "objective": objective, "ranks": r, "global_batch": global_batch,
                       "threads_per_rank": result["threads_per_rank"],
                       "s_per_step": summary(result["seconds_per_step"]), "img_per_s": summary(per_block),
                       "raw_seconds_per_step": result["seconds_per_step"]}
                if r == 1:
                    base = row["img_per_s"]["mean"]
                row["efficiency"] = row["img_per_s"]["mean"] / (r * base) if base else None
                rows.append(row)
                progress(f"{backend:6s} {objective:15s} ranks={r}  {row['img_per_s']['mean']:9.1f} img/s"
                         + (f"  efficiency {row['efficiency']:.2f}" if row["efficiency"] else ""))

    config = {k: getattr(args, k) for k in ("model", "width", "resolution", "classes", "per_rank_batch",
                                            "precision", "threads_per_rank", "warmup", "repeats", "iters")}
    data = {"benchmark": "squeeze_scaling", "config": config, "environment": environment(device),
            "load": {"before": load_before, "after": load_average()}, "deepspeed": _version("deepspeed"),
            "rows": rows}
    stem = args.name or f"squeeze-scaling-{device_tag(device)}"
    json_path, md_path = save_result(args.out, stem, data, render_squeeze(data))
    data["files"] = [str(json_path), str(md_path)]
    return data


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def render_squeeze(data: dict) -> str:
    c, env = data["config"], data["environment"]
    lines = [f"# Squeeze throughput across ranks — {env['device_name']}", "",
             f"{c['model']} (width {c['width']}), {c['resolution']}×{c['resolution']} px, {c['classes']} classes, "
             f"{c['per_rank_batch']} images per rank per step (weak scaling), precision {c['precision']}; "
             f"{c['warmup']} warm-up steps, {c['repeats']} blocks × {c['iters']} steps; torch {env['torch']}, "
             f"deepspeed {data['deepspeed']}, git {env['git_revision']}; load average {data['load']['before']} "
             f"before, {data['load']['after']} after.", "",
             "Excluded: data loading (a fixed batch per rank on the device) and checkpoints. On CPU one rank "
             f"is {c['threads_per_rank']} core(s), the analogue of one GPU per rank.", "",
             "| backend | objective | ranks | threads/rank | global batch | s/step | img/s | scaling efficiency |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        eff = f"{r['efficiency']:.2f}" if r["efficiency"] else "—"
        lines.append(f"| {r['backend']} | {r['objective']} | {r['ranks']} | {r['threads_per_rank']} | "
                     f"{r['global_batch']} | {r['s_per_step']['mean']:.4f} ± {r['s_per_step']['std']:.4f} | "
                     f"{r['img_per_s']['mean']:.1f} ± {r['img_per_s']['std']:.1f} | {eff} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- recover
def _make_teacher(run_dir: Path, args) -> None:
    from guardx.config import load_config
    from guardx.models import create_model
    from guardx.models._io import model_meta, save_model

    cfg = load_config(None, [f"data.resolution={args.resolution}"])
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.classes, width=args.width, resolution=args.resolution,
                         mean=cfg.data.mean, std=cfg.data.std)
    meta = model_meta(cfg, name=args.model, width=args.width, num_classes=args.classes,
                      classes=[f"c{i:03d}" for i in range(args.classes)])
    save_model(run_dir / "squeeze" / "teacher.pt", model, meta)  # where `guardx recover` looks for it


def _recover_once(ranks: int, work: Path, args) -> dict:
    run_dir = work / f"r{ranks}"
    _make_teacher(run_dir, args)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--master-port",
           str(29600 + ranks), "-m", "guardx", "recover",
           f"run.out_dir={run_dir}", f"run.device={args.device}", "run.progress=false",
           f"data.resolution={args.resolution}", f"distributed.backend={'ddp' if ranks > 1 else 'none'}",
           f"recover.ipc={args.ipc_per_rank * ranks}", f"recover.batch_size={args.batch_size}",
           f"recover.iterations={args.iterations}", f"recover.jitter={max(args.resolution // 8, 1)}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_rank),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise GuardxError(f"recover-scaling launch failed ({ranks} ranks): "
                          + (proc.stderr.strip().splitlines() or ["(no output)"])[-1])
    manifest = json.loads((run_dir / "recover" / "manifest.json").read_text())
    return {"ranks": ranks, "images": manifest["images"], "rank_seconds": manifest["rank_seconds"],
            "img_iters_per_s": manifest["img_iters_per_s"]}


def run_recover_scaling(args, progress=print) -> dict:
    from guardx.bench.measure import parse_ints

    rows, load_before = [], load_average()
    with tempfile.TemporaryDirectory(prefix="guardx-recover-scaling-") as tmp:
        for r in parse_ints(args.ranks, "--ranks"):
            rows.append(_recover_once(r, Path(tmp), args))
            progress(f"recover ranks={r}: {rows[-1]['img_iters_per_s']:.0f} img·it/s")
    base = rows[0]["img_iters_per_s"]
    for r in rows:
        r["efficiency"] = r["img_iters_per_s"] / (r["ranks"] * base)
    config = {k: getattr(args, k) for k in ("ranks", "device", "model", "width", "resolution", "classes",
                                            "ipc_per_rank", "batch_size", "iterations", "threads_per_rank")}
    data = {"benchmark": "recover_weak_scaling", "config": config, "environment": environment(args.device),
            "load": {"before": load_before, "after": load_average()}, "rows": rows}
    json_path, md_path = save_result(args.out, args.name or f"recover-scaling-{args.device}", data,
                                     render_recover(data))
    data["files"] = [str(json_path), str(md_path)]
    return data


def render_recover(data: dict) -> str:
    c, env = data["config"], data["environment"]
    lines = [f"# Recover weak scaling — {env['device_name']}", "",
             f"{c['model']} (width {c['width']}) teacher, {c['resolution']} px, batches of {c['batch_size']} images, "
             f"{c['iterations']} iterations, {c['ipc_per_rank']} ipc × {c['classes']} classes per rank; "
             f"{c['threads_per_rank']} thread(s) per rank on CPU; torch {env['torch']}, git {env['git_revision']}; "
             f"load average {data['load']['before']} before, {data['load']['after']} after.",
             "", "Throughput = image-iterations/s of the slowest rank (start-up and teacher loading excluded); "
             "efficiency = throughput(R) / (R × throughput(1)).", "",
             "| ranks | images | slowest rank s | img·it/s | efficiency |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['ranks']} | {r['images']} | {max(r['rank_seconds']):.1f} | {r['img_iters_per_s']:.0f} | "
                     f"{100 * r['efficiency']:.1f} % |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # the torchrun worker of `guardx bench squeeze-scaling`
    squeeze_worker(json.loads(Path(sys.argv[1]).read_text()))
