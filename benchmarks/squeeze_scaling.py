"""Squeeze throughput across ranks: img/s at 1, 2, ... ranks for plain and GUARD (exact, lossdiff).

    python benchmarks/squeeze_scaling.py                                    # CPU: 1 and 2 ranks, small model
    python benchmarks/squeeze_scaling.py --ranks 1,2,4,8 --backends ddp,zero2 --model resnet18 --width 64 \
        --resolution 224 --per-rank-batch 64 --precision bf16                # one 8-GPU node

What one step is: the squeeze's own step, built the way ``guardx squeeze`` builds it — the model from
the registry, the objective, SGD (momentum 0.9, wd 1e-4), ``build_engine(ObjectiveStep(model, objective))``
for the backend — then forward (all of the objective's passes), backward (gradient exchange included),
optimiser step. Excluded: data loading (each rank holds one fixed random batch on its device) and
checkpoints. This isolates what changes with the number of ranks: compute per rank and communication.

Protocol: for every (backend, objective, ranks) a fresh ``torchrun --standalone --nproc-per-node R``
launch; ``--warmup`` untimed steps, then ``--repeats`` blocks of ``--iters`` steps, each block started
after a barrier and timed as a whole (CUDA events + synchronize on GPU, perf_counter on CPU); a block's
time is the slowest rank's. Weak scaling: the per-rank batch is fixed, the global batch is R times it;
img/s = global batch / seconds per step; efficiency = img/s(R) / (R · img/s(1 rank, same backend)).
On CPU a rank is one core (``--threads-per-rank 1``), the analogue of one GPU per rank: keep ranks ×
threads within the machine's idle cores, or the numbers measure contention.

Writes ``benchmarks/results/squeeze-scaling-<device>.{json,md}`` (raw per-block seconds, configuration,
device, versions, git revision).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's guardx and kernels, also inside the torchrun workers

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


# ---------------------------------------------------------------- one launch (runs on every rank)
def worker(spec: dict) -> None:
    import torch

    from guardx.bench._measure import Timer, synchronize
    from guardx.config import load_config
    from guardx.distributed import build_engine, finalize, init_distributed
    from guardx.models import create_model
    from guardx.objectives import ObjectiveStep, build_objective

    cfg = load_config(None, spec["overrides"])
    ctx = init_distributed(cfg)
    try:
        if ctx.device.type == "cpu":
            torch.set_num_threads(spec["threads"])
        torch.manual_seed(0)  # same weights on every rank
        model = create_model(spec["model"], num_classes=spec["classes"], width=spec["width"],
                             resolution=spec["resolution"]).to(ctx.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        engine = build_engine(ObjectiveStep(model, build_objective(cfg.objective.name, **cfg.objective.params())),
                              optimizer=optimizer, cfg=cfg, ctx=ctx, global_batch=spec["batch"] * ctx.world_size)
        engine.train()
        g = torch.Generator().manual_seed(1 + ctx.rank)  # each rank its own batch, as with a sharded loader
        x = torch.rand(spec["batch"], 3, spec["resolution"], spec["resolution"], generator=g).to(ctx.device)
        y = torch.randint(0, spec["classes"], (spec["batch"],), generator=g).to(ctx.device)

        def step() -> None:
            loss, _ = engine(x, y)
            engine.backward(loss)
            engine.step()

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


# ---------------------------------------------------------------- the driver
def launch(spec: dict, ranks: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="guardx-scaling-") as tmp:
        spec = {**spec, "out": str(Path(tmp) / "result.json")}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "DS_ACCELERATOR": os.environ.get(
            "DS_ACCELERATOR", "cpu" if spec["device"] == "cpu" else "cuda")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               __file__, "--worker", str(Path(tmp) / "spec.json")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not Path(spec["out"]).is_file():
            raise SystemExit(f"launch failed ({' '.join(cmd[3:6])}, {spec['overrides'][-3:]}):\n{proc.stderr[-3000:]}")
        return json.loads(Path(spec["out"]).read_text())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    p.add_argument("--backends", default="ddp", help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--objectives", default=",".join(OBJECTIVES), help=f"subset of {','.join(OBJECTIVES)}")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--model", default=None, help="registry name (default: resnet18 on GPU, resnet18_small on CPU)")
    p.add_argument("--width", type=int, default=None, help="default: 64 on GPU, 16 on CPU")
    p.add_argument("--resolution", type=int, default=None, help="default: 224 on GPU, 32 on CPU")
    p.add_argument("--classes", type=int, default=None, help="default: 1000 on GPU, 10 on CPU")
    p.add_argument("--per-rank-batch", type=int, default=None, help="default: 64 on GPU, 32 on CPU")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads-per-rank", type=int, default=1, help="CPU: intra-op threads of each rank")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per launch")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--name", default=None, help="file stem (default squeeze-scaling-<device>)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return 0
    import torch

    from guardx.bench._measure import device_tag, environment, save_result, summary

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    defaults = dict(model=("resnet18", "resnet18_small"), width=(64, 16), resolution=(224, 32), classes=(1000, 10),
                    per_rank_batch=(64, 32))
    for key, (gpu, cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu if cuda else cpu)
    ranks = [int(r) for r in args.ranks.split(",")]
    backends, objectives = args.backends.split(","), args.objectives.split(",")
    for name, table in (("backend", BACKENDS), ("objective", OBJECTIVES)):
        bad = [v for v in (backends if name == "backend" else objectives) if v not in table]
        if bad:
            raise SystemExit(f"unknown {name} {bad}; known: {list(table)}")
    if cuda and max(ranks) > torch.cuda.device_count():
        raise SystemExit(f"--ranks {max(ranks)} needs {max(ranks)} GPUs, {torch.cuda.device_count()} visible")

    rows = []
    for backend in backends:
        for objective in objectives:
            base = None
            for r in ranks:
                threads = args.threads_per_rank if not cuda else 1
                spec = {"model": args.model, "width": args.width, "resolution": args.resolution,
                        "classes": args.classes, "batch": args.per_rank_batch, "threads": threads,
                        "warmup": args.warmup, "repeats": args.repeats, "iters": args.iters,
                        "device": device.type,
                        "overrides": [f"run.device={device.type}", "run.progress=false",
                                      f"distributed.precision={args.precision}",
                                      *BACKENDS[backend], *OBJECTIVES[objective]]}
                result = launch(spec, r, args.timeout)
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
                print(f"{backend:6s} {objective:15s} ranks={r}  {row['img_per_s']['mean']:9.1f} img/s"
                      + (f"  efficiency {row['efficiency']:.2f}" if row["efficiency"] else ""), flush=True)

    config = {k: getattr(args, k) for k in ("model", "width", "resolution", "classes", "per_rank_batch",
                                            "precision", "threads_per_rank", "warmup", "repeats", "iters")}
    data = {"benchmark": "squeeze_scaling", "config": config, "environment": environment(device),
            "deepspeed": _version("deepspeed"), "rows": rows}
    stem = args.name or f"squeeze-scaling-{device_tag(device)}"
    json_path, md_path = save_result(args.out_dir, stem, data, markdown(data))
    print(f"wrote {json_path} and {md_path}")
    return 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def markdown(data: dict) -> str:
    c, env = data["config"], data["environment"]
    lines = [f"# Squeeze throughput across ranks — {env['device_name']}", "",
             f"{c['model']} (width {c['width']}), {c['resolution']}×{c['resolution']} px, {c['classes']} classes, "
             f"{c['per_rank_batch']} images per rank per step (weak scaling), precision {c['precision']}; "
             f"{c['warmup']} warm-up steps, {c['repeats']} blocks × {c['iters']} steps; torch {env['torch']}, "
             f"deepspeed {data['deepspeed']}, git {env['git_revision']}.", "",
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


if __name__ == "__main__":
    sys.exit(main())
