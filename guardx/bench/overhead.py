"""Table 4: seconds per squeeze iteration and peak memory, per objective, and how they grow.

    guardx bench overhead --model resnet18 --batch-size 32 --resolution 224 --repeats 5 --iters 20
    guardx bench sweep --batch-sizes 8,16,32,64,128 --resolutions 32,64,112,224

One iteration is exactly what ``guardx squeeze`` runs per batch: ``Engine(ObjectiveStep(model,
objective))`` forward (the objective's passes), backward, SGD step (momentum 0.9, weight decay), with
the model in train mode (BatchNorm batch statistics for the cross-entropy term). Excluded: data
loading (one fixed random batch already on the device) and checkpointing. Each method runs in a
fresh process (``--isolate process``, default): warm-up steps (cuDNN autotuning, allocator growth),
then ``repeats`` blocks of ``iters`` steps, each block timed as a whole; s/iter is reported as
mean ± sample std over the blocks. Peak memory covers the timed blocks (see ``_measure``).

Besides guardx's methods, two BASELINES (``guardx/bench/baselines.py``, not product code) time
straightforward implementations of the same regularisers, so the run also measures what guardx's
shared passes and early freeing buy.
"""
from __future__ import annotations

import gc
import math
from pathlib import Path

import torch

from guardx.bench._measure import (current_memory_mib, device_tag, environment, memory_kind, peak_memory_mib,
                                   reset_peak_memory, resolve_device, run_isolated, save_result, summary,
                                   synchronize, timed_repeats)
from guardx.bench.methods import BASELINE_OF, METHODS, OPTIONAL_METHODS, PAPER_TABLE4, TARGETS
from guardx.errors import GuardxError

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def parse_eps(text: str | float) -> float:
    """``1/255`` or ``0.0039`` → float."""
    from guardx.utils.misc import parse_fraction

    try:
        return parse_fraction(text)
    except ValueError as e:
        raise GuardxError(str(e)) from None


def method_label(name: str, spec: dict) -> str:
    label = {**METHODS, **OPTIONAL_METHODS}[name]
    return label.format(k=spec["pgd_steps"])


def build_method(name: str, spec: dict):
    """The objective callable timed for ``name``."""
    from guardx.bench.baselines import NaiveExact, OfficialLossDiff
    from guardx.objectives import build_objective

    if name == "plain":
        return build_objective("plain")
    if name in ("guard_exact", "guard_lossdiff", "guard_cure"):
        return build_objective("guard", mode=name.split("_", 1)[1])
    if name == "adv":
        return build_objective("adv", steps=spec["pgd_steps"], eps=spec["pgd_eps"], alpha=spec["pgd_alpha"])
    if name == "gradnorm":
        return build_objective("gradnorm")
    if name == "ref_lossdiff_4fwd":
        return OfficialLossDiff()
    if name == "ref_exact_naive":
        return NaiveExact()
    raise GuardxError(f"unknown benchmark method {name!r}; known: {', '.join([*METHODS, *OPTIONAL_METHODS])}")


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    known = {**METHODS, **OPTIONAL_METHODS}
    bad = [m for m in names if m not in known]
    if bad or not names:
        raise GuardxError(f"unknown benchmark method(s) {bad or text!r}; known: {', '.join(known)}")
    return names


# ---------------------------------------------------------------- the worker (one method, one process)
def measure_method(spec: dict) -> dict:
    """Time ``spec["method"]`` at every (batch size, resolution) in ``spec["points"]``."""
    from guardx.kernels import kernel_backend

    device = torch.device(spec["device"])
    threads, autotune = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:  # process-wide settings, restored for callers that measure in-process (--isolate none)
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = spec.get("cudnn_benchmark", True)
        with kernel_backend(spec.get("kernels", "auto")):
            points = [_measure_point(spec, int(bs), int(res), device) for bs, res in spec["points"]]
            env = environment(device)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = autotune
    return {"method": spec["method"], "points": points, "env": env}


