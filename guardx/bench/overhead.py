"""Table 4: the cost of one squeeze iteration per objective — time, FLOPs and peak memory, as ratios to plain.

    guardx bench overhead --device cuda --model resnet18 --batch-size 32 --resolution 224 --rounds 20 --iters 5
    guardx bench overhead --device cpu --model resnet18 --batch-size 32 --resolution 64 --rounds 12

One iteration is the fixed-batch squeeze step of ``guardx.bench.measure`` (``Engine(ObjectiveStep(model,
objective))`` forward with all the objective's passes, backward, SGD step; the model in train mode; one
fixed random batch on the device; no data loading, no checkpoints). Every method is timed round-robin in
one process (``guardx.bench.compare``), its FLOPs counted over one whole step, its peak memory taken in a
fresh process of its own. The machine's load average is recorded before and after; a load above the
available cores is printed as a warning and kept in the JSON.

Methods: guardx's objectives (plain, GUARD lossdiff/exact/cure, gradnorm, PGD-k adversarial training),
A/B rows with BatchNorm folding switched off, and baselines (``guardx/bench/baselines.py``, not product
code): the official code's PGD-k adversarial training and lossdiff, and exact by naive double backprop.
"""
from __future__ import annotations

from guardx.bench.compare import (add_ratios, measure_memory, method_label, parse_methods, row, settings,
                                  time_point)
from guardx.bench.measure import (cores_available, device_tag, environment, load_average, load_warning,
                                  memory_kind, resolve_device, save_result)
from guardx.bench.methods import COMPARE, PAPER_TABLE4, SUSPECT_BELOW, TARGETS
from guardx.errors import GuardxError


def parse_eps(text: str | float) -> float:
    """``1/255`` or ``0.0039`` → float."""
    from guardx.utils.misc import parse_fraction

    try:
        return parse_fraction(text)
    except ValueError as e:
        raise GuardxError(str(e)) from None


def base_spec(args, device) -> dict:
    """What every measurement of this run shares (the JSON's ``config``)."""
    for key in ("rounds", "iters", "memory_steps"):
        if getattr(args, key) < 1:
            raise GuardxError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        raise GuardxError(f"--warmup must be >= 0, got {args.warmup}")
    return {"model": args.model, "num_classes": args.num_classes, "width": args.width, "device": str(device),
            "warmup": args.warmup, "rounds": args.rounds, "iters": args.iters, "memory_steps": args.memory_steps,
            "threads": args.threads, "pgd_steps": args.pgd_steps, "pgd_eps": parse_eps(args.pgd_eps),
            "pgd_alpha": parse_eps(args.pgd_alpha), "kernels": args.kernels, "precision": args.precision,
            "cudnn_benchmark": not args.no_cudnn_benchmark, "channels_last": args.channels_last, "seed": 0}


def check_targets(methods: dict, pgd_steps: int) -> list[dict]:
    out = []
    for text, a, b, what, op, limit in TARGETS:
        if a not in methods or b not in methods or "error" in methods[a] or "error" in methods[b]:
            continue
        if a == "adv" and pgd_steps != 10:
            continue  # the targets compare against PGD-10
        if what == "time":
            value = methods[a]["stats"]["median"] / methods[b]["stats"]["median"]
        elif "peak_mem_mib" in methods[a] and "peak_mem_mib" in methods[b]:
            value = methods[a]["peak_mem_mib"] / methods[b]["peak_mem_mib"]
        else:
            continue
        out.append({"target": text, "measured": value, "limit": limit, "op": op,
                    "met": value <= limit if op == "<=" else value >= limit})
    return out


def run_overhead(args, progress=print) -> dict:
    device = resolve_device(args.device)
    methods = parse_methods(args.methods)
    spec = base_spec(args, device)
    bs, res = args.batch_size, args.resolution
    cores, load_before = cores_available(), load_average()
    with settings(spec):
        timing = time_point(spec, methods, bs, res, progress)
        env = environment(device)
    load_after = load_average()  # before the memory processes, which are not timed
    memory = measure_memory(dict(spec, points=[[bs, res]]), methods, args.isolate, progress)
    table = {name: row(name, spec, timing[name], memory[name][0]) for name in methods}
    add_ratios(table)
    warning = load_warning(load_before, load_after, cores)
    if warning:
        progress("WARNING: " + warning)
    result = {"benchmark": "overhead", "env": env,
              "load": {"before": load_before, "after": load_after, "cores": cores, "warning": warning},
              "memory_measure": memory_kind(device),
              "memory_isolation": "fresh process per method" if args.isolate == "process" else "one process",
              "timing": "round-robin in one process: per round one block of each method, order rotated",
              "config": {**spec, "batch_size": bs, "resolution": res, "methods": methods,
                         "optimizer": "SGD(lr=1e-4, momentum=0.9, weight_decay=1e-4)",
                         "data": "one fixed random batch", "model_mode": "train"},
              "methods": table, "targets": check_targets(table, args.pgd_steps), "paper_table4": PAPER_TABLE4}
    stem = args.name or f"overhead-{device_tag(device)}-{args.model}-bs{bs}-r{res}"
    json_path, md_path = save_result(args.out, stem, result, render_overhead(result))
    result["files"] = [str(json_path), str(md_path)]
    return result


