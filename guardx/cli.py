"""``guardx <command> [--config FILE ...] [section.key=value ...]`` — one entry point for every stage.

    guardx pipeline --config configs/demo.yaml            # the whole demo on CPU
    guardx squeeze  --config configs/imagenet1k.yaml data.train_dir=/data/imagenet/train
    torchrun --nproc-per-node 8 -m guardx squeeze --config configs/imagenet1k.yaml distributed.backend=ddp
    guardx config --config configs/demo.yaml              # print the resolved config
    guardx config --reference                             # every key, default and meaning (markdown)
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

STAGES = ("squeeze", "recover", "relabel", "train", "evaluate")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                   help="YAML config (repeatable; later files override earlier ones)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied last")


def _add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", action="append", default=[], metavar="[LABEL=]PATH",
                   help="model file to evaluate (repeatable or comma list); default: the run's teacher and student")
    p.add_argument("--attacks", metavar="LIST", help="e.g. pgd100,square,autoattack,cw,mim (evaluate.attacks)")
    p.add_argument("--eps", metavar="LIST", help="L-inf radii, e.g. 1/255,4/255 (evaluate.eps)")
    p.add_argument("--out", metavar="DIR", help="results folder (evaluate.out_dir)")


def _evaluate_overrides(args) -> list[str]:
    """The evaluate flags as config overrides (JSON values, so paths and k/255 pass through YAML unchanged)."""
    if args.command != "evaluate":
        return []
    out = []
    paths = [c for arg in args.checkpoint for c in arg.split(",") if c]
    if paths:
        out.append(f"evaluate.checkpoints={json.dumps(paths)}")
    if args.attacks is not None:
        out.append(f"evaluate.attacks={json.dumps([v.strip() for v in args.attacks.split(',') if v.strip()])}")
    if args.eps is not None:  # numbers as numbers, k/255 as strings (the config parses those)
        eps = [v.strip() for v in args.eps.split(",") if v.strip()]
        out.append(f"evaluate.eps={json.dumps([_number_or_text(v) for v in eps])}")
    if args.out is not None:
        out.append(f"evaluate.out_dir={json.dumps(args.out)}")
    return out


def _number_or_text(v: str):
    from guardx.utils.misc import parse_fraction

    try:
        return parse_fraction(v)
    except ValueError:
        return v  # the config names the bad value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardx", description="Robust dataset distillation (GUARD) toolkit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage")
        _add_config_args(p)
        if stage == "evaluate":
            _add_evaluate_args(p)
    _add_config_args(sub.add_parser("pipeline", help="run all stages for every method and write the report"))
    p = sub.add_parser("config", help="print the resolved config, or the config reference")
    p.add_argument("--reference", action="store_true", help="print every key with its default and meaning")
    _add_config_args(p)
    for module in _EXTENSIONS:
        importlib.import_module(module).register_cli(sub)
    return parser


# Modules that add their own commands (``guardx bench``, ``guardx analyze``, ``guardx data``): each has
# ``register_cli(subparsers)``, which adds a sub-parser with ``set_defaults(handler=fn)``; ``fn(args)``
# returns an exit code. They import their heavy dependencies inside the handler, not at import time.
_EXTENSIONS: list[str] = [m for m in ("guardx.bench.cli", "guardx.analysis.cli", "guardx.data.cli", "guardx.distill.cli")
                          if importlib.util.find_spec(m.rsplit(".", 1)[0]) is not None
                          and importlib.util.find_spec(m) is not None]


def main(argv: list[str] | None = None) -> int:
    from guardx.errors import GuardxError

    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except GuardxError as e:
        print(f"guardx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("guardx: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    from guardx.config import dump_config, load_config, reference_markdown

    if getattr(args, "handler", None) is not None:
        return args.handler(args) or 0
    if args.command == "config" and args.reference:
        print(reference_markdown())
        return 0
    cfg = load_config(args.config, args.overrides + _evaluate_overrides(args))
    if args.command == "config":
        print(dump_config(cfg), end="")
        return 0
    from guardx.distributed import finalize

    try:
        if args.command == "pipeline":
            from guardx import pipeline
            from guardx.pipeline import render_markdown

            report = pipeline.run(cfg)
            if int(os.environ.get("RANK", "0")) == 0:
                print(render_markdown(report, cfg))
        else:
            result = importlib.import_module(f"guardx.{args.command}").run(cfg)
            if args.command == "evaluate" and int(os.environ.get("RANK", "0")) == 0 and result:
                from guardx.evaluate import metric_names, results_table

                print(results_table(result, metric_names(cfg)))
            elif int(os.environ.get("RANK", "0")) == 0:
                print(result)
    finally:
        finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
