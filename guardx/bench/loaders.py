"""Loader throughput: images/s of the training pipeline (decode + RandomResizedCrop 224 + flip) per backend.

    guardx bench loaders            # the committed run: 2,560 JPEGs of ~500x375 (q90), all cores
    guardx bench loaders --smoke    # a tiny tree, one timed epoch, results under /tmp (checks the command)

What a number is. Batches of ``--batch`` exactly as ``guardx.data.build_loader`` hands them to the stages
(x float32 in [0, 1], (B, 3, 224, 224), contiguous; y int64), moved to the benchmark device, counted over
whole epochs (the last partial batch included) after one full warm-up epoch (numba JIT, worker start-up,
page cache). The files are then read from RAM: this measures decoding + augmentation + batching, not the
disk. Every backend gets the same ``--workers`` (worker processes for folder, decoding threads for FFCV and
DALI) and runs in a fresh process of its own (``measure.run_isolated``), one after the other.

Backends
    folder     PIL decodes the full-size JPEG, torchvision RandomResizedCrop + flip + ToTensor, in worker
               processes; batches cross to the main process through shared memory (the reference).
    ffcv       .beton from ``guardx data convert --max-side 256`` (JPEG q90), the FFCV ImageNet recipe: the
               loader decodes 256x192 JPEGs instead of 500x375 ones. That pre-resizing is most of its
               speed, and the model sees crops of the 256-px versions (a one-off conversion, timed separately).
    ffcv-full  .beton at full size (``--max-side 0``, re-encoded at q90): the same pixels the folder backend
               decodes, which isolates FFCV's pipeline (numba threads, libjpeg-turbo, OpenCV, no IPC).
    dali       DALI on the CPU (``device_id=None``), or nvJPEG (``mixed``) with ``--device cuda``:
               ``decoders.image_random_crop`` decodes only the crop window, then DALI's resize and
               crop_mirror_normalize.

The measurement goes through ``guardx.data.build_loader`` only; the data package's public helpers make
the inputs (``guardx.data.synthetic.write_jpeg_tree``, ``guardx.data.ffcv.convert_image_folder``, as
``guardx data convert`` does). Results: ``<out>/<tag>.json`` (raw per-epoch rates, settings, machine) and
``<out>/<tag>.md``.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from guardx.bench.measure import load_average, run_isolated
from guardx.errors import GuardxError
from guardx.utils.io import write_json, write_text

BACKENDS = {
    "folder": dict(backend="folder"),
    "ffcv": dict(backend="ffcv", max_side=256),
    "ffcv-full": dict(backend="ffcv", max_side=0),
    "dali": dict(backend="dali"),
}
WHAT = {
    "folder": "PIL decode of the full JPEG, torchvision RRC+flip, worker processes",
    "ffcv": ".beton at max side 256 (JPEG q90): decodes ~256x192 JPEGs, numba threads",
    "ffcv-full": ".beton at full size (JPEG q90): same pixels as folder, numba threads",
    "dali": "DALI, crop-window JPEG decode (fused RRC), DALI threads",
}


def run_one(spec: dict) -> dict:
    """Build the backend's train loader; one warm-up epoch, then ``epochs`` timed epochs (own process)."""
    import torch

    from guardx.config import load_config
    from guardx.data import build_loader

    device = torch.device(spec["device"])
    cfg = load_config(None, [
        "data.dataset=imagefolder", f"data.backend={spec['backend']}", f"data.resolution={spec['resolution']}",
        f"data.workers={spec['workers']}", f"data.train_dir={spec['tree']}", f"data.ffcv_train={spec.get('beton', '')}",
        "data.rrc_scale=[0.08,1.0]", "data.flip=true"]).data

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    loader = build_loader(cfg, "train", 0, 1, batch_size=spec["batch"], seed=0, device=device)
    build_s = time.perf_counter() - t0

    def epoch(e: int) -> tuple[int, float]:
        loader.set_epoch(e)
        sync()
        start, n = time.perf_counter(), 0
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            n += y.shape[0]
        sync()
        assert x.shape[1:] == (3, spec["resolution"], spec["resolution"]) and x.dtype == torch.float32
        return n, time.perf_counter() - start

    warm_n, warm_s = epoch(0)
    rates, seconds = [], []
    for e in range(1, spec["epochs"] + 1):
        n, s = epoch(e)
        assert n == warm_n == loader.num_samples, (n, warm_n, loader.num_samples)
        rates.append(n / s)
        seconds.append(s)
    return {"images_per_epoch": warm_n, "build_s": round(build_s, 3), "warmup_epoch_s": round(warm_s, 3),
            "epoch_s": [round(s, 3) for s in seconds], "images_per_s": [round(r, 1) for r in rates],
            "median_images_per_s": round(statistics.median(rates), 1),
            "torch_threads": torch.get_num_threads()}


