"""Reports: the tables and files ``guardx evaluate`` and ``guardx pipeline`` write, from one code path.

* :func:`results_table` — markdown, one row per (method, model), one column per metric;
* :func:`results_csv` — one line per (method, model, metric) with the attack, ε, its parameters, the seed;
* :func:`write_evaluation` — ``results.{md,json,csv}`` of an evaluation;
* :func:`write_pipeline_report` — ``report.{md,json,csv}`` of a pipeline run.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from guardx.attacks.plan import describe, jobs, metric_names, settings
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


def settings_line(cfg) -> str:
    return (f"seed {cfg.run.seed} · data {cfg.data.dataset} @ {cfg.data.resolution}px · teacher "
            f"{cfg.model.name}(width {cfg.model.width}) {cfg.squeeze.epochs} ep · recover ipc {cfg.recover.ipc}, "
            f"{cfg.recover.iterations} it · relabel/train {cfg.train.epochs} ep · {describe(cfg)}"
            + (f" on the first {cfg.evaluate.max_samples} test images" if cfg.evaluate.max_samples else ""))


def pipeline_markdown(report: dict, cfg) -> str:
    lines = ["# guardx report", "", settings_line(cfg), "", f"Accuracy (%) on {_subset(cfg)} test images:", "",
             results_table(report["rows"], report["metrics"]), "", "Methods (distiller; real-data objective):", ""]
    lines += [f"- **{m.name}**: {m.distiller}; {m.objective or {'name': 'plain'}}"
              + (f"; overrides {m.overrides}" if m.overrides else "") for m in cfg.pipeline.methods]
    env = report["environment"]
    lines += ["", f"Total wall time: {report['total_seconds']:.0f} s ({env['threads']} threads, torch {env['torch']}, "
                  f"{env['device_name']})", ""]
    return "\n".join(lines)


def write_pipeline_report(report: dict, cfg, out: Path) -> None:
    """``<out>/report.{md,json,csv}`` of a pipeline run."""
    write_json(report, out / "report.json")
    write_text(pipeline_markdown(report, cfg), out / "report.md")
    write_text(results_csv(report["rows"], cfg), out / "report.csv")
