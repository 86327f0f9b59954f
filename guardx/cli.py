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
import signal
import sys

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


def _flag_overrides(args) -> list[str]:
    """Command-line flags as config overrides (JSON values, so paths and k/255 pass through YAML unchanged)."""
    if args.command == "pipeline" and args.seeds is not None:
        return [f"run.seeds=[{args.seeds}]"]
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
    from guardx.stages import STAGE_HELP, STAGE_MODULES

    for stage in STAGE_MODULES:
        p = sub.add_parser(stage, help=STAGE_HELP.get(stage, f"run the {stage} stage"))
        _add_config_args(p)
        if stage == "evaluate":
            _add_evaluate_args(p)
    p = sub.add_parser("pipeline", help="run all stages for every method (and seed) and write the report")
    _add_config_args(p)
    p.add_argument("--seeds", metavar="LIST", help="e.g. 0,1,2: every method once per seed (run.seeds)")
    p = sub.add_parser("report", help="rebuild report.{md,csv,html} of a finished pipeline run from its report.json")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the pipeline's run.out_dir")
    p = sub.add_parser("config", help="print the resolved config, or the config reference")
    p.add_argument("--reference", action="store_true", help="print every key with its default and meaning")
    _add_config_args(p)
    for module in _EXTENSIONS:
        importlib.import_module(module).register_cli(sub)
    return parser


# Modules that add their own commands (``guardx bench``, ``guardx analyze``, ``guardx data``): each has
# ``register_cli(subparsers)``, which adds a sub-parser with ``set_defaults(handler=fn)``; ``fn(args)``
# returns an exit code. They import their heavy dependencies inside the handler, not at import time.
_EXTENSIONS: list[str] = [m for m in ("guardx.bench.cli", "guardx.analysis.cli", "guardx.data.cli")
                          if importlib.util.find_spec(m.rsplit(".", 1)[0]) is not None
                          and importlib.util.find_spec(m) is not None]


def main(argv: list[str] | None = None) -> int:
    from guardx.errors import GuardxError

    args = build_parser().parse_args(argv)
    restore = _install_handlers()
    try:
        return _dispatch(args)
    except GuardxError as e:
        _report(f"guardx: error: {e}")
        return 2
    except KeyboardInterrupt:
        _report("guardx: interrupted; rerun the same command to resume")
        return 130
    finally:
        restore()


def _report(line: str) -> None:
    """The one line a user reads, flushed at once: under torchrun the process may be killed right after."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the message short
    print(line, file=sys.stderr, flush=True)


def _install_handlers():
    """For the duration of a command: SIGTERM raises :class:`~guardx.errors.Terminated` in the main process
    (torchrun stops the surviving ranks of a failed one with SIGTERM; without this they die silently and
    only torchrun's summary is seen), and guardx warnings print as one ``guardx: warning: ...`` line.
    Returns the function that restores the previous handlers."""
    import threading
    import warnings

    from guardx.errors import GuardxWarning, Terminated

    main_pid = os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() != main_pid:  # a forked worker (data loading): die as SIGTERM intends
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one message, however many signals follow
        raise Terminated("stopped by SIGTERM; rerun the same command to resume from the last checkpoint")

    previous_format = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if issubclass(category, GuardxWarning):
            return f"guardx: warning: {message}\n"
        return previous_format(message, category, filename, lineno, line)

    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    warnings.formatwarning = formatwarning

    def restore() -> None:
        warnings.formatwarning = previous_format
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)

    return restore


def _dispatch(args) -> int:
    from guardx.config import dump_config, load_config, reference_markdown

    if getattr(args, "handler", None) is not None:
        return args.handler(args) or 0
    if args.command == "config" and args.reference:
        print(reference_markdown())
        return 0
    if args.command == "report":
        from guardx.report import rebuild

        print(f"wrote {rebuild(args.run_dir)}")
        return 0
    cfg = load_config(args.config, args.overrides + _flag_overrides(args))
    if args.command == "config":
        print(dump_config(cfg), end="")
        return 0
    from guardx.distributed import finalize

    try:
        if args.command == "pipeline":
            from guardx import pipeline
            from guardx.report import pipeline_markdown

            report = pipeline.run(cfg)
            if int(os.environ.get("RANK", "0")) == 0:
                print(pipeline_markdown(report, cfg))
        else:
            from guardx.distill import DISTILLERS
            from guardx.stages import stage_module

            # a stage runs with the config its run's distiller adjusts (as in the pipeline), e.g. tesla sets mtt.tesla
            result = stage_module(args.command).run(DISTILLERS.build(cfg.run.distiller, cfg))
            if args.command == "evaluate" and int(os.environ.get("RANK", "0")) == 0 and result:
                from guardx.attacks.plan import metric_names
                from guardx.report import results_table

                print(results_table(result, metric_names(cfg)))
            elif int(os.environ.get("RANK", "0")) == 0:
                print(result)
    finally:
        finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