def ensure_tree(args) -> dict:
    from guardx.data.synthetic import write_jpeg_tree

    w, h = (int(v) for v in args.size.split("x"))
    per_class = -(-args.images // args.classes)
    t0 = time.perf_counter()
    # noise/detail: ~95 KB per 500x375 file at q90, the size (= entropy-decoding work) of an average ImageNet JPEG
    write_jpeg_tree(args.tree, classes=args.classes, per_class=per_class, size=(w, h), quality=args.quality,
                    noise=32, detail=40, seed=0)
    files = sorted(Path(args.tree).glob("*/*.jpg"))
    sizes = [f.stat().st_size for f in files]
    return {"path": args.tree, "images": len(files), "classes": args.classes, "mean_size": args.size,
            "size_jitter": 0.25, "jpeg_quality": args.quality, "mean_file_kb": round(sum(sizes) / len(sizes) / 1024, 1),
            "generate_s": round(time.perf_counter() - t0, 1)}


def ensure_beton(args, max_side: int) -> dict:
    from guardx.data.ffcv import convert_image_folder, read_meta

    beton = Path(args.tree).with_name(f"{Path(args.tree).name}-max{max_side}.beton")
    want = {"max_resolution": max_side, "jpeg_quality": args.quality, "write_mode": "jpg"}
    try:
        meta = read_meta(beton)
        fresh = all(meta["settings"][k] == v for k, v in want.items()) and meta["num_samples"] == len(
            list(Path(args.tree).glob("*/*.jpg")))
    except Exception:  # noqa: BLE001  (missing or stale: convert again)
        fresh = False
    if not fresh:
        meta = convert_image_folder(args.tree, beton, max_resolution=max_side, jpeg_quality=args.quality,
                                    write_mode="jpg", workers=args.workers)
    return {"path": str(beton), "bytes": meta["bytes"], "convert_s": meta["seconds"], **want}


def machine_info(device: str) -> dict:
    """The common environment record plus the decoding libraries' versions and the load average."""
    from importlib.metadata import PackageNotFoundError, version

    from guardx.utils.env import environment

    info = environment(device) | {"load_avg_at_start": load_average()}
    for name in ("torchvision", "pillow", "numpy", "ffcv", "numba", "opencv-python", "nvidia-dali-cuda130"):
        try:
            info[name] = version(name)  # distribution versions (ffcv 1.0.2 calls itself 0.0.3rc1)
        except PackageNotFoundError:
            info[name] = None
    return info


def render_markdown(result: dict) -> str:
    s, m, runs = result["settings"], result["machine"], result["backends"]
    lines = [
        "# Loader throughput (training pipeline: decode + RandomResizedCrop "
        f"{s['resolution']} + flip)", "",
        f"{result['tree']['images']} synthetic JPEGs, mean {result['tree']['mean_size']} (±25 % per side), "
        f"quality {result['tree']['jpeg_quality']}, {result['tree']['mean_file_kb']} KB per file on average; "
        f"batch {s['batch']}, {s['workers']} workers/threads per backend, device {s['device']}; "
        f"{s['epochs']} timed epochs after one warm-up epoch, files in the page cache. "
        "Produced by `guardx bench loaders` (see guardx/bench/loaders.py for what each number includes).", "",
        "| backend | what it does | images/s (median) | per epoch | vs folder |",
        "|---|---|---:|---|---:|",
    ]
    base = runs.get("folder", {}).get("median_images_per_s")
    for name, r in runs.items():
        if "error" in r:
            lines.append(f"| {name} | {WHAT[name]} | failed: {r['error']} | | |")
            continue
        ratio = f"{r['median_images_per_s'] / base:.2f}x" if base else "n/a"
        lines.append(f"| {name} | {WHAT[name]} | {r['median_images_per_s']:.0f} | "
                     f"{', '.join(f'{v:.0f}' for v in r['images_per_s'])} | {ratio} |")
    if result.get("goal"):
        g = result["goal"]
        lines += ["", f"Fastest: **{g['fastest']}** at {g['ratio']:.2f}x the folder backend "
                      f"(goal >= 2x: {'met' if g['met'] else 'NOT met'})."]
    if result.get("betons"):
        lines += ["", "FFCV files (one-off conversion with `guardx data convert`, "
                      f"{s['workers']} processes): " + "; ".join(
                          f"max side {b['max_resolution']}: {b['bytes'] / 2**20:.0f} MiB in {b['convert_s']:.0f} s"
                          for b in result["betons"].values())]
    keys = ("device_name", "cpu_count", "torch", "torchvision", "pillow", "numpy", "ffcv", "numba", "opencv-python",
            "nvidia-dali-cuda130", "git_revision", "load_avg_at_start")
    lines += ["", "Machine: " + ", ".join(f"{k} {m[k]}" for k in keys if m.get(k) is not None), ""]
    return "\n".join(lines)


def run_loaders(args, progress=print) -> dict:
    import torch

    if args.smoke:
        args.tree, args.images, args.classes, args.size = "/tmp/guardx-bench/smoke-160x120", 48, 4, "160x120"
        args.batch, args.epochs, args.out, args.name = 16, 1, "/tmp/guardx-bench/results", "loaders-smoke"
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise GuardxError(f"unknown loader backends {unknown or args.backends!r}; choose from {list(BACKENDS)}")
    machine = machine_info(device)  # load average before this command adds its own
    progress(f"tree {args.tree}: {args.images} JPEGs of ~{args.size}")
    tree = ensure_tree(args)
    betons = {b: ensure_beton(args, BACKENDS[b]["max_side"]) for b in names if BACKENDS[b]["backend"] == "ffcv"}
    runs = {}
    for name in names:
        spec = {"backend": BACKENDS[name]["backend"], "tree": args.tree, "beton": betons.get(name, {}).get("path", ""),
                "workers": args.workers, "batch": args.batch, "resolution": args.resolution, "epochs": args.epochs,
                "device": device}
        progress(f"{name}: warm-up epoch + {args.epochs} timed epochs ...")
        try:
            runs[name] = run_isolated("guardx.bench.loaders:run_one", spec)
        except GuardxError as e:
            runs[name] = {"error": str(e)[:200]}
            progress(f"{name}: FAILED: {e}")
            continue
        progress(f"{name}: {runs[name]['median_images_per_s']:.0f} images/s {runs[name]['images_per_s']}")
    result = {"settings": {k: getattr(args, k) for k in ("workers", "batch", "resolution", "epochs", "backends")}
              | {"device": device}, "tree": tree, "betons": betons, "backends": runs, "machine": machine,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    ok = {k: v for k, v in runs.items() if "error" not in v}
    if "folder" in ok and len(ok) > 1:
        fastest = max(ok, key=lambda k: ok[k]["median_images_per_s"])
        ratio = ok[fastest]["median_images_per_s"] / ok["folder"]["median_images_per_s"]
        result["goal"] = {"fastest": fastest, "ratio": round(ratio, 2), "met": ratio >= 2.0}
    out = Path(args.out)
    write_json(result, out / f"{args.name}.json")
    write_text(render_markdown(result), out / f"{args.name}.md")
    result["files"] = [str(out / f"{args.name}.json"), str(out / f"{args.name}.md")]
    if len(ok) != len(runs):
        raise GuardxError(f"loader backend(s) {sorted(set(runs) - set(ok))} failed (results written to {args.out})")
    return result
