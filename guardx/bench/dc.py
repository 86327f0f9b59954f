"""DC vs GUARD(DC) throughput, and what vectorising the classes buys: one process, methods timed round-robin.

    python -m guardx.bench.dc --device cuda                     # CIFAR-10 shape: 10 classes, 32 px, width 128, ipc 10
    python -m guardx.bench.dc --device cpu --width 32 --resolution 16 --batch-real 64 --repeats 3

The timed unit is one DC outer iteration (:meth:`guardx.distill.dc.GradientMatching.step`): a fresh θ₀,
``outer_loop`` synthetic updates (every class: the objective's real gradient on ``batch_real`` images, the
synthetic double backward, the image step) and ``inner_loop`` epochs of network training between them.
Real images are random pixels (the cost does not depend on their content). Each method owns its own
synthetic set; after one untimed warm-up iteration each, the methods take turns, one iteration per turn
(round-robin), so a change of machine load hits all of them alike. Reported per method: s/iteration
(mean ± sample std over the turns), real images matched per second (C · batch_real · outer_loop / s),
and the FLOPs of one iteration (``torch.utils.flop_counter``; the GUARD row kernels are not counted) so
each measured ratio has its FLOP ratio beside it.

Methods: ``dc`` (plain CE, classes vectorised — the default), ``dc_loop`` (one class at a time),
``guard_dc`` / ``guard_dc_loop`` (GUARD exact, eq. 11), ``guard_dc_lossdiff`` (GUARD's first-order mode).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

# the timing helpers at this branch point (another engineer renames the module to guardx.bench.measure)
from guardx.bench.measure import Timer, device_tag, environment, resolve_device, save_result, summary, synchronize

METHODS = {  # name -> (objective name, objective params, batched, label)
    "dc": ("plain", {}, True, "DC (classes vectorised)"),
    "dc_loop": ("plain", {}, False, "DC (per-class loop)"),
    "guard_dc": ("guard", {"mode": "exact"}, True, "GUARD(DC), exact (classes vectorised)"),
    "guard_dc_loop": ("guard", {"mode": "exact"}, False, "GUARD(DC), exact (per-class loop)"),
    "guard_dc_lossdiff": ("guard", {"mode": "lossdiff"}, True, "GUARD(DC), lossdiff (classes vectorised)"),
}


def _build(name: str, spec: dict, device: torch.device):
    from guardx.data.dsa import DSA
    from guardx.distill.dc import GradientMatching
    from guardx.models import create_model
    from guardx.objectives import build_objective

    obj_name, params, batched, _ = METHODS[name]
    C, R, n = spec["classes"], spec["resolution"], spec["batch_real"]
    gen = torch.Generator().manual_seed(0)
    real = [torch.rand(n, 3, R, R, generator=gen) for _ in range(C)]

    def model_fn():
        return create_model("convnet", num_classes=C, width=spec["width"], resolution=R,
                            mean=[0.4914, 0.4822, 0.4465], std=[0.2023, 0.1994, 0.2010])

    return GradientMatching(real, model_fn, build_objective(obj_name, **params), ipc=spec["ipc"],
                            outer_loop=spec["outer_loop"], inner_loop=spec["inner_loop"], batch_real=n,
                            dsa=DSA() if spec["dsa"] else None, batched=batched, device=device)


class _NoModuleTracking:
    """FlopCounterMode's per-module attribution hooks break ``torch.autograd.grad`` inside a backward (GUARD's
    double backprop); only the total is needed here."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def _flops(gm) -> int | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        counter.mod_tracker = _NoModuleTracking()
        with counter:
            gm.step()
        return int(counter.get_total_flops())
    except Exception:  # a transform the counter cannot follow: report no FLOPs rather than fail the benchmark
        return None


def measure(spec: dict) -> dict:
    device = torch.device(spec["device"])
    threads = torch.get_num_threads()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        gms = {m: _build(m, spec, device) for m in spec["methods"]}
        flops = {m: _flops(gm) for m, gm in gms.items()}  # also the warm-up iteration
        for _ in range(spec["warmup"]):
            for gm in gms.values():
                gm.step()
        synchronize(device)
        times: dict[str, list[float]] = {m: [] for m in gms}
        load = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
        timer = Timer(device)
        for _ in range(spec["repeats"]):  # round-robin: one iteration of each method per turn
            for m, gm in gms.items():
                timer.start()
                gm.step()
                times[m].append(timer.stop())
            if hasattr(os, "getloadavg"):
                load.append(os.getloadavg()[0])
        env = environment(device)
    finally:
        torch.set_num_threads(threads)
    real_per_it = spec["classes"] * spec["batch_real"] * spec["outer_loop"]
    methods = {}
    for m, ts in times.items():
        s = summary(ts)
        methods[m] = {"label": METHODS[m][3], "s_per_iter": ts, "s_per_iter_mean": s["mean"],
                      "s_per_iter_std": s["std"], "real_img_per_s": real_per_it / s["mean"],
                      "syn_img_updates_per_s": spec["classes"] * spec["ipc"] * spec["outer_loop"] / s["mean"],
                      "flops_per_iter": flops[m]}
    return {"spec": spec, "methods": methods, "ratios": _ratios(methods), "load_avg_1min": load, "env": env}


