"""``guardx buffers`` and ``guardx mtt``: the trajectory-matching commands (until the distiller registry
owns them). Same flags as every stage: ``--config FILE`` (repeatable) and ``section.key=value`` overrides."""
from __future__ import annotations

import importlib
import os


def register_cli(sub) -> None:
    from guardx.cli import _add_config_args

    for name, help_text in (("buffers", "train the expert trajectories MTT and TESLA match"),
                            ("mtt", "distil with MTT (mtt.tesla=true: TESLA) from the expert buffers")):
        p = sub.add_parser(name, help=help_text)
        _add_config_args(p)
        p.set_defaults(handler=_run)


def _run(args) -> int:
    from guardx.config import load_config
    from guardx.distributed import finalize

    cfg = load_config(args.config, args.overrides)
    try:
        out = importlib.import_module(f"guardx.distill.{args.command}").run(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            print(out)
    finally:
        finalize()
    return 0