# ---------------------------------------------------------------- rendering
def _x(v) -> str:
    return "" if v is None else f"{v:.2f}×"


def _gflop(m: dict) -> str:
    return f"{m['flops']['total'] / 1e9:.1f}"


def table_lines(result: dict) -> list[str]:
    """The Table 4 rows (shared by the markdown file and the README block)."""
    lines = ["| Method | s/iter median [min–max] | spread | Peak Mem | time × plain (paired min–max) | "
             "FLOP × plain | time ÷ FLOP ratio | mem × plain |", "|---|---|---|---|---|---|---|---|"]
    for m in result["methods"].values():
        label = m["label"] if m["kind"] == "guardx" else f"*{m['label']}*"
        if "error" in m:
            lines.append(f"| {label} | {m['error']} | | | | | | |")
            continue
        if not m.get("loss_finite", True):
            label += " (loss went non-finite)"
        s, p = m["stats"], m.get("paired_x_plain")
        paired = f" ({p['min']:.2f}–{p['max']:.2f})" if p else ""
        flag = " **suspect**" if m.get("suspect") else ""
        mem = f"{m['peak_mem_mib']:.0f} MiB" if "peak_mem_mib" in m else ""
        lines.append(f"| {label} | {s['median']:.4g} [{s['min']:.4g}–{s['max']:.4g}] | {100 * s['spread']:.0f} % | "
                     f"{mem} | {_x(m.get('time_x_plain'))}{paired} | {_x(m.get('flops_x_plain'))} | "
                     f"{m.get('time_per_flop_ratio', float('nan')):.2f}{flag} | {_x(m.get('mem_x_plain'))} |")
    return lines


def comparison_lines(result: dict) -> list[str]:
    methods, out = result["methods"], []
    for ours, ref in COMPARE:
        a, b = methods.get(ours), methods.get(ref)
        if a and b and "error" not in a and "error" not in b:
            mem = (f" and {a['peak_mem_mib'] / b['peak_mem_mib']:.2f}× the peak memory"
                   if "peak_mem_mib" in a and "peak_mem_mib" in b else "")
            out.append(f"- {a['label']}: {a['stats']['median'] / b['stats']['median']:.2f}× the time{mem} of "
                       f"*{b['label']}*")
    return out


def render_overhead(result: dict) -> str:
    env, cfg, load = result["env"], result["config"], result["load"]
    lines = [f"# Overhead per squeeze iteration: {cfg['model']}, batch {cfg['batch_size']}, "
             f"{cfg['resolution']} px — {env['device_name']}", "",
             f"torch {env['torch']} · CUDA {env.get('cuda')} · triton {env.get('triton')} · kernels "
             f"{env.get('kernels_backend')} · {env['threads']} threads of {load['cores']} cores · git "
             f"{env.get('git_revision')} · {env['timestamp_utc']}", "",
             f"Time: {result['timing']}; {cfg['rounds']} rounds × {cfg['iters']} step(s) per block after "
             f"{cfg['warmup']} warm-up step(s) per method; s/iter = median block [min–max], spread = (max − min) "
             f"/ median. Ratios to plain take the median of every method; the paired ratio is the median of the "
             f"round-by-round ratios (min–max in brackets). FLOPs: convolutions and matrix multiplies of one "
             f"whole step (torch.utils.flop_counter formulas, double backward included); a time ratio below "
             f"{SUSPECT_BELOW}× its FLOP ratio is marked **suspect**. Memory: {result['memory_measure']} "
             f"({result['memory_isolation']}, {cfg['memory_steps']} steps after {cfg['warmup']} warm-up). "
             f"{cfg['num_classes']} classes, {cfg['precision']}, {cfg['data']}, {cfg['optimizer']}, PGD ε = "
             f"{cfg['pgd_eps']:.4g}, α = {cfg['pgd_alpha']:.4g}.", "",
             f"Load average (1, 5, 15 min): {load['before']} before, {load['after']} after the timing, "
             f"{load['cores']} cores available.", ""]
    if load.get("warning"):
        lines += [f"**WARNING: {load['warning']}.**", ""]
    lines += table_lines(result)
    comp = comparison_lines(result)
    if comp:
        lines += ["", "Each guardx method against the implementation it replaces (same run, medians):", "", *comp]
    if result["targets"]:
        lines += ["", "| Target (ratio of medians in this run) | Measured | Met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']:.2f}× | {'yes' if t['met'] else 'NO'} |" for t in result["targets"]]
    p = result["paper_table4"]
    lines += ["", f"Paper, Table 4 ({p['device']}, batch {p['batch_size']}): GUARD {p['GUARD']['s_per_iter']} ± "
                  f"{p['GUARD']['std']} s/iter, {p['GUARD']['peak_mem_mib']} MiB; Adv Training "
                  f"{p['Adv Training']['s_per_iter']} ± {p['Adv Training']['std']} s/iter, "
                  f"{p['Adv Training']['peak_mem_mib']} MiB.", ""]
    return "\n".join(lines)
