"""Loader throughput: images/s of the training pipeline (decode + RandomResizedCrop 224 + flip) per backend.

    python benchmarks/loaders.py            # the committed run: 2,560 JPEGs of ~500x375 (q90), all cores
    python benchmarks/loaders.py --smoke    # a tiny tree, one timed epoch, results under /tmp (checks the script)

What a number is. Batches of ``--batch`` exactly as ``guardx.data.build_loader`` hands them to the stages
(x float32 in [0, 1], (B, 3, 224, 224), contiguous; y int64), moved to the benchmark device, counted over
whole epochs (the last partial batch included) after one full warm-up epoch (numba JIT, worker start-up,
page cache). The files are then read from RAM: this measures decoding + augmentation + batching, not the
disk. Every backend gets the same ``--workers`` (worker processes for folder, decoding threads for FFCV and
DALI) and runs in a fresh process of its own, one after the other.

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

Results: ``<out>/<tag>.json`` (raw per-epoch rates, settings, machine) and ``<out>/<tag>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", default="/tmp/guardx-bench/jpeg-500x375", help="JPEG tree (generated once, reused)")
    p.add_argument("--images", type=int, default=2560, help="images in the tree (>= 2000 for the committed run)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", default="500x375", help="mean WxH of the JPEGs (each side jittered by ±25%%)")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {list(BACKENDS)}")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="worker processes / decoding threads, the same for every backend (default: all cores)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per backend, after one warm-up epoch")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="loaders", help="result file name (without extension)")
    p.add_argument("--smoke", action="store_true", help="tiny tree, 1 timed epoch, results to /tmp")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one backend, print its result as JSON
    args = p.parse_args(argv)
    if args.smoke:
        args.tree, args.images, args.classes, args.size = "/tmp/guardx-bench/smoke-160x120", 48, 4, "160x120"
        args.batch, args.epochs, args.out, args.tag = 16, 1, "/tmp/guardx-bench/results", "loaders-smoke"
    return args


# ------------------------------------------------------------------------------------------- child


def run_one(spec: dict) -> dict:
    """Build the backend's train loader; one warm-up epoch, then ``epochs`` timed epochs."""
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


# -------------------------------------------------------------------------------------------- main


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
    import numpy
    import PIL
    import torch
    import torchvision

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu": platform.processor(),
            "cpu_count": os.cpu_count(), "cores_available": len(os.sched_getaffinity(0)),
            "load_avg_at_start": [round(v, 2) for v in os.getloadavg()], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pillow": PIL.__version__, "numpy": numpy.__version__,
            "device": device}
    try:
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                           if ln.startswith("model name"))
        mem_kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal"))
        info["memory_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    from importlib.metadata import PackageNotFoundError, version

    for name in ("ffcv", "numba", "opencv-python", "nvidia-dali-cuda130"):
        try:
            info[name] = version(name)  # distribution versions (ffcv 1.0.2 calls itself 0.0.3rc1)
        except PackageNotFoundError:
            info[name] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
        info["git"] = rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
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
        "Produced by `python benchmarks/loaders.py` (see its docstring for what each number includes).", "",
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
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in m.items() if v is not None), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_one(json.loads(args.child))))
        return 0
    import torch

    from guardx.utils.io import write_json, write_text

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backends {unknown}; choose from {list(BACKENDS)}")
    machine = machine_info(device)  # load average before this script adds its own
    print(f"tree {args.tree}: {args.images} JPEGs of ~{args.size}", file=sys.stderr)
    tree = ensure_tree(args)
    betons = {b: ensure_beton(args, BACKENDS[b]["max_side"]) for b in names if BACKENDS[b]["backend"] == "ffcv"}
    runs = {}
    for name in names:
        spec = {"backend": BACKENDS[name]["backend"], "tree": args.tree, "beton": betons.get(name, {}).get("path", ""),
                "workers": args.workers, "batch": args.batch, "resolution": args.resolution, "epochs": args.epochs,
                "device": device}
        print(f"{name}: warm-up epoch + {args.epochs} timed epochs ...", file=sys.stderr)
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["?"]
            runs[name] = {"error": tail[0][:200]}
            print(f"{name}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {runs[name]['median_images_per_s']:.0f} images/s {runs[name]['images_per_s']}", file=sys.stderr)
    result = {"settings": {k: getattr(args, k) for k in ("workers", "batch", "resolution", "epochs", "backends")}
              | {"device": device}, "tree": tree, "betons": betons, "backends": runs, "machine": machine,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    ok = {k: v for k, v in runs.items() if "error" not in v}
    if "folder" in ok and len(ok) > 1:
        fastest = max(ok, key=lambda k: ok[k]["median_images_per_s"])
        ratio = ok[fastest]["median_images_per_s"] / ok["folder"]["median_images_per_s"]
        result["goal"] = {"fastest": fastest, "ratio": round(ratio, 2), "met": ratio >= 2.0}
    out = Path(args.out)
    write_json(result, out / f"{args.tag}.json")
    write_text(render_markdown(result), out / f"{args.tag}.md")
    print(render_markdown(result))
    return 0 if len(ok) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
