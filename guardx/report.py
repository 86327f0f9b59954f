"""Reports: the tables and files ``guardx evaluate`` and ``guardx pipeline`` write, from one code path.

* :func:`results_table` — markdown, one row per (method, model), one column per metric;
* :func:`results_csv` — one line per (method, model, metric) with the attack, ε, its parameters, the seed;
* :func:`write_evaluation` — ``results.{md,json,csv}`` of an evaluation;
* :func:`summarize` — per (method, model, metric) mean, spread and per-seed values, and each method's
  paired comparison with the baseline (95 % interval and a verdict; see :mod:`guardx.stats`);
* :func:`write_pipeline_report` — ``report.{md,json,csv}`` of a pipeline run.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from guardx.attacks.accuracy import unpack_bits
from guardx.attacks.plan import describe, jobs, metric_names, settings
from guardx.stats import paired_comparison, summary
from guardx.utils.io import write_json, write_text
from guardx.utils.misc import fmt_eps


def results_table(rows: list[dict], names: list[str]) -> str:
    """Markdown table; each row has ``method``, ``model`` and ``accuracy`` (percent per metric)."""
    head = "| method | model | " + " | ".join(names) + " |"
    sep = "|---|---|" + "---:|" * len(names)
    lines = [head, sep]
    for r in rows:
        acc = r["accuracy"]
        lines.append(f"| {r['method']} | {r['model']} | " + " | ".join(f"{acc[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def results_csv(rows: list[dict], cfg) -> str:
    """One line per (method, model, metric) with the attack, ε, its parameters and the seed."""
    by_metric = {j.metric: j for j in jobs(cfg)}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "model", "checkpoint", "metric", "attack", "eps", "params", "seed", "n", "correct",
                "accuracy"])
    for r in rows:
        for m in metric_names(cfg):
            job = by_metric.get(m)
            w.writerow([r["method"], r["model"], r.get("checkpoint", ""), m, job.attack if job else "none",
                        "" if job is None or job.eps is None else fmt_eps(job.eps),
                        json.dumps(job.params if job else {}, sort_keys=True), r.get("seed", cfg.run.seed),
                        r["accuracy"]["n"], r.get("counts", {}).get(m, ""), f"{r['accuracy'][m]:.4f}"])
    return buf.getvalue()


def _subset(cfg) -> str:
    return f"the first {cfg.evaluate.max_samples}" if cfg.evaluate.max_samples else "all"


def write_evaluation(rows: list[dict], cfg, out: Path) -> None:
    """``<out>/results.{md,json,csv}`` for the evaluated models ``rows``."""
    names = metric_names(cfg)
    md = ["# guardx evaluate", "", f"{describe(cfg)} · seed {cfg.run.seed}", "",
          f"Accuracy (%) on {_subset(cfg)} test images (n = {rows[0]['accuracy']['n']}):", "",
          results_table(rows, names), ""]
    write_text("\n".join(md), out / "results.md")
    write_json({"metrics": names, "seed": cfg.run.seed, "settings": settings(cfg),
                "describe": describe(cfg), "rows": rows}, out / "results.json")
    write_text(results_csv(rows, cfg), out / "results.csv")


def summarize(report: dict, cfg) -> dict:
    """``summary`` (per method × model × metric over seeds) and ``comparisons`` (each method against the
    baseline, per model and metric, paired by seed) of a pipeline report's rows."""
    metrics = report["metrics"]
    methods = [m.name for m in cfg.pipeline.methods]
    baseline = cfg.pipeline.baseline or methods[0]
    baseline_of = {m.name: m.baseline or baseline for m in cfg.pipeline.methods}
    by_key: dict[tuple[str, str], dict[int, dict]] = {}
    for r in report["rows"]:
        by_key.setdefault((r["method"], r["model"]), {})[r.get("seed", cfg.run.seed)] = r
    summary_rows = []
    for (method, model), per_seed in by_key.items():
        seeds = sorted(per_seed)
        summary_rows.append({"method": method, "model": model, "seeds": seeds, "metrics": {
            m: summary([per_seed[s]["accuracy"][m] for s in seeds]) for m in metrics}})
    comparisons = []
    for (method, model), per_seed in by_key.items():
        ref = baseline_of.get(method, baseline)
        base = by_key.get((ref, model))
        if method == ref or base is None:
            continue
        for m in metrics:
            shared = sorted(set(per_seed) & set(base))
            flags = None
            if len(shared) == 1:
                a, b = per_seed[shared[0]], base[shared[0]]
                if a.get("per_sample") and b.get("per_sample") and a["accuracy"]["n"] == b["accuracy"]["n"]:
                    n = a["accuracy"]["n"]
                    flags = (unpack_bits(a["per_sample"][m], n), unpack_bits(b["per_sample"][m], n))
            comparisons.append({"method": method, "baseline": ref, "model": model, "metric": m,
                                **paired_comparison({s: r["accuracy"][m] for s, r in per_seed.items()},
                                                    {s: r["accuracy"][m] for s, r in base.items()},
                                                    per_sample=flags)})
    return {"baseline": baseline, "summary": summary_rows, "comparisons": comparisons}


