"""``guardx bench <benchmark>`` (registered by guardx/cli.py). Argument definitions only: each handler
imports its benchmark module when it runs, so ``guardx --help`` stays fast."""
from __future__ import annotations

import argparse
import os
import sys

from guardx.bench.methods import METHODS

RESULTS = "benchmarks/results"


def _out(p: argparse.ArgumentParser, name_help: str = "file stem of the results (default: derived from the settings)"):
    p.add_argument("--out", default=RESULTS, help=f"folder for the JSON/markdown results (default: {RESULTS})")
    p.add_argument("--name", default="", help=name_help)


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: auto)")


def _methods_args(p: argparse.ArgumentParser, rounds: int, warmup: int) -> None:
    _device(p)
    p.add_argument("--model", default="resnet18", help="registry name (resnet18 | resnet18_small | convnet)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier width (ImageNet-1K: 1000)")
    p.add_argument("--width", type=int, default=0, help="model base width; 0 = the model's default")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (plain is always added)")
    p.add_argument("--rounds", type=int, default=rounds,
                   help="timed rounds; each times one block of every method (round-robin, order rotated)")
    p.add_argument("--iters", type=int, default=1, help="steps per timed block")
    p.add_argument("--warmup", type=int, default=warmup,
                   help="untimed steps per method first (after the FLOP-counting step; cuDNN autotune, allocator)")
    p.add_argument("--memory-steps", type=int, default=2, help="steps measured for peak memory, after warm-up")
    p.add_argument("--pgd-steps", type=int, default=10, help="adv: PGD steps k (the targets compare against 10)")
    p.add_argument("--pgd-eps", default="1/255", help="adv: L-inf radius (paper Section 3.2: a weak 1/255)")
    p.add_argument("--pgd-alpha", default="0.25/255", help="adv: PGD step size (guardx's default, eps/4)")
    p.add_argument("--isolate", default="process", choices=["process", "none"],
                   help="peak memory: process = each method in a fresh process (clean numbers); none = this process")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="forward under autocast as distributed.precision does (fp32 weights); GPU")
    p.add_argument("--channels-last", action="store_true", help="model and batch in channels_last memory format")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="disable cuDNN autotuning (on by default)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "reference"],
                   help="GUARD's row-wise ops: Triton on CUDA (auto), or force one implementation")
    _out(p)


