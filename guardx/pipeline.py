"""Pipeline: every method's distiller stages, then train and evaluate, then one report.

    guardx pipeline --config configs/demo.yaml

A method (``pipeline.methods``) names a distiller (SRe2L: squeeze → recover → relabel; CDA; ...), the
objective of its real-data training (``objective``, e.g. GUARD) and any other per-method settings
(``overrides``). Each method gets ``<out_dir>/<method>/``; the report lands in
``<out_dir>/report.{md,json,csv}``. Every stage skips what is done, so rerunning after an interruption
continues where it stopped.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from guardx.attacks.plan import metric_names
from guardx.config import Config, dump_config, from_dict
from guardx.distill import DISTILLERS
from guardx.distributed import init_distributed
from guardx.errors import ConfigError
from guardx.report import summarize, write_pipeline_report
from guardx.stage_guard import own_folder
from guardx.stages import stage_module
from guardx.utils.env import environment
from guardx.utils.io import write_text


def method_config(cfg: Config, method, seed: int | None = None) -> Config:
    """The config ``method``'s stages run with: its overrides and objective, its distiller's adjustments,
    its own run folder (``<out_dir>/<method>``, or ``<out_dir>/<method>/seed<k>`` for one of ``run.seeds``)."""
    mcfg = cfg.with_overrides({**method.overrides, "objective": method.objective})
    mcfg.run.distiller = method.distiller
    mcfg = DISTILLERS.build(method.distiller, mcfg)
    mcfg.run.out_dir = str(Path(cfg.run.out_dir) / method.name / (f"seed{seed}" if seed is not None else ""))
    if seed is not None:
        mcfg.run.seed = seed
    # each method evaluates its own teacher/student into its own run dir (evaluate.checkpoints/out_dir are
    # for standalone `guardx evaluate`)
    mcfg.evaluate.checkpoints, mcfg.evaluate.out_dir = [], ""
    return mcfg


def method_stages(cfg: Config, method) -> list[str]:
    """The distiller's stages, then train and evaluate; ``pipeline.stages`` (if set) keeps a subset."""
    stages = [*DISTILLERS.get(method.distiller).stages, "train", "evaluate"]
    return [s for s in stages if not cfg.pipeline.stages or s in cfg.pipeline.stages]


# Stages whose folder is named after the stage and whose result is fully described by its fingerprint: when
# two methods of a pipeline would run one of them with the same settings (e.g. SRe2L and CDA share their
# squeeze; GUARD at ipc 10 and 50 shares its teacher), the second links to the first's folder.
SHAREABLE = ("squeeze", "recover", "relabel", "buffers", "dc")


class StageSharing:
    """Which (stage, fingerprint) a method of this pipeline produced first, and where."""

    def __init__(self, ctx, enabled: bool):
        self.ctx, self.enabled = ctx, enabled
        self.first: dict[tuple[str, str], Path] = {}
        self.teacher_rows: dict[Path, dict] = {}  # producer's squeeze folder -> its evaluated teacher row

    def link(self, mcfg: Config, stage: str) -> Path | None:
        """Make ``stage``'s folder of ``mcfg``'s run the one an earlier method produced with the same settings
        (a relative symlink); returns that folder, or None when this method produces the stage itself."""
        from guardx.paths import layout
        from guardx.stage_guard import digest
        from guardx.stages import result_settings

        if not self.enabled or stage not in SHAREABLE:
            return None
        folder = layout(mcfg).stage(stage)
        key = (stage, digest(result_settings(mcfg, stage)))
        source = self.first.setdefault(key, folder)
        if source == folder or (folder.exists() and not folder.is_symlink()):
            return None  # the first producer, or a folder of a run before sharing: it keeps its own work
        if self.ctx.is_main and not folder.is_symlink():
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.symlink_to(os.path.relpath(source, folder.parent), target_is_directory=True)
        self.ctx.barrier()
        return source


def run(cfg: Config) -> dict:
    base = Path(cfg.run.out_dir)
    ctx = init_distributed(cfg)
    # one pipeline per out_dir: a second one stops at once naming this one (each stage also locks its folder)
    with own_folder(base, ctx, recursive=False):
        return _run(cfg, base, ctx)


def _run(cfg: Config, base: Path, ctx) -> dict:
    if ctx.is_main:
        write_text(dump_config(cfg), base / "config.yaml")
    t0 = time.perf_counter()
    seeds = cfg.run.seeds or [None]  # None: the single run.seed, in the method's own folder
    if cfg.pipeline.workers > 1 and ctx.world_size > 1:
        raise ConfigError(f"pipeline.workers={cfg.pipeline.workers} runs work in separate processes of one machine; "
                          f"under torchrun ({ctx.world_size} ranks) leave it at 1")
    worker_timings = _run_in_processes(cfg, seeds) if cfg.pipeline.workers > 1 else {}
    # in-process: every stage (all done already when workers ran them) and the rows, from the stages' caches
    announce = False if worker_timings else None  # the workers announced the stages they ran
    per_seed = [_run_seed(cfg, seed, ctx, announce) for seed in seeds]
    rows = [r for seed_rows, _ in per_seed for r in seed_rows]
    timings = {k: v for _, seed_timings in per_seed for k, v in seed_timings.items()} | worker_timings
    report = {"rows": rows, "metrics": metric_names(cfg), "seeds": [s for s in seeds if s is not None]
              or [cfg.run.seed], "stage_seconds": timings, "total_seconds": time.perf_counter() - t0,
              "config": cfg.to_dict(), "environment": {**environment(ctx.device), "world_size": ctx.world_size}}
    report.update(summarize(report, cfg))
    if ctx.is_main:
        write_pipeline_report(report, cfg, base)
    return report


