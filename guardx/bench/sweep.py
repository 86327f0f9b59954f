"""How the cost per squeeze iteration grows with batch size and resolution, per objective, with a plot.

    guardx bench sweep --device cuda --batch-sizes 8,16,32,64,128 --resolutions 32,64,112,224
    guardx bench sweep --device cpu --batch-sizes 8,16,32 --resolutions 32,64 --rounds 5

At every (batch size, resolution) point the methods are measured exactly as ``guardx bench overhead``
measures them (``guardx.bench.compare``): FLOPs of one step, round-robin timing in one process, and peak
memory in a fresh process per method (that process runs the method's points in sequence; a point that
does not fit is recorded as out of memory).
"""
from __future__ import annotations

import math
from pathlib import Path

from guardx.bench.compare import add_ratios, measure_memory, method_label, parse_methods, row, settings, time_point
from guardx.bench.measure import (cores_available, device_tag, environment, load_average, load_warning,
                                  memory_kind, parse_ints, resolve_device, save_result)
from guardx.bench.overhead import base_spec


def run_sweep(args, progress=print) -> dict:
    device = resolve_device(args.device)
    methods = parse_methods(args.methods)
    batch_sizes = parse_ints(args.batch_sizes, "--batch-sizes")
    resolutions = parse_ints(args.resolutions, "--resolutions")
    spec = base_spec(args, device)
    points = [[b, r] for r in resolutions for b in batch_sizes]
    cores, load_before = cores_available(), load_average()
    with settings(spec):
        timing = [time_point(spec, methods, b, r, progress) for b, r in points]
        env = environment(device)
    load_after = load_average()
    memory = measure_memory(dict(spec, points=points), methods, args.isolate, progress)
    rows = []
    for i, (b, r) in enumerate(points):
        table = {name: row(name, spec, timing[i][name], memory[name][i]) for name in methods}
        add_ratios(table)
        rows.append({"batch_size": b, "resolution": r, "methods": table})
    warning = load_warning(load_before, load_after, cores)
    if warning:
        progress("WARNING: " + warning)
    result = {"benchmark": "sweep", "env": env, "memory_measure": memory_kind(device),
              "load": {"before": load_before, "after": load_after, "cores": cores, "warning": warning},
              "config": {**spec, "batch_sizes": batch_sizes, "resolutions": resolutions, "methods": methods},
              "labels": {n: method_label(n, spec) for n in methods}, "points": rows}
    stem = args.name or f"sweep-{device_tag(device)}-{args.model}"
    png = Path(args.out) / f"{stem}.png"
    plot_sweep(result, png)
    json_path, md_path = save_result(args.out, stem, result, render_sweep(result))
    result["files"] = [str(json_path), str(md_path), str(png)]
    return result


def render_sweep(result: dict) -> str:
    cfg, env, load = result["config"], result["env"], result["load"]
    lines = [f"# Cost growth: {cfg['model']} — {env['device_name']}", "",
             f"torch {env['torch']} · CUDA {env.get('cuda')} · {env['threads']} threads · git "
             f"{env.get('git_revision')}; per point: round-robin in one process, {cfg['rounds']} rounds × "
             f"{cfg['iters']} step(s) after {cfg['warmup']} warm-up; median s/iter (× plain, median ratio). "
             f"Memory: {result['memory_measure']}. Load average {load['before']} before, {load['after']} after, "
             f"{load['cores']} cores.", ""]
    if load.get("warning"):
        lines += [f"**WARNING: {load['warning']}.**", ""]
    for res in cfg["resolutions"]:
        pts = [p for p in result["points"] if p["resolution"] == res]
        lines += [f"## {res} px: s/iter (× plain; FLOP × plain)", "",
                  "| Method | " + " | ".join(f"B={p['batch_size']}" for p in pts) + " |",
                  "|---|" + "---|" * len(pts)]
        for name in cfg["methods"]:
            cells = []
            for p in pts:
                m = p["methods"][name]
                cells.append(m["error"] if "error" in m else
                             f"{m['stats']['median']:.4g} ({m['time_x_plain']:.2f}×; {m['flops_x_plain']:.2f}×)")
            lines.append(f"| {result['labels'][name]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_sweep(result: dict, path: Path) -> None:
    """s/iter against batch size (log-log), one panel per resolution, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from guardx.utils.io import atomic_path

    cfg = result["config"]
    resolutions = cfg["resolutions"]
    cols = min(len(resolutions), 4)
    rows = math.ceil(len(resolutions) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, res in zip(axes.flat, resolutions):
        for name in cfg["methods"]:
            ok = [p for p in result["points"] if p["resolution"] == res and "error" not in p["methods"][name]]
            if ok:
                style = "-" if result["points"][0]["methods"][name]["kind"] == "guardx" else "--"
                ax.plot([p["batch_size"] for p in ok], [p["methods"][name]["stats"]["median"] for p in ok], style,
                        marker="o", ms=3, label=result["labels"][name])
        ax.set(xscale="log", yscale="log", title=f"{res} px", xlabel="batch size", ylabel="s / iteration (median)")
        ax.set_xticks(cfg["batch_sizes"], [str(b) for b in cfg["batch_sizes"]])
        ax.set_xticks([], minor=True)  # log axes would otherwise label minor ticks like 3×10⁰
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(resolutions):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(2, len(labels)), fontsize=7, frameon=False)
    fig.suptitle(f"{cfg['model']} on {result['env']['device_name']}: cost per squeeze iteration")
    fig.tight_layout(rect=(0, 0.04 + 0.045 * math.ceil(len(labels) / 2) / rows, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