def summary_table(report: dict) -> str:
    """Markdown: mean ± std over seeds (the per-seed values in the JSON) per (method, model) and metric."""
    names = report["metrics"]
    lines = ["| method | model | seeds | " + " | ".join(names) + " |", "|---|---|---:|" + "---:|" * len(names)]
    for s in report["summary"]:
        cells = [f"{s['metrics'][m]['mean']:.2f} ± {s['metrics'][m]['std']:.2f}" if len(s["seeds"]) > 1
                 else f"{s['metrics'][m]['mean']:.2f}" for m in names]
        lines.append(f"| {s['method']} | {s['model']} | {len(s['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_ATTACK_LABELS = {"clean": "None (Clean)", "pgd": "PGD", "fgsm": "FGSM", "mim": "MIM", "cw": "CW", "square": "Square",
                  "autoattack": "AutoAttack"}


def metric_label(metric: str, eps_count: int) -> str:
    """The paper's row name of a metric: ``pgd100@1/255`` → ``PGD100`` (``PGD100 @ 1/255`` when several ε)."""
    spec, _, eps = metric.partition("@")
    name = spec.rstrip("0123456789")
    label = _ATTACK_LABELS.get(name, name) + spec[len(name):]
    return f"{label} @ {eps}" if eps and eps_count > 1 else label


