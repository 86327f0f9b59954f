"""The README's "Measured results" block, generated from ``benchmarks/results/*.json`` (never typed in).

    guardx bench report             # rewrite the block in README.md
    guardx bench report --check     # exit 1 if the block is stale
"""
from __future__ import annotations

import json
from pathlib import Path

from guardx.bench.methods import PAPER_TABLE4
from guardx.errors import GuardxError
from guardx.utils.io import write_text

# The README calls a guardx method "below its FLOP ratio" only under this fraction of it: CPU medians move by a
# few per cent between runs, and a ratio 2 % under its FLOP ratio is not evidence of skipped work.
BELOW_FLOPS = 0.95

START, END = "<!-- measured-results:start -->", "<!-- measured-results:end -->"

# ResNet-18 forward at 224 px: 1.82 G multiply-adds = 3.6 GFLOP per image. A lossdiff step is 3 forwards +
# 3 full backwards ≈ 9 forward-equivalents (a full backward ≈ 2 forwards).
RESNET18_224_GFLOP = 3.64
A100_TF32_PEAK_TFLOPS = 156.0


def _load(results: Path, prefix: str) -> list[dict]:
    runs = []
    for path in sorted(results.glob(f"{prefix}-*.json")):
        data = json.loads(path.read_text())
        data["_file"] = path.name
        runs.append(data)
    # GPU runs first, then by file name
    return sorted(runs, key=lambda d: (d["env"]["device"] == "cpu", d["_file"]))


def _overhead_block(run: dict) -> list[str]:
    from guardx.bench.overhead import comparison_lines, table_lines

    env, cfg, methods, load = run["env"], run["config"], run["methods"], run["load"]
    lines = [f"**{env['device_name']}** — {cfg['model']}, batch {cfg['batch_size']}, {cfg['resolution']} px, "
             f"{cfg.get('precision', 'fp32')}, {env['threads']} threads of {load['cores']} cores; "
             f"{cfg['rounds']} rounds × {cfg['iters']} step(s), every method round-robin in one process; "
             f"memory: {run['memory_measure']}, a fresh process per method; load average {load['before']} before, "
             f"{load['after']} after; torch {env['torch']}, git `{(env.get('git_revision') or '?')[:12]}` "
             f"([json](benchmarks/results/{run['_file']}), [table](benchmarks/results/"
             f"{run['_file'].replace('.json', '.md')}))", ""]
    if load.get("warning"):
        lines += [f"**WARNING: {load['warning']}.**", ""]
    lines += table_lines(run)
    if run["targets"]:
        held = [t for t in run["targets"] if t["met"]]
        missed = [t for t in run["targets"] if not t["met"]]
        fmt = lambda ts: "; ".join(f"{t['target']}: {t['measured']:.2f}×" for t in ts)  # noqa: E731
        lines += ["", f"Targets that hold in this run — {fmt(held) or 'none'}."
                      + (f" Not met — {fmt(missed)}." if missed else "")]
    # a ratio counts as below its FLOP ratio only past this run's noise (5 %), not on a rounding
    below = [m for m in methods.values() if m["kind"] == "guardx" and "time_x_plain" in m
             and m["time_x_plain"] < BELOW_FLOPS * m["flops_x_plain"]]
    if below:
        lines += ["", "Below their FLOP ratios: " + "; ".join(
            f"{m['label']} {m['time_x_plain']:.2f}× against {m['flops_x_plain']:.2f}× the FLOPs"
            for m in below) + ". The FLOP count sees convolutions and matrix multiplies only: a plain step "
            "also runs train-mode BatchNorm, which the running-statistics passes fold into the convolutions "
            "(`guardx/objectives/_fold.py`), so those passes cost less per FLOP than a plain step."]
    ok = [m for m in methods.values() if "time_per_flop_ratio" in m and m["kind"] != "ablation"
          and m is not methods.get("plain")]
    if ok:
        lo, hi = min(m["time_per_flop_ratio"] for m in ok), max(m["time_per_flop_ratio"] for m in ok)
        ab = []
        folding = _ab_savings(methods, "_nofold", ("guard_lossdiff", "guard_exact"))
        if folding:
            ab.append(f"folding BatchNorm saves {' and '.join(folding)}")
        written_out = _ab_savings(methods, "_autograd", ("guard_exact",))
        if written_out:
            ab.append("the written-out convolution double backward (`guardx/objectives/_conv.py`) saves "
                      + " and ".join(written_out))
        lines += ["", f"Time against FLOPs: the methods and baselines run at {lo:.2f}–{hi:.2f}× their FLOP ratios "
                      "here" + (f"; {'; '.join(ab)} (the A/B rows)" if ab else "") + "."]
    comp = comparison_lines(run)
    if comp:
        lines += ["", "Each guardx method against the implementation it replaces (same run, medians):", "", *comp]
    return lines + [""]


def _ab_savings(methods: dict, suffix: str, names) -> list[str]:
    """"N % of a <method> step" for each method timed beside its A/B row ``<name><suffix>`` (medians; a
    negative N is a cost, and printed so)."""
    out = []
    for n in names:
        if n in methods and n + suffix in methods and "stats" in methods[n] and "stats" in methods[n + suffix]:
            saved = 1 - methods[n]["stats"]["median"] / methods[n + suffix]["stats"]["median"]
            what = f"{methods[n]['label'].split(' (')[0]} step"
            out.append(f"{100 * saved:.0f} % of a {what}" if saved >= 0
                       else f"nothing (a {what} took {100 * -saved:.0f} % longer)")
    return out