def _measure_point(spec: dict, batch_size: int, resolution: int, device: torch.device) -> dict:
    from guardx.distributed.engine import Engine
    from guardx.models import create_model
    from guardx.objectives import ObjectiveStep

    point = {"batch_size": batch_size, "resolution": resolution}
    try:
        torch.manual_seed(spec.get("seed", 0))
        model = create_model(spec["model"], num_classes=spec["num_classes"], width=spec.get("width") or None,
                             resolution=resolution, mean=IMAGENET_MEAN, std=IMAGENET_STD).to(device).train()
        if spec.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        # lr only has to keep the weights finite over the timed steps; the step's cost does not depend on it
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
        engine = Engine(ObjectiveStep(model, build_method(spec["method"], spec)), opt,
                        precision=spec.get("precision", "fp32"), device=device)
        x = torch.rand(batch_size, 3, resolution, resolution, device=device)
        y = torch.randint(0, spec["num_classes"], (batch_size,), device=device)
        if spec.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        last = {}

        def step() -> None:
            loss, stats = engine(x, y)  # stats: one host sync per step, as in the real loop
            engine.backward(loss)
            engine.step()
            last.update(stats)

        for _ in range(spec["warmup"]):
            step()
        synchronize(device)
        static = current_memory_mib(device)  # weights, optimiser state, the batch (+ cached heap on CPU)
        reset_peak_memory(device)
        times = timed_repeats(step, device, warmup=0, repeats=spec["repeats"], iters=spec["iters"])
        peak = peak_memory_mib(device)
        point.update(s_per_iter=times, **{f"s_per_iter_{k}": v for k, v in summary(times).items()},
                     peak_mem_mib=peak, static_mem_mib=static, step_mem_mib=peak - static,
                     img_per_s=batch_size / summary(times)["mean"])
        loss = last.get("loss")
        point["loss_finite"] = loss is not None and math.isfinite(loss)
        point["final_loss"] = loss if point["loss_finite"] else None
    except torch.cuda.OutOfMemoryError:
        point.update(error="out of memory")
    finally:
        model = engine = opt = x = y = None  # free before the next point
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return point


# ---------------------------------------------------------------- orchestration
def collect(spec: dict, methods: list[str], isolate: str, progress=print) -> tuple[dict, dict]:
    """Measure each method (in its own process unless ``isolate == "none"``); returns (results, env)."""
    from guardx.bench._measure import call_target

    results, env = {}, {}
    for name in methods:
        progress(f"  measuring {name} ...")
        one = dict(spec, method=name)
        out = run_isolated("guardx.bench.overhead:measure_method", one) if isolate == "process" else \
            call_target("guardx.bench.overhead:measure_method", one)
        results[name] = out["points"]
        env = out["env"]
    return results, env


def base_spec(args, device: torch.device) -> dict:
    return {"model": args.model, "num_classes": args.num_classes, "width": args.width, "device": str(device),
            "warmup": args.warmup, "repeats": args.repeats, "iters": args.iters, "threads": args.threads,
            "pgd_steps": args.pgd_steps, "pgd_eps": parse_eps(args.pgd_eps), "pgd_alpha": parse_eps(args.pgd_alpha),
            "kernels": args.kernels, "precision": args.precision, "cudnn_benchmark": not args.no_cudnn_benchmark,
            "channels_last": args.channels_last, "seed": 0}


