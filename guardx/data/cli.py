"""``guardx data ...``: dataset tools.

    guardx data convert /data/imagenet/train /data/ffcv/train.beton --max-side 256 --jpeg-quality 90
    guardx data convert --config configs/imagenet1k.yaml data.ffcv_train=/data/ffcv/train.beton \\
                        data.ffcv_val=/data/ffcv/val.beton       # both splits: *_dir → ffcv_*
    guardx data check /data/imagenet/train                       # list every file no decoder can read
    guardx data check --config configs/imagenet1k.yaml data.train_dir=... data.val_dir=... data.val_labels=...
        # both splits: images per class, unreadable files, classes in one split but not the other
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


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
    c.add_argument("--eval-resize", type=int, metavar="S",
                   help="store images as torchvision's Resize(S) makes them (short side S), so the eval loader only "
                        "crops; 0 = off. Default: round(data.resolution / data.val_crop_ratio) for the val split "
                        "of --config, 0 for SRC DST")
    c.add_argument("--labels", metavar="FILE",
                   help="SRC DST: SRC is a flat folder labelled by FILE (data.val_labels formats); class order "
                        "from data.train_dir")
    c.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    c.set_defaults(handler=_convert)

    k = actions.add_parser("check", help="images per class, unreadable images, and classes in one split only",
                           description="With DIRs: each an ImageFolder tree. Without: data.train_dir and data.val_dir "
                                       "of --config (data.val_labels for a flat val folder). Prints the unreadable "
                                       "files (PATH<TAB>error) and a table of images per class; exits 1 if any file is "
                                       "unreadable or a class is in one split but not the other.")
    k.add_argument("items", nargs="*", metavar="DIR | section.key=value")
    k.add_argument("--config", "-c", action="append", default=[], metavar="FILE", help="YAML config (repeatable)")
    k.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    k.set_defaults(handler=_check)


def _convert(args) -> int:
    from guardx.config import load_config
    from guardx.data.ffcv import convert_image_folder
    from guardx.errors import ConfigError

    from dataclasses import replace

    from guardx.data.splits import resolve_split

    overrides = [x for x in args.items if "=" in x]
    paths = [x for x in args.items if "=" not in x]
    cfg = load_config(args.config or None, overrides).data
    if paths and len(paths) != 2:
        raise ConfigError(f"data convert takes SRC DST (got {len(paths)} paths: {paths})")
    eval_s = round(cfg.resolution / cfg.val_crop_ratio)
    if paths:  # SRC: a flat folder (--labels) or an ImageFolder, labelled by data.train_dir's classes when given
        src = paths[0]
        as_val = args.labels or (cfg.train_dir and Path(cfg.train_dir).resolve() != Path(src).resolve())
        split = resolve_split(replace(cfg, val_dir=src, val_labels=args.labels or ""), "val") if as_val else None
        jobs = [(src, paths[1], split, args.eval_resize or 0)]
    else:  # val images are labelled by the train classes, and stored resized for the eval transform
        jobs = []
        if cfg.train_dir and cfg.ffcv_train:
            jobs.append((cfg.train_dir, cfg.ffcv_train, None, 0))
        if cfg.val_dir and cfg.ffcv_val:
            jobs.append((cfg.val_dir, cfg.ffcv_val, resolve_split(cfg, "val"),
                         eval_s if args.eval_resize is None else args.eval_resize))
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
    for src, dst, split, eval_resize in jobs:
        meta = convert_image_folder(src, dst, split=split, eval_resize=eval_resize, **options)
        skipped = len(meta["skipped"])
        note = f", {skipped} unreadable skipped (listed in {dst}.json)" if skipped else ""
        stored = f", stored at short side {eval_resize} for eval" if eval_resize else ""
        print(f"{dst}: {meta['num_samples']} images in {len(meta['classes'])} classes, "
              f"{meta['bytes'] / 2**20:.1f} MiB, {meta['seconds']:.1f} s{note}{stored}")
    return 0


def _check(args) -> int:
    """Unreadable files (stdout, PATH<TAB>error), then a table of images per class (stdout), then a summary
    (stderr). Exit 1 on any unreadable file, class present in one split only, or label problem."""
    from guardx.config import load_config
    from guardx.data.folder import probe_images
    from guardx.data.splits import Split, class_display_names, resolve_split

    overrides = [x for x in args.items if "=" in x]
    roots = [x for x in args.items if "=" not in x]
    cfg = load_config(args.config or None, overrides).data
    splits: list[tuple[str, Split]] = []
    if roots:
        from guardx.data.folder import scan_image_folder

        for root in roots:
            samples, classes = scan_image_folder(root)
            splits.append((root, Split(root, samples, classes, "imagefolder")))
    else:
        if cfg.train_dir:
            splits.append(("train", resolve_split(cfg, "train")))
        if cfg.val_dir:
            classes = splits[0][1].classes if splits else None
            splits.append(("val", resolve_split(cfg, "val", classes, strict=False)))
        if not splits:
            from guardx.errors import ConfigError

            raise ConfigError("nothing to check: give ImageFolder DIRs, or a config with data.train_dir and/or "
                              "data.val_dir (+ data.val_labels for a flat val folder)")
    failed = False
    counts: dict[str, dict[str, int]] = {}
    summary = []
    for name, split in splits:
        paths = [p for p, _ in split.samples]
        results = probe_images(paths, workers=args.workers or os.cpu_count() or 1, desc=f"checking {split.root}")
        bad = [(p, r) for p, r in zip(paths, results) if isinstance(r, str)]
        for path, error in bad:
            print(f"{path}\t{error}")
        per_class = [0] * len(split.classes)
        for _, label in split.samples:
            per_class[label] += 1
        counts[name] = dict(zip(split.classes, per_class))
        present = [n for n in per_class if n]
        spread = f", {min(present)}-{max(present)} per class" if present else ""
        summary.append(f"{name} ({split.root}, {split.layout}): {len(paths)} images in {len(present)} classes"
                       f"{spread}, {len(bad)} unreadable")
        summary += [f"{name}: {problem}" for problem in split.problems]
        failed |= bool(bad or split.problems)
    if len(splits) == 2 and not roots:
        (a, ca), (b, cb) = counts.items()
        only_a = [c for c, n in ca.items() if n and not cb.get(c)]
        only_b = [c for c, n in cb.items() if n and not ca.get(c)]
        for where, only in ((a, only_a), (b, only_b)):
            if only:
                failed = True
                summary.append(f"{len(only)} classes have images in {where} only: {', '.join(only[:10])}"
                               + (" ..." if len(only) > 10 else ""))
    classes = list(dict.fromkeys(c for per in counts.values() for c in per))
    names = class_display_names(cfg, classes)
    print("class\t" + "\t".join(counts) + "\tname")
    for c, display in zip(classes, names):
        print(c + "\t" + "\t".join(str(per.get(c, 0)) for per in counts.values()) + f"\t{display}")
    for line in summary:
        print(line, file=sys.stderr)
    return 1 if failed else 0