def _cost_model(run: dict) -> str:
    """The reading of the paper's Table 4, with this run's FLOP ratios where it has them."""
    methods, k = run["methods"], run["config"]["pgd_steps"]
    counted = {n: methods[n]["flops_x_plain"] for n in ("guard_lossdiff", "adv", "ref_adv_official")
               if n in methods and "flops_x_plain" in methods[n]}

    def c(name: str) -> str:
        return f" (counted here: {counted[name]:.2f}×)" if name in counted else ""

    floor = 9 * RESNET18_224_GFLOP * PAPER_TABLE4["batch_size"] / 1e3  # TFLOP per GUARD lossdiff step
    gap = PAPER_TABLE4["Adv Training"]["s_per_iter"] / PAPER_TABLE4["GUARD"]["s_per_iter"]
    return (
        "How to read the paper's numbers next to these. Cost model, in forward-equivalents F (a backward "
        "that computes input and weight gradients ≈ 2 F; one that computes the input gradient only ≈ 1 F): "
        "a plain step is 3 F; GUARD lossdiff runs three forwards and three full backwards, 9 F ≈ 3× plain"
        f"{c('guard_lossdiff')}; PGD-{k} adversarial training as guardx runs it attacks with an input-only "
        f"backward, (3 + 2k) F ≈ (1 + 2k/3)× plain = {1 + 2 * k / 3:.1f}×{c('adv')}; as the official code runs "
        f"it, every attack step takes a full backward, (3 + 3k) F = (k + 1)× plain = {k + 1}×{c('ref_adv_official')}. "
        "Table 4 states neither the resolution nor k. At 224 px a GUARD lossdiff step is "
        f"≈ {floor:.2f} TFLOP at batch 32, so 0.007 s/iter would mean ≈ {floor / 0.007:.0f} TFLOP/s — about "
        f"{100 * floor / 0.007 / A100_TF32_PEAK_TFLOPS:.0f}% of the A100's {A100_TF32_PEAK_TFLOPS:.0f} TFLOP/s TF32 "
        "peak, which ResNet-18 training does not reach; the paper's time was most likely taken at a smaller "
        f"resolution or without synchronising the GPU. Its {gap:.0f}× gap to adversarial training would take "
        f"k ≈ {3 * gap - 1:.0f} official-style PGD steps (3·{gap:.0f} − 1), or a GUARD time that is too small. "
        "Our ratios are measured in one run on one device, with the protocol stated above; the sweep below "
        "shows how they move with batch size and resolution. The paper's memory is most likely nvidia-smi's "
        "(CUDA context and allocator cache included), ours is allocated tensors (GPU) or resident set size "
        "(CPU, including ~0.8 GB of Python and torch, so CPU memory ratios are compressed towards 1).")


def render(results: Path) -> str:
    overhead, sweeps = _load(results, "overhead"), _load(results, "sweep")
    throughput, kernels = _load(results, "throughput"), _load(results, "kernels")
    lines = ["Generated by `guardx bench report` from `benchmarks/results/`; how each number is measured and the "
             "exact commands are in [benchmarks/README.md](benchmarks/README.md).", ""]
    if not overhead:
        lines += ["No overhead run has been recorded yet: run the commands in benchmarks/README.md, then "
                  "`guardx bench report`.", ""]
    else:
        lines += ["### Table 4: cost of one squeeze iteration", ""]
        for run in overhead:
            lines += _overhead_block(run)
        lines += [_cost_model(overhead[-1]), ""]
    for run in sweeps:
        png = run["_file"].replace(".json", ".png")
        lines += [f"### Cost growth — {run['env']['device_name']}", "",
                  f"![s/iter against batch size](benchmarks/results/{png}) "
                  f"([table](benchmarks/results/{run['_file'].replace('.json', '.md')}))", ""]
    for run in throughput:
        source = " ".join(run["config"].get("config_files") or []) or "built-in tiny demo settings"
        lines += [f"### Throughput — {run['env']['device_name']}, {source}", "",
                  "| Part | Throughput | What |", "|---|---|---|"]
        for part, r in run["results"].items():
            if part == "e2e":
                lines.append(f"| end-to-end | {r['seconds']:.1f} s | {r['what']} |")
            else:
                lines.append(f"| {part} | {r['mean']:.4g} ± {r['std']:.2g} {r['unit']} | {r['what']} |")
        lines.append("")
    for run in kernels:
        lines += [f"### Triton kernels — {run['env']['device_name']}", "",
                  f"See [benchmarks/results/{run['_file'].replace('.json', '.md')}]"
                  f"(benchmarks/results/{run['_file'].replace('.json', '.md')}).", ""]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, results: Path, check: bool = False) -> bool:
    """Rewrite the block between the markers; returns True if it was already current."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise GuardxError(f"{readme} has no {START} ... {END} block to fill")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{render(results)}{END}{tail}"
    if new == text:
        return True
    if not check:
        write_text(new, readme)
    return False
