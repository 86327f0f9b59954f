"""Recover weak scaling: the same work per rank at 1 and 2 (or more) ranks, through the real stage.

    python benchmarks/recover_scaling.py --ranks 1,2                       # CPU: one core per rank
    python benchmarks/recover_scaling.py --ranks 1,2,4,8 --device cuda      # one GPU per rank

Each run launches ``torchrun --nproc-per-node R -m guardx recover`` on a fresh run folder with
``recover.ipc`` scaled by R, so every rank synthesises the same number of images (weak scaling). The
stage records each rank's loop time in its manifest; throughput is image-iterations per second of the
slowest rank, and the efficiency at R ranks is throughput(R) / (R × throughput(1)). Excluded: process
start-up, teacher loading. The teacher is a randomly initialised model: recover's cost does not depend
on the weights. Writes ``benchmarks/results/recover-scaling-<device>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guardx.bench._measure import environment  # noqa: E402
from guardx.utils.io import write_json, write_text  # noqa: E402


def make_teacher(run_dir: Path, args) -> None:
    import torch

    from guardx.config import load_config
    from guardx.models import create_model
    from guardx.models._io import model_meta, save_model

    cfg = load_config(None, [f"data.resolution={args.resolution}"])
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.classes, width=args.width, resolution=args.resolution,
                         mean=cfg.data.mean, std=cfg.data.std)
    meta = model_meta(cfg, name=args.model, width=args.width, num_classes=args.classes,
                      classes=[f"c{i:03d}" for i in range(args.classes)])
    save_model(run_dir / "squeeze" / "teacher.pt", model, meta)


def run_once(ranks: int, work: Path, args) -> dict:
    run_dir = work / f"r{ranks}"
    make_teacher(run_dir, args)
    device = "cuda" if args.device == "cuda" else "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--master-port",
           str(29600 + ranks), "-m", "guardx", "recover",
           f"run.out_dir={run_dir}", f"run.device={device}", "run.progress=false",
           f"data.resolution={args.resolution}", f"distributed.backend={'ddp' if ranks > 1 else 'none'}",
           f"recover.ipc={args.ipc_per_rank * ranks}", f"recover.batch_size={args.batch_size}",
           f"recover.iterations={args.iterations}", f"recover.jitter={max(args.resolution // 8, 1)}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_rank), "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    manifest = json.loads((run_dir / "recover" / "manifest.json").read_text())
    return {"ranks": ranks, "images": manifest["images"], "rank_seconds": manifest["rank_seconds"],
            "img_iters_per_s": manifest["img_iters_per_s"]}


def markdown(result: dict) -> str:
    c, env = result["config"], result["environment"]
    lines = [f"# Recover weak scaling — {env['device_name']}", "",
             f"{c['model']} (width {c['width']}) teacher, {c['resolution']} px, batches of {c['batch_size']} images, "
             f"{c['iterations']} iterations, {c['ipc_per_rank']} ipc × {c['classes']} classes per rank; "
             f"{c['threads_per_rank']} thread(s) per rank on CPU; torch {env['torch']}, git {env['git_revision']}.",
             "", "Throughput = image-iterations/s of the slowest rank (start-up and teacher loading excluded); "
             "efficiency = throughput(R) / (R × throughput(1)).", "",
             "| ranks | images | slowest rank s | img·it/s | efficiency |", "|---|---|---|---|---|"]
    base = result["rows"][0]["img_iters_per_s"]
    for r in result["rows"]:
        eff = r["img_iters_per_s"] / (r["ranks"] * base)
        lines.append(f"| {r['ranks']} | {r['images']} | {max(r['rank_seconds']):.1f} | {r['img_iters_per_s']:.0f} | "
                     f"{100 * eff:.1f} % |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="resnet18_small")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--ipc-per-rank", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="guardx-recover-scaling-") as tmp:
        for r in (int(v) for v in args.ranks.split(",")):
            rows.append(run_once(r, Path(tmp), args))
            print(rows[-1], flush=True)
    import torch

    result = {"benchmark": "recover_weak_scaling", "config": vars(args),
              "environment": environment(torch.device(args.device)), "rows": rows}
    base = rows[0]["img_iters_per_s"]
    for r in rows:
        r["efficiency"] = r["img_iters_per_s"] / (r["ranks"] * base)
    stem = f"recover-scaling-{args.device}"
    write_json(result, Path(args.out) / f"{stem}.json")
    write_text(markdown(result), Path(args.out) / f"{stem}.md")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
