"""``guardx bench overhead | sweep | throughput`` (registered by guardx/cli.py)."""
from __future__ import annotations

import argparse

from guardx.bench.methods import METHODS


def _common(p: argparse.ArgumentParser, repeats: int) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "reference"],
                   help="GUARD's row-wise ops: Triton on CUDA (auto), or force one implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (cuDNN autotune, allocator)")
    p.add_argument("--repeats", type=int, default=repeats, help="timed blocks; mean ± std is over these")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON/markdown (and PNG) results")
    p.add_argument("--name", default="", help="file stem of the results (default: derived from the settings)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet18", help="registry name (resnet18 | resnet18_small | convnet)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier width (ImageNet-1K: 1000)")
    p.add_argument("--width", type=int, default=0, help="model base width; 0 = the model's default")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (+ guard_cure)")
    p.add_argument("--pgd-steps", type=int, default=10, help="adv: PGD steps k (the targets compare against 10)")
    p.add_argument("--pgd-eps", default="1/255", help="adv: L-inf radius (paper Section 3.2: a weak 1/255)")
    p.add_argument("--pgd-alpha", default="0.25/255", help="adv: PGD step size (guardx's default, eps/4)")
    p.add_argument("--isolate", default="process", choices=["process", "none"],
                   help="process: each method in a fresh process (clean peak-memory numbers); none: one process")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="forward under autocast as distributed.precision does (fp32 weights); GPU")
    p.add_argument("--channels-last", action="store_true", help="model and batch in channels_last memory format")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="disable cuDNN autotuning (on by default)")


def register_cli(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: Table 4 overhead, its growth, stage throughput")
    which = bench.add_subparsers(dest="bench", required=True, metavar="benchmark")

    p = which.add_parser("overhead", help="s/iter and peak memory per objective (the paper's Table 4)")
    _model_args(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--iters", type=int, default=10, help="iterations per timed block")
    _common(p, repeats=5)
    p.set_defaults(handler=_overhead)

    p = which.add_parser("sweep", help="s/iter and memory over batch sizes × resolutions, with a plot")
    _model_args(p)
    p.add_argument("--batch-sizes", default="8,16,32,64,128")
    p.add_argument("--resolutions", default="32,64,112,224")
    p.add_argument("--iters", type=int, default=5, help="iterations per timed block")
    _common(p, repeats=3)
    p.set_defaults(handler=_sweep)

    p = which.add_parser("throughput", help="img/s of squeeze, recover, the loader, and the whole pipeline")
    p.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                   help="YAML config (default: built-in tiny demo settings)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied last")
    p.add_argument("--what", default="squeeze,recover,loader,e2e", help="comma-separated parts to measure")
    p.add_argument("--iters", type=int, default=10, help="steps (batches, recover iterations) per timed block")
    p.add_argument("--keep-e2e", default=None, metavar="DIR", help="run the e2e pipeline in DIR and keep it")
    _common(p, repeats=3)
    p.set_defaults(handler=_throughput)

    p = which.add_parser("report", help="regenerate README.md's measured-results block from benchmarks/results")
    p.add_argument("--results", default="benchmarks/results", help="folder of the benchmark JSON files")
    p.add_argument("--readme", default="README.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the README block is stale; write nothing")
    p.set_defaults(handler=_readme_report)


def _report(result: dict, text: str) -> int:
    print(text)
    print("wrote " + ", ".join(result["files"]))
    return 0


def _progress(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def _overhead(args) -> int:
    from guardx.bench.overhead import render_overhead, run_overhead

    result = run_overhead(args, _progress)
    return _report(result, render_overhead(result))


def _sweep(args) -> int:
    from guardx.bench.overhead import render_sweep, run_sweep

    result = run_sweep(args, _progress)
    return _report(result, render_sweep(result))


def _throughput(args) -> int:
    from guardx.bench.throughput import render_throughput, run_throughput

    result = run_throughput(args, _progress)
    return _report(result, render_throughput(result))


def _readme_report(args) -> int:
    import sys
    from pathlib import Path

    from guardx.bench.report import update_readme

    current = update_readme(Path(args.readme), Path(args.results), check=args.check)
    if args.check and not current:
        print(f"{args.readme}: the measured-results block is stale; run `guardx bench report`", file=sys.stderr)
        return 1
    print(f"{args.readme}: measured-results block {'already current' if current else 'updated'}")
    return 0