def _run_seed(cfg: Config, seed: int | None, ctx, announce: bool | None = None,
              only=lambda method, stage: True) -> tuple[list[dict], dict[str, float]]:
    """Every method of one seed, in order: its stages (shared where another method ran the same one), and its
    evaluated rows. Stages are shared only within a seed (every stage's result depends on run.seed).
    ``only(method_name, stage)`` selects the stages to run (the others still decide what is shared)."""
    rows, timings = [], {}
    announce = cfg.run.progress if announce is None else announce
    sharing = StageSharing(ctx, cfg.pipeline.share_stages)
    for method in cfg.pipeline.methods:
        mcfg = method_config(cfg, method, seed)
        tag = method.name + (f" seed {seed}" if seed is not None else "")
        shared_teacher = None
        for stage in method_stages(cfg, method):
            source = sharing.link(mcfg, stage)
            if stage == "squeeze" and source is not None:
                shared_teacher = source  # evaluated once, by the method that trained it
                mcfg.pipeline.eval_teacher = False
            if not only(method.name, stage):
                continue
            if ctx.is_main and announce:
                print(f"[{tag}] {stage}" + (f" (shared with {source.parent.name})" if source else ""), flush=True)
            ts = time.perf_counter()
            result = stage_module(stage).run(mcfg)
            timings[f"{method.name}/{stage}" + (f"/seed{seed}" if seed is not None else "")] = \
                time.perf_counter() - ts
            if stage == "evaluate":
                if shared_teacher is not None and shared_teacher in sharing.teacher_rows:
                    result = [dict(sharing.teacher_rows[shared_teacher]), *result]
                for r in result:
                    r.update(method=method.name, distiller=method.distiller, seed=mcfg.run.seed,
                             run_dir=mcfg.run.out_dir,
                             objective={"name": mcfg.objective.name, **mcfg.objective.params()})
                    if r["model"] == "teacher" and shared_teacher is None:
                        sharing.teacher_rows[Path(mcfg.run.out_dir) / "squeeze"] = dict(r)
                rows += result
    return rows, timings


def _worker(cfg_dict: dict, seed: int | None, threads: int, method: str | None) -> dict[str, float]:
    """One unit of ``pipeline.workers``: a seed's stages up to train (``method`` None), or one method's evaluate."""
    import torch

    torch.set_num_threads(threads)
    cfg = from_dict(cfg_dict)
    announce, cfg.run.progress = cfg.run.progress, False  # several bars at once are unreadable: stage lines only
    if method is None:
        def only(m, stage): return stage != "evaluate"
    else:
        def only(m, stage): return (m, stage) == (method, "evaluate")
    return _run_seed(cfg, seed, init_distributed(cfg), announce, only)[1]


def _run_in_processes(cfg: Config, seeds: list[int | None]) -> dict[str, float]:
    """``pipeline.workers`` processes (spawned: no inherited threads or locks), each with its share of the
    cores: every seed's stages up to train (a seed per process: its methods share stages), and each (seed,
    method) evaluation as soon as its seed is trained (AutoAttack's and Square's cost is per model, so a study
    is mostly these, and they fill a process a last seed's training would leave idle). Every stage locks its
    own folder and resumes, so an interrupted run continues where each unit stopped; the report is then
    assembled in this process from the stages' results. Returns each stage's seconds."""
    import concurrent.futures as cf
    import multiprocessing as mp

    workers, cores = cfg.pipeline.workers, os.cpu_count() or 1
    train_threads, eval_threads = max(1, cores // min(workers, len(seeds))), max(1, cores // workers)
    print(f"[pipeline] {workers} processes: seeds' training with {train_threads} thread(s) each, each "
          f"evaluation (once its seed is trained) with {eval_threads}", flush=True)
    evaluated = [m.name for m in cfg.pipeline.methods if "evaluate" in method_stages(cfg, m)]
    timings: dict[str, float] = {}
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        # the queue is first in, first out: every seed's training is queued before any evaluation
        training = {pool.submit(_worker, cfg.to_dict(), seed, train_threads, None): seed for seed in seeds}
        pending = set(training)
        try:
            while pending:
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    timings.update(f.result())
                    if f in training:  # this seed's students exist: its evaluations can start
                        pending |= {pool.submit(_worker, cfg.to_dict(), training[f], eval_threads, name)
                                    for name in evaluated}
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    return timings
