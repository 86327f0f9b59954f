"""Pipeline: squeeze → recover → relabel → train → evaluate for each method, then one report.

    guardx pipeline --config configs/demo.yaml

Each method gets ``<out_dir>/<method>/`` (its own squeeze objective, everything else shared); the
report lands in ``<out_dir>/report.{md,json,csv}``. Every stage skips what is done, so rerunning after
an interruption continues where it stopped.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path


from guardx import evaluate, recover, relabel, squeeze, train
from guardx.config import Config, dump_config
from guardx.distributed import init_distributed
from guardx.evaluate import metric_names, results_table
from guardx.utils.env import environment
from guardx.utils.io import write_json, write_text

STAGE_MODULES = {"squeeze": squeeze, "recover": recover, "relabel": relabel, "train": train, "evaluate": evaluate}


def method_config(cfg: Config, method) -> Config:
    mcfg = cfg.with_objective(method.objective)
    mcfg.run.out_dir = str(Path(cfg.run.out_dir) / method.name)
    # each method evaluates its own teacher/student into its own run dir (evaluate.checkpoints/out_dir are
    # for standalone `guardx evaluate`)
    mcfg.evaluate.checkpoints, mcfg.evaluate.out_dir = [], ""
    return mcfg


def run(cfg: Config) -> dict:
    base = Path(cfg.run.out_dir)
    ctx = init_distributed(cfg)
    if ctx.is_main:
        base.mkdir(parents=True, exist_ok=True)
        write_text(dump_config(cfg), base / "config.yaml")
    t0 = time.perf_counter()
    rows, timings = [], {}
    for method in cfg.pipeline.methods:
        mcfg = method_config(cfg, method)
        for stage in cfg.pipeline.stages:
            if ctx.is_main and cfg.run.progress:
                print(f"[{method.name}] {stage}", flush=True)
            ts = time.perf_counter()
            result = STAGE_MODULES[stage].run(mcfg)
            timings[f"{method.name}/{stage}"] = time.perf_counter() - ts
            if stage == "evaluate":
                for r in result:
                    r["method"] = method.name
                    r["objective"] = {"name": mcfg.objective.name, **mcfg.objective.params()}
                rows += result
    report = {"rows": rows, "metrics": metric_names(cfg), "seed": cfg.run.seed, "stage_seconds": timings,
              "total_seconds": time.perf_counter() - t0, "config": cfg.to_dict(),
              "environment": {**environment(ctx.device), "world_size": ctx.world_size}}
    if ctx.is_main:
        write_json(report, base / "report.json")
        write_text(render_markdown(report, cfg), base / "report.md")
        write_text(render_csv(report), base / "report.csv")
    return report


def settings_line(cfg: Config) -> str:
    return (f"seed {cfg.run.seed} · data {cfg.data.dataset} @ {cfg.data.resolution}px · teacher "
            f"{cfg.model.name}(width {cfg.model.width}) {cfg.squeeze.epochs} ep · recover ipc {cfg.recover.ipc}, "
            f"{cfg.recover.iterations} it · relabel/train {cfg.train.epochs} ep · "
            f"{evaluate.describe(cfg)}"
            + (f" on the first {cfg.evaluate.max_samples} test images" if cfg.evaluate.max_samples else ""))


def render_markdown(report: dict, cfg: Config) -> str:
    methods = {m.name: m.objective for m in cfg.pipeline.methods}
    lines = ["# guardx report", "", settings_line(cfg), "", "Accuracy (%) on the test split:", "",
             results_table(report["rows"], report["metrics"]), "", "Methods (squeeze objective):", ""]
    lines += [f"- **{name}**: {obj}" for name, obj in methods.items()]
    lines += ["", f"Total wall time: {report['total_seconds']:.0f} s "
              f"({report['environment']['threads']} threads, torch {report['environment']['torch']})", ""]
    return "\n".join(lines)


def render_csv(report: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "model", "n", *report["metrics"]])
    for r in report["rows"]:
        writer.writerow([r["method"], r["model"], r["accuracy"]["n"],
                         *[f"{r['accuracy'][m]:.4f}" for m in report["metrics"]]])
    return buf.getvalue()