def _ratios(methods: dict) -> list[dict]:
    pairs = [("guard_dc", "dc", "GUARD(DC) exact overhead over DC"),
             ("guard_dc_lossdiff", "dc", "GUARD(DC) lossdiff overhead over DC"),
             ("guard_dc_loop", "dc_loop", "GUARD(DC) exact overhead over DC, per-class loops"),
             ("dc_loop", "dc", "DC: per-class loop / classes vectorised"),
             ("guard_dc_loop", "guard_dc", "GUARD(DC): per-class loop / classes vectorised")]
    out = []
    for a, b, what in pairs:
        if a in methods and b in methods:
            fa, fb = methods[a]["flops_per_iter"], methods[b]["flops_per_iter"]
            out.append({"what": what, "time_ratio": methods[a]["s_per_iter_mean"] / methods[b]["s_per_iter_mean"],
                        "flop_ratio": fa / fb if fa and fb else None})
    return out


def markdown(result: dict) -> str:
    spec, env = result["spec"], result["env"]
    load = result["load_avg_1min"]
    load_text = (f" 1-min load average during the run: {min(load):.1f}–{max(load):.1f} on {env['cpu_count']} CPUs."
                 if load else "")
    lines = [f"# DC and GUARD(DC) throughput — {env['device_name']}", "",
             f"torch {env['torch']} · {env['threads']} threads · git {env['git_revision']} · {env['timestamp_utc']}",
             "",
             f"{spec['classes']} classes, {spec['resolution']} px, ConvNet width {spec['width']} (instance norm), "
             f"ipc {spec['ipc']}, outer_loop {spec['outer_loop']}, inner_loop {spec['inner_loop']}, "
             f"batch_real {spec['batch_real']}, DSA {'on' if spec['dsa'] else 'off'}. One timed unit = one DC "
             f"iteration; {spec['warmup']} warm-up + {spec['repeats']} timed iterations per method, round-robin."
             + load_text, "",
             "| Method | s / iteration | real img/s | syn img updates/s | GFLOP / iteration |",
             "|---|---|---:|---:|---:|"]
    for m in result["methods"].values():
        gf = f"{m['flops_per_iter'] / 1e9:.2f}" if m["flops_per_iter"] else "n/a"
        lines.append(f"| {m['label']} | {m['s_per_iter_mean']:.4g} ± {m['s_per_iter_std']:.2g} | "
                     f"{m['real_img_per_s']:.0f} | {m['syn_img_updates_per_s']:.1f} | {gf} |")
    lines += ["", "| Ratio | measured | FLOP ratio |", "|---|---:|---:|"]
    for r in result["ratios"]:
        fr = f"{r['flop_ratio']:.2f}×" if r["flop_ratio"] else "n/a"
        lines.append(f"| {r['what']} | {r['time_ratio']:.2f}× | {fr} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m guardx.bench.dc", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--outer-loop", type=int, default=2, help="synthetic updates per timed iteration")
    p.add_argument("--inner-loop", type=int, default=1, help="network epochs between synthetic updates")
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--no-dsa", action="store_true", help="time without DSA (default: with)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; known: {', '.join(METHODS)}")
    device = resolve_device(args.device)
    spec = {"device": str(device), "threads": args.threads, "methods": methods, "classes": args.classes,
            "resolution": args.resolution, "width": args.width, "ipc": args.ipc, "outer_loop": args.outer_loop,
            "inner_loop": args.inner_loop, "batch_real": args.batch_real, "dsa": not args.no_dsa,
            "warmup": args.warmup, "repeats": args.repeats}
    result = measure(spec)
    text = markdown(result)
    stem = args.name or f"dc-{device_tag(device)}-c{args.classes}-r{args.resolution}-w{args.width}-ipc{args.ipc}"
    files = save_result(args.out, stem, result, text)
    print(text)
    print("wrote " + ", ".join(map(str, files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
