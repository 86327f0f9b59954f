"""``guardx analyze curvature|grid``: the paper's Fig. 2 and Fig. 1/3 from saved runs.

    guardx analyze curvature --config configs/demo.yaml \\
        --checkpoint SRe2L=runs/demo/sre2l/squeeze/teacher.pt --checkpoint GUARD=runs/demo/guard/squeeze/teacher.pt
    guardx analyze grid --images GUARD=runs/demo/guard --images SRe2L=runs/demo/sre2l --out runs/demo/grid.png
"""
from __future__ import annotations

import argparse
from pathlib import Path


def register_cli(sub) -> None:
    p = sub.add_parser("analyze", help="curvature spectra (Fig. 2) and distilled-image grids (Fig. 1/3)")
    which = p.add_subparsers(dest="analysis", required=True, metavar="analysis")

    c = which.add_parser("curvature", help="largest input-Hessian eigenvalues per test image, models side by side")
    c.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                   help="YAML config for the data (data.*) and run.seed/run.device")
    c.add_argument("--checkpoint", action="append", required=True, metavar="[LABEL=]PATH",
                   help="model file (repeatable or comma list; Fig. 2 compares two, e.g. SRe2L and GUARD)")
    c.add_argument("--samples", type=int, default=200, help="test images (the first N of the split)")
    c.add_argument("--topk", type=int, default=10, help="eigenvalues per image")
    c.add_argument("--iters", type=int, default=30, help="Lanczos steps (or power iterations per eigenvalue)")
    c.add_argument("--method", choices=("lanczos", "power"), default="lanczos")
    c.add_argument("--space", choices=("normalized", "pixel"), default="normalized",
                   help="input the Hessian is taken with respect to (normalized = where GUARD acts)")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--out", metavar="DIR", help="output folder (default <run.out_dir>/analysis)")
    c.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied last")
    c.set_defaults(handler=_curvature)

    g = which.add_parser("grid", help="distilled images per class, runs side by side")
    g.add_argument("--images", action="append", required=True, metavar="[LABEL=]PATH",
                   help="run directory or ImageFolder of distilled images (repeatable or comma list)")
    g.add_argument("--classes", metavar="LIST", help="class folder names to show (default: the first --max-classes)")
    g.add_argument("--max-classes", type=int, default=10)
    g.add_argument("--per-class", type=int, default=1, help="images per class and run")
    g.add_argument("--out", required=True, metavar="PNG", help="output image")
    g.set_defaults(handler=_grid)


def _split(values: list[str]) -> list[str]:
    return [v for arg in values for v in arg.split(",") if v]


def _positive(args: argparse.Namespace, *names: str) -> None:
    from guardx.errors import ConfigError

    for n in names:
        if getattr(args, n) < 1:
            raise ConfigError(f"--{n.replace('_', '-')} must be >= 1, got {getattr(args, n)}")


def _curvature(args) -> int:
    from guardx.analysis.curvature import run_curvature
    from guardx.config import load_config
    from guardx.errors import ConfigError
    from guardx.utils.misc import labelled_paths

    _positive(args, "samples", "topk", "iters", "batch_size")
    cfg = load_config(args.config, args.overrides)
    entries = labelled_paths(_split(args.checkpoint), "--checkpoint")
    if not entries:
        raise ConfigError("--checkpoint: give at least one model file")
    out = Path(args.out) if args.out else Path(cfg.run.out_dir) / "analysis"
    report = run_curvature(cfg, entries, samples=args.samples, k=args.topk, iters=args.iters, method=args.method,
                           space=args.space, batch_size=args.batch_size, out=out)
    for m in report["models"]:
        s = m["summary"]
        print(f"{m['label']}: λ1 median {s['top1_median']:.4g}, mean {s['top1_mean']:.4g}, max {s['top1_max']:.4g} "
              f"over {s['n']} images")
    print(f"wrote {out / 'curvature.json'} and {out / 'curvature.png'}")
    return 0


def _grid(args) -> int:
    from guardx.analysis.grid import image_grid
    from guardx.errors import ConfigError
    from guardx.utils.misc import labelled_paths

    _positive(args, "max_classes", "per_class")
    entries = labelled_paths(_split(args.images), "--images")
    if not entries:
        raise ConfigError("--images: give at least one run or image folder")
    info = image_grid(entries, Path(args.out), classes=_split([args.classes]) if args.classes else None,
                      max_classes=args.max_classes, per_class=args.per_class)
    print(f"wrote {args.out}: {len(info['rows'])} rows x {len(info['classes'])} classes")
    return 0
