"""``guardx data ...``: dataset tools.

    guardx data convert /data/imagenet/train /data/ffcv/train.beton --max-side 256 --jpeg-quality 90
    guardx data convert --config configs/imagenet1k.yaml data.ffcv_train=/data/ffcv/train.beton \\
                        data.ffcv_val=/data/ffcv/val.beton       # both splits: *_dir → ffcv_*
    guardx data check /data/imagenet/train                       # list every file no decoder can read
"""
from __future__ import annotations

import os
import sys


def register_cli(sub) -> None:
    p = sub.add_parser("data", help="dataset tools: convert an ImageFolder to FFCV, check images")
    actions = p.add_subparsers(dest="data_command", required=True, metavar="action")

    c = actions.add_parser("convert", help="ImageFolder → FFCV .beton (+ .beton.json: classes, skipped files)",
                           description="Convert SRC (an ImageFolder) to DST (.beton), or, with --config, "
                                       "data.train_dir → data.ffcv_train and data.val_dir → data.ffcv_val. "
                                       "Unreadable images are skipped and listed. Options default to the "
                                       "data.ffcv_* config keys.")
    c.add_argument("items", nargs="*", metavar="SRC DST | section.key=value")
    c.add_argument("--config", "-c", action="append", default=[], metavar="FILE", help="YAML config (repeatable)")
    c.add_argument("--max-side", type=int, help="longest side stored (0 = keep); default data.ffcv_max_resolution")
    c.add_argument("--jpeg-quality", type=int, help="JPEG quality; default data.ffcv_jpeg_quality")
    c.add_argument("--write-mode", choices=("jpg", "raw", "proportion"),
                   help="how images are stored; default data.ffcv_write_mode")
    c.add_argument("--compress-probability", type=float,
                   help="write-mode proportion: share stored as JPEG; default data.ffcv_compress_probability")
    c.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    c.set_defaults(handler=_convert)

    k = actions.add_parser("check", help="list the images of ImageFolder trees that cannot be decoded")
    k.add_argument("roots", nargs="+", metavar="DIR")
    k.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    k.set_defaults(handler=_check)


def _convert(args) -> int:
    from guardx.config import load_config
    from guardx.data.ffcv import convert_image_folder
    from guardx.errors import ConfigError

    overrides = [x for x in args.items if "=" in x]
    paths = [x for x in args.items if "=" not in x]
    cfg = load_config(args.config or None, overrides).data
    if paths and len(paths) != 2:
        raise ConfigError(f"data convert takes SRC DST (got {len(paths)} paths: {paths})")
    jobs = [tuple(paths)] if paths else [(s, d) for s, d in ((cfg.train_dir, cfg.ffcv_train),
                                                              (cfg.val_dir, cfg.ffcv_val)) if s and d]
    if not jobs:
        raise ConfigError("nothing to convert: give SRC DST, or a config with data.train_dir and data.ffcv_train "
                          "(and/or data.val_dir and data.ffcv_val)")

    def pick(flag, key):
        return flag if flag is not None else getattr(cfg, key)

    options = dict(max_resolution=pick(args.max_side, "ffcv_max_resolution"),
                   jpeg_quality=pick(args.jpeg_quality, "ffcv_jpeg_quality"),
                   write_mode=pick(args.write_mode, "ffcv_write_mode"),
                   compress_probability=pick(args.compress_probability, "ffcv_compress_probability"),
                   workers=args.workers or os.cpu_count() or 1)
    for src, dst in jobs:
        meta = convert_image_folder(src, dst, **options)
        skipped = len(meta["skipped"])
        note = f", {skipped} unreadable skipped (listed in {dst}.json)" if skipped else ""
        print(f"{dst}: {meta['num_samples']} images in {len(meta['classes'])} classes, "
              f"{meta['bytes'] / 2**20:.1f} MiB, {meta['seconds']:.1f} s{note}")
    return 0


def _check(args) -> int:
    from guardx.data.folder import probe_images, scan_image_folder

    bad = 0
    for root in args.roots:
        samples, _ = scan_image_folder(root)
        paths = [p for p, _ in samples]
        results = probe_images(paths, workers=args.workers or os.cpu_count() or 1, desc=f"checking {root}")
        for path, result in zip(paths, results):
            if isinstance(result, str):
                bad += 1
                print(f"{path}\t{result}")
        print(f"{root}: {len(paths)} images, {sum(isinstance(r, str) for r in results)} unreadable", file=sys.stderr)
    return 1 if bad else 0