def paper_table(report: dict, cfg, model: str = "student") -> str:
    """The paper's layout (Tables 2 and 5): a block of rows per group (e.g. IPC), one row per attack, one
    column per method (``pipeline.methods[].column``); the ``model``'s accuracy, mean ± std over seeds."""
    methods = [m for m in cfg.pipeline.methods if m.column]
    if not methods:
        return ""
    columns = list(dict.fromkeys(m.column for m in methods))
    groups = list(dict.fromkeys(m.group for m in methods))
    cell = {(m.group, m.column): m.name for m in methods}
    stats = {s["method"]: s for s in report.get("summary", []) if s["model"] == model}
    eps_count = len(cfg.evaluate.eps)
    lines = ["| group | attack | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for group in groups:
        for metric in report["metrics"]:
            cells = []
            for column in columns:
                s = stats.get(cell.get((group, column)))
                if s is None:
                    cells.append("–")
                    continue
                v = s["metrics"][metric]
                cells.append(f"{v['mean']:.2f}" + (f" ± {v['std']:.2f}" if len(s["seeds"]) > 1 else ""))
            lines.append(f"| {group} | {metric_label(metric, eps_count)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(report: dict) -> str:
    """Markdown: each method minus the baseline, paired, with the 95 % interval and a verdict."""
    lines = ["| method − baseline | model | metric | difference (points) | 95% CI | verdict | interval from |",
             "|---|---|---|---:|---|---|---|"]
    for c in report["comparisons"]:
        ci = f"[{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}]" if c["ci"] else "n/a"
        lines.append(f"| {c['method']} − {c['baseline']} | {c['model']} | {c['metric']} | {c['mean_diff']:+.2f} | "
                     f"{ci} | {c['verdict']} | {c['interval']} |")
    return "\n".join(lines)


def settings_line(cfg) -> str:
    ipcs = sorted({m.overrides.get("recover", {}).get("ipc", cfg.recover.ipc) for m in cfg.pipeline.methods})
    ipc = f"ipc {ipcs[0]}" if len(ipcs) == 1 else f"ipc {', '.join(map(str, ipcs))} (per method)"
    return (f"data {cfg.data.dataset} @ {cfg.data.resolution}px · teacher "
            f"{cfg.model.name}(width {cfg.model.width}) {cfg.squeeze.epochs} ep · recover {ipc}, "
            f"{cfg.recover.iterations} it · relabel/train {cfg.train.epochs} ep · {describe(cfg)}"
            + (f" on the first {cfg.evaluate.max_samples} test images" if cfg.evaluate.max_samples else ""))


def pipeline_markdown(report: dict, cfg) -> str:
    seeds = report.get("seeds", [cfg.run.seed])
    lines = ["# guardx report", "", settings_line(cfg), "",
             f"Accuracy (%) on {_subset(cfg)} test images, seeds {', '.join(map(str, seeds))}"
             + (" (mean ± sample std over seeds; per-seed values in report.json):" if len(seeds) > 1 else ":"), "",
             summary_table(report) if "summary" in report else results_table(report["rows"], report["metrics"]), ""]
    table = paper_table(report, cfg)
    if table:
        lines += ["Students in the paper's layout (accuracy %, rows: attacks at "
                  f"{', '.join(fmt_eps(e) for e in cfg.evaluate.eps)}):", "", table, ""]
    if report.get("comparisons"):
        lines += [f"Paired comparison with each method's baseline (same seeds; verdict from the 95% interval of the "
                  "difference: better / worse / within noise):", "", comparison_table(report), ""]
    lines += ["Methods (distiller; real-data objective):", ""]
    lines += [f"- **{m.name}**: {m.distiller}; {m.objective or {'name': 'plain'}}"
              + (f"; overrides {m.overrides}" if m.overrides else "") for m in cfg.pipeline.methods]
    env = report["environment"]
    workers = cfg.pipeline.workers
    threads = f"{workers} processes of {max(1, env.get('cpu_count', 1) // workers)} thread(s)" if workers > 1 \
        else f"{env['threads']} threads"
    lines += ["", f"Total wall time: {report['total_seconds']:.0f} s ({threads}, torch {env['torch']}, "
                  f"{env['device_name']})", ""]
    return "\n".join(lines)


def write_pipeline_report(report: dict, cfg, out: Path) -> None:
    """``<out>/report.{md,json,csv,html}`` of a pipeline run."""
    from guardx.html_report import write_html

    write_json(report, out / "report.json")
    write_text(pipeline_markdown(report, cfg), out / "report.md")
    write_text(results_csv(report["rows"], cfg), out / "report.csv")
    write_html(report, cfg, out)


def rebuild(run_dir: Path) -> Path:
    """``guardx report RUN_DIR``: rewrite a finished pipeline run's report files from its ``report.json``."""
    from guardx.config import from_dict
    from guardx.errors import DataError
    from guardx.utils.io import read_json

    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise DataError(f"no report.json in {run_dir}: point `guardx report` at a finished pipeline's run.out_dir")
    report = read_json(path)
    cfg = from_dict(report["config"])
    report.update(summarize(report, cfg))
    write_pipeline_report(report, cfg, Path(run_dir))
    return Path(run_dir) / "report.html"