def _validate(args) -> None:
    for key in ("repeats", "iters"):
        if getattr(args, key) < 1:
            raise GuardxError(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        raise GuardxError(f"--warmup must be >= 0, got {args.warmup}")


def ratios(methods: dict, ref: str = "plain") -> None:
    """Add time/memory ratios to ``ref`` (and to each guardx method's baseline) in place."""
    base = methods.get(ref)
    for name, m in methods.items():
        if "error" in m:
            continue
        if base and "error" not in base:
            m["time_x_plain"] = m["s_per_iter_mean"] / base["s_per_iter_mean"]
            m["mem_x_plain"] = m["peak_mem_mib"] / base["peak_mem_mib"]
            m["step_mem_x_plain"] = m["step_mem_mib"] / base["step_mem_mib"] if base["step_mem_mib"] > 0 else None
        ref_name = BASELINE_OF.get(name)
        if ref_name in methods and "error" not in methods[ref_name]:
            b = methods[ref_name]
            m["time_x_baseline"] = m["s_per_iter_mean"] / b["s_per_iter_mean"]
            m["mem_x_baseline"] = m["peak_mem_mib"] / b["peak_mem_mib"]


def check_targets(methods: dict, pgd_steps: int) -> list[dict]:
    out = []
    for text, a, b, what, op, limit in TARGETS:
        if a not in methods or b not in methods or "error" in methods[a] or "error" in methods[b]:
            continue
        if a == "adv" and pgd_steps != 10:
            continue  # the targets compare against PGD-10
        key = "s_per_iter_mean" if what == "time" else "peak_mem_mib"
        value = methods[a][key] / methods[b][key]
        out.append({"target": text, "measured": value, "limit": limit, "op": op,
                    "met": value <= limit if op == "<=" else value >= limit})
    return out


def run_overhead(args, progress=print) -> dict:
    _validate(args)
    device = resolve_device(args.device)
    methods = parse_methods(args.methods)
    spec = base_spec(args, device)
    spec["points"] = [[args.batch_size, args.resolution]]
    raw, env = collect(spec, methods, args.isolate, progress)
    table = {}
    for name in methods:
        point = raw[name][0]
        table[name] = {"label": method_label(name, spec), "kind": "baseline" if name.startswith("ref_") else "guardx",
                       **point}
    ratios(table)
    result = {"benchmark": "overhead", "env": env, "memory_measure": memory_kind(device),
              "isolation": "fresh process per method" if args.isolate == "process" else "one process",
              "config": {k: v for k, v in spec.items() if k != "points"} | {
                  "batch_size": args.batch_size, "resolution": args.resolution, "methods": methods,
                  "optimizer": "SGD(lr=1e-4, momentum=0.9, weight_decay=1e-4)", "data": "one fixed random batch",
                  "model_mode": "train"},
              "methods": table, "targets": check_targets(table, args.pgd_steps), "paper_table4": PAPER_TABLE4}
    stem = args.name or f"overhead-{device_tag(device)}-{args.model}-bs{args.batch_size}-r{args.resolution}"
    md = render_overhead(result)
    json_path, md_path = save_result(args.out, stem, result, md)
    result["files"] = [str(json_path), str(md_path)]
    return result


def _fmt_time(m: dict) -> str:
    return f"{m['s_per_iter_mean']:.4g} ± {m['s_per_iter_std']:.3e}"


def _fmt_x(v) -> str:
    return "" if v is None else f"{v:.2f}×"


def render_overhead(result: dict) -> str:
    env, cfg = result["env"], result["config"]
    lines = [f"# Overhead per squeeze iteration: {cfg['model']}, batch {cfg['batch_size']}, "
             f"{cfg['resolution']} px — {env['device_name']}", "",
             f"torch {env['torch']} · CUDA {env.get('cuda')} · triton {env.get('triton')} · kernels "
             f"{env.get('kernels_backend')} · {env['threads']} threads · git {env.get('git_revision')} · "
             f"{env['timestamp_utc']}", "",
             f"{cfg['repeats']} repeats × {cfg['iters']} iterations after {cfg['warmup']} warm-up; s/iter = mean ± "
             f"sample std over repeats. Memory: {result['memory_measure']} ({result['isolation']}). "
             f"{cfg['num_classes']} classes, {cfg['precision']}, {cfg['data']}, {cfg['optimizer']}, "
             f"PGD ε = {cfg['pgd_eps']:.4g}, "
             f"α = {cfg['pgd_alpha']:.4g}.", "",
             "| Method | Time (s) / Iter | Peak Mem | time × plain | mem × plain | step mem (peak − static) |",
             "|---|---|---|---|---|---|"]
    for m in result["methods"].values():
        label = f"*{m['label']}*" if m["kind"] == "baseline" else m["label"]
        if "error" in m:
            lines.append(f"| {label} | {m['error']} | | | | |")
            continue
        if not m.get("loss_finite", True):
            label += " (loss went non-finite: timing of NaN arithmetic)"
        lines.append(f"| {label} | {_fmt_time(m)} | {m['peak_mem_mib']:.0f} MiB | {_fmt_x(m.get('time_x_plain'))} | "
                     f"{_fmt_x(m.get('mem_x_plain'))} | {m['step_mem_mib']:.0f} MiB |")
    vs = [(m, result["methods"][BASELINE_OF[n]]) for n, m in result["methods"].items()
          if n in BASELINE_OF and "time_x_baseline" in m]
    if vs:
        lines += ["", "guardx vs the straightforward implementation of the same regulariser (same run):", ""]
        lines += [f"- {m['label']}: {m['time_x_baseline']:.2f}× the time and {m['mem_x_baseline']:.2f}× the peak "
                  f"memory of *{b['label']}*" for m, b in vs]
    if result["targets"]:
        lines += ["", "| Target (ratio in this run) | Measured | Met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']:.2f}× | {'yes' if t['met'] else 'NO'} |" for t in result["targets"]]
    p = result["paper_table4"]
    lines += ["", f"Paper, Table 4 ({p['device']}, batch {p['batch_size']}): GUARD {p['GUARD']['s_per_iter']} ± "
                  f"{p['GUARD']['std']} s/iter, {p['GUARD']['peak_mem_mib']} MiB; Adv Training "
                  f"{p['Adv Training']['s_per_iter']} ± {p['Adv Training']['std']} s/iter, "
                  f"{p['Adv Training']['peak_mem_mib']} MiB.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- sweep
def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise GuardxError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise GuardxError(f"{what} must be positive integers, got {text!r}")
    return values


def run_sweep(args, progress=print) -> dict:
    _validate(args)
    device = resolve_device(args.device)
    methods = parse_methods(args.methods)
    batch_sizes = parse_ints(args.batch_sizes, "--batch-sizes")
    resolutions = parse_ints(args.resolutions, "--resolutions")
    spec = base_spec(args, device)
    spec["points"] = [[b, r] for r in resolutions for b in batch_sizes]
    raw, env = collect(spec, methods, args.isolate, progress)
    result = {"benchmark": "sweep", "env": env, "memory_measure": memory_kind(device),
              "isolation": "fresh process per method (points in sequence)" if args.isolate == "process"
              else "one process",
              "config": {k: v for k, v in spec.items() if k != "points"} | {
                  "batch_sizes": batch_sizes, "resolutions": resolutions, "methods": methods},
              "labels": {n: method_label(n, spec) for n in methods}, "points": raw}
    stem = args.name or f"sweep-{device_tag(device)}-{args.model}"
    png = Path(args.out) / f"{stem}.png"
    plot_sweep(result, png)
    json_path, md_path = save_result(args.out, stem, result, render_sweep(result))
    result["files"] = [str(json_path), str(md_path), str(png)]
    return result


def render_sweep(result: dict) -> str:
    cfg, env = result["config"], result["env"]
    lines = [f"# Cost growth: {cfg['model']} — {env['device_name']}", "",
             f"torch {env['torch']} · CUDA {env.get('cuda')} · {env['threads']} threads · git "
             f"{env.get('git_revision')}; {cfg['repeats']} × {cfg['iters']} iterations after {cfg['warmup']} "
             f"warm-up per point. Memory: {result['memory_measure']}.", ""]
    for res in cfg["resolutions"]:
        lines += [f"## {res} px: s/iter (× plain)", "",
                  "| Method | " + " | ".join(f"B={b}" for b in cfg["batch_sizes"]) + " |",
                  "|---|" + "---|" * len(cfg["batch_sizes"])]
        plain = {(p["batch_size"], p["resolution"]): p for p in result["points"].get("plain", [])}
        for name, pts in result["points"].items():
            cells = []
            for p in (q for q in pts if q["resolution"] == res):
                if "error" in p:
                    cells.append(p["error"])
                    continue
                base = plain.get((p["batch_size"], res))
                x = f" ({p['s_per_iter_mean'] / base['s_per_iter_mean']:.2f}×)" if base and "error" not in base else ""
                cells.append(f"{p['s_per_iter_mean']:.4g}{x}")
            lines.append(f"| {result['labels'][name]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_sweep(result: dict, path: Path) -> None:
    """s/iter against batch size (log-log), one panel per resolution, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from guardx.utils.io import atomic_path

    resolutions = result["config"]["resolutions"]
    cols = min(len(resolutions), 4)
    rows = math.ceil(len(resolutions) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, res in zip(axes.flat, resolutions):
        for name, pts in result["points"].items():
            ok = [p for p in pts if p["resolution"] == res and "error" not in p]
            if ok:
                style = "--" if name.startswith("ref_") else "-"
                ax.plot([p["batch_size"] for p in ok], [p["s_per_iter_mean"] for p in ok], style, marker="o",
                        ms=3, label=result["labels"][name])
        ax.set(xscale="log", yscale="log", title=f"{res} px", xlabel="batch size", ylabel="s / iteration")
        ax.set_xticks(result["config"]["batch_sizes"], [str(b) for b in result["config"]["batch_sizes"]])
        ax.set_xticks([], minor=True)  # log axes would otherwise label minor ticks like 3×10⁰
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(resolutions):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(f"{result['config']['model']} on {result['env']['device_name']}: cost per squeeze iteration")
    fig.tight_layout(rect=(0, 0.08 + 0.02 * (len(labels) > 4), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