def register_cli(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: Table 4 overhead, its growth, throughput, loaders, scaling")
    which = bench.add_subparsers(dest="bench", required=True, metavar="benchmark")

    p = which.add_parser("overhead", help="time, FLOPs and peak memory per objective (the paper's Table 4)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=224)
    _methods_args(p, rounds=12, warmup=2)
    p.set_defaults(handler=_run("guardx.bench.overhead", "run_overhead", "render_overhead"))

    p = which.add_parser("sweep", help="time, FLOPs and memory over batch sizes × resolutions, with a plot")
    p.add_argument("--batch-sizes", default="8,16,32,64,128")
    p.add_argument("--resolutions", default="32,64,112,224")
    _methods_args(p, rounds=5, warmup=1)
    p.set_defaults(handler=_run("guardx.bench.sweep", "run_sweep", "render_sweep"))

    p = which.add_parser("throughput", help="img/s of squeeze, recover, the loader, and the whole pipeline")
    p.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                   help="YAML config (default: built-in tiny demo settings)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied last")
    p.add_argument("--what", default="squeeze,recover,loader,e2e", help="comma-separated parts to measure")
    p.add_argument("--iters", type=int, default=10, help="steps (batches, recover iterations) per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks; mean ± std is over these")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--keep-e2e", default=None, metavar="DIR", help="run the e2e pipeline in DIR and keep it")
    _device(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "reference"],
                   help="GUARD's row-wise ops: Triton on CUDA (auto), or force one implementation")
    _out(p)
    p.set_defaults(handler=_run("guardx.bench.throughput", "run_throughput", "render_throughput"))

    p = which.add_parser("loaders", help="img/s of each loader backend (folder, FFCV, DALI) on generated JPEGs")
    p.add_argument("--tree", default="/tmp/guardx-bench/jpeg-500x375", help="JPEG tree (generated once, reused)")
    p.add_argument("--images", type=int, default=2560, help="images in the tree (>= 2000 for the committed run)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", default="500x375", help="mean WxH of the JPEGs (each side jittered by ±25%%)")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--backends", default="folder,ffcv,ffcv-full,dali", help="comma list of folder,ffcv,ffcv-full,dali")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else (os.cpu_count() or 1),
                   help="worker processes / decoding threads, the same for every backend (default: all cores)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per backend, after one warm-up epoch")
    p.add_argument("--smoke", action="store_true", help="tiny tree, 1 timed epoch, results under /tmp")
    _device(p)
    _out(p, name_help="file stem of the results (default: loaders)")
    p.set_defaults(handler=_run("guardx.bench.loaders", "run_loaders"), name="loaders")

    p = which.add_parser("squeeze-scaling", help="squeeze img/s at 1, 2, ... ranks (DDP, ZeRO; plain, GUARD)")
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    p.add_argument("--backends", default="ddp", help="comma-separated subset of ddp,zero1,zero2")
    p.add_argument("--objectives", default="plain,guard_exact,guard_lossdiff",
                   help="subset of plain,guard_exact,guard_lossdiff")
    _device(p)
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
    _out(p, name_help="file stem (default squeeze-scaling-<device>)")
    p.set_defaults(handler=_run("guardx.bench.scaling", "run_squeeze_scaling", "render_squeeze"))

    p = which.add_parser("recover-scaling", help="recover weak scaling through the real stage (torchrun)")
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
    _out(p, name_help="file stem (default recover-scaling-<device>)")
    p.set_defaults(handler=_run("guardx.bench.scaling", "run_recover_scaling", "render_recover"))

    p = which.add_parser("attacks", help="images/s of each evaluation attack at the paper's budgets")
    _device(p)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--checkpoint", help="a trained guardx model instead of random weights")
    p.add_argument("--attacks", default="pgd100,fgsm,mim,cw,square,autoattack", help="pgd<N> = PGD with N steps")
    p.add_argument("--eps", default="1/255")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny CPU sizes and budgets, results under /tmp")
    p.add_argument("--out", default=RESULTS)
    p.set_defaults(handler=_run("guardx.bench.attacks", "run_attacks"))

    p = which.add_parser("kernels", help="GB/s of the Triton row kernels vs their PyTorch references (GPU)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--resolutions", default="32,64,112,224")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--out", default=RESULTS)
    p.set_defaults(handler=_run("guardx.bench.kernels", "run_kernels"))

    p = which.add_parser("report", help="regenerate README.md's measured-results block from benchmarks/results")
    p.add_argument("--results", default=RESULTS, help="folder of the benchmark JSON files")
    p.add_argument("--readme", default="README.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the README block is stale; write nothing")
    p.set_defaults(handler=_readme_report)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run(module: str, run: str, render: str | None = None):
    """A handler: ``module.run(args, progress)``, print ``module.render(result)`` if given, list the files."""
    def handler(args) -> int:
        import importlib

        mod = importlib.import_module(module)
        result = getattr(mod, run)(args, _progress)
        if render:
            print(getattr(mod, render)(result))
        print("wrote " + ", ".join(result["files"]))
        return 0
    return handler


def _readme_report(args) -> int:
    from pathlib import Path

    from guardx.bench.report import update_readme

    current = update_readme(Path(args.readme), Path(args.results), check=args.check)
    if args.check and not current:
        print(f"{args.readme}: the measured-results block is stale; run `guardx bench report`", file=sys.stderr)
        return 1
    print(f"{args.readme}: measured-results block {'already current' if current else 'updated'}")
    return 0
