"""Evaluate: clean and adversarial accuracy of saved models on the test split.

    guardx evaluate --config configs/demo.yaml                   # the run's teacher and student
    guardx evaluate --config C --checkpoint sre2l=a/train/student.pt --checkpoint guard=b/train/student.pt \\
        --attacks pgd100,square,autoattack,cw,mim --eps 1/255 --out results/
    torchrun --nproc-per-node 8 -m guardx evaluate --config C distributed.backend=ddp ...

How the numbers are made (each choice is what the field does, or says why it differs):

* Attacks see images in [0, 1] (the normaliser is inside the model), ε is in pixel units (1/255 means
  what the paper means), and BatchNorm uses running statistics (eval mode).
* A sample misclassified when clean counts as broken under every attack and is not attacked, so robust
  accuracy ≤ clean accuracy by construction. Every bounded attack's output is projected onto the
  ε-ball ∩ [0, 1] before it is counted (a no-op for a correct attack; a warning if it was not).
* CW-L2 is unbounded (the paper exempts it from ε): it is reported once, as ``cw``, the share of samples
  for which CW found no misclassified point at any distance.
* Work is dealt out in fixed global blocks of ``evaluate.batch_size`` samples: rank r of W takes blocks
  r, r+W, ...; each block's attack randomness is seeded by (run.seed, block, metric). A block's result is
  therefore the same whatever the world size, and the summed counts of W ranks equal one rank's
  (tested with 2 gloo ranks). Loaders without block sharding fall back to per-rank seeding
  (reproducible for a fixed world size only; the results record which).
* Resumable: each rank logs finished blocks to ``<out>/.partial/``; a rerun with the same settings
  reuses them (any world size in block mode) and a finished model's json is reused outright.

Writes ``<out>/<label>.json`` per model and ``<out>/results.{md,json,csv}`` (``out`` =
``evaluate.out_dir`` or ``<run>/evaluate``), with every attack setting and the seed.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import re
import shutil
import time
import warnings
from pathlib import Path

import torch

from guardx.attacks import attack_info, parse_attack, run_attack
from guardx.config import Config
from guardx.data import build_loader
from guardx.distributed import init_distributed
from guardx.errors import ConfigError, GuardxError
from guardx.models._io import load_model
from guardx.utils.env import environment
from guardx.utils.io import read_json, write_json, write_text
from guardx.utils.misc import derive_seed, fmt_eps, progress


def stage_dir(cfg: Config) -> Path:
    return Path(cfg.evaluate.out_dir) if cfg.evaluate.out_dir else Path(cfg.run.out_dir) / "evaluate"


# --------------------------------------------------------------------------- what to run

@dataclasses.dataclass(frozen=True)
class Job:
    metric: str          # column name, e.g. "pgd100@1/255" or "cw"
    attack: str          # registered attack name
    eps: float | None    # None for unbounded attacks
    params: dict


def jobs(cfg: Config) -> list[Job]:
    out = []
    for spec in cfg.evaluate.attacks:
        name, params = parse_attack(spec)[0], cfg.evaluate.attack_params(spec)
        if attack_info(spec).bounded:
            out += [Job(f"{spec}@{fmt_eps(e)}", name, e, params) for e in cfg.evaluate.eps]
        else:
            out.append(Job(spec, name, None, params))
    return out


def metric_names(cfg: Config) -> list[str]:
    return ["clean"] + [j.metric for j in jobs(cfg)]


def describe(cfg: Config) -> str:
    """One line naming every attack with its settings (for reports)."""
    parts = []
    for spec in cfg.evaluate.attacks:
        p = cfg.evaluate.attack_params(spec)
        parts.append(f"{spec} (" + ", ".join(f"{k}={_short(v)}" for k, v in p.items()) + ")" if p else spec)
    eps = ", ".join(fmt_eps(e) for e in cfg.evaluate.eps)
    return f"attacks: {'; '.join(parts)} · ε ∈ {{{eps}}} (L∞, pixel units; cw: unbounded L2)"


def _short(v):
    if v is None:  # only step sizes default to None
        return "ε/4"
    return f"{v:.3g}" if isinstance(v, float) else v


def settings(cfg: Config) -> dict:
    """Everything the numbers depend on (a cached result is reused only when this matches)."""
    return {"attacks": list(cfg.evaluate.attacks), "eps": list(cfg.evaluate.eps),
            "params": {spec: cfg.evaluate.attack_params(spec) for spec in cfg.evaluate.attacks},
            "metrics": metric_names(cfg), "batch_size": cfg.evaluate.batch_size,
            "max_samples": cfg.evaluate.max_samples, "seed": cfg.run.seed,
            "data": {"dataset": cfg.data.dataset, "backend": cfg.data.backend, "val_dir": cfg.data.val_dir,
                     "ffcv_val": cfg.data.ffcv_val, "val_crop_ratio": cfg.data.val_crop_ratio}}


BLOCK_LOG_EVERY_S = 30.0  # how often a rank rewrites its log of finished blocks


# --------------------------------------------------------------------------- the loop

class BlockLog:
    """Finished blocks' counts, so an interrupted evaluation resumes. Each rank rewrites (atomically) its
    own ``rank<r>.json``; on start every rank reads all of them, so a rerun on another world size still
    reuses them (block keys are global in block mode)."""

    def __init__(self, folder: Path | None, rank: int, every_s: float | None = None):
        self.folder, self.rank = folder, rank
        self.every_s = BLOCK_LOG_EVERY_S if every_s is None else every_s
        self.done: dict[str, list[int]] = {}
        self.mine: dict[str, list[int]] = {}
        self._last = time.monotonic()
        if folder is not None and folder.is_dir():
            for f in sorted(folder.glob("rank*.json")):
                try:
                    self.done.update(read_json(f))
                except (OSError, ValueError):
                    pass  # a log from a crashed writer is only a cache

    def add(self, key: str, counts: list[int]) -> None:
        self.mine[key] = counts
        if self.folder is not None and time.monotonic() - self._last > self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.folder is not None and self.mine:
            write_json(self.mine, self.folder / f"rank{self.rank}.json")
            self._last = time.monotonic()


def evaluate_model(model, loader, cfg: Config, ctx, *, desc: str = "evaluate",
                   log: BlockLog | None = None) -> tuple[dict, dict, bool]:
    """``(accuracy % per metric with "n", counts per metric, block_mode)`` over all ranks' blocks."""
    model.eval()
    todo = jobs(cfg)
    names = ["clean"] + [j.metric for j in todo]
    block_mode = getattr(loader, "shard_block", 0) == cfg.evaluate.batch_size
    log = log or BlockLog(None, ctx.rank)
    totals = torch.zeros(len(names) + 1, dtype=torch.float64)  # [n, clean, metric...]
    warned: set[str] = set()
    bar = progress(loader, enabled=cfg.run.progress and ctx.is_main, total=len(loader), desc=desc, unit="batch")
    t0, seen = time.perf_counter(), 0
    for k, (x, y) in enumerate(bar):
        key = str(ctx.rank + k * ctx.world_size) if block_mode else f"w{ctx.world_size}r{ctx.rank}b{k}"
        if key in log.done:
            counts = log.done[key]
        elif len(y) == 0:
            counts = [0] * (len(names) + 1)
        else:
            counts = _evaluate_block(model, x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True),
                                     todo, seed=cfg.run.seed, key=key, warned=warned)
        log.add(key, counts)
        totals += torch.tensor(counts, dtype=torch.float64)
        seen += len(y)
        n = max(totals[0].item(), 1)
        bar.set_postfix({"img/s": f"{seen / (time.perf_counter() - t0):.1f}",
                         **{m: f"{100 * c / n:.1f}" for m, c in zip(names, totals[1:].tolist())}})
    bar.close()
    log.flush()
    summed = ctx.all_reduce_sum(totals.to(ctx.device)).cpu()
    n = int(summed[0])
    counts = {m: int(c) for m, c in zip(names, summed[1:].tolist())}
    return {"n": n, **{m: 100.0 * c / max(n, 1) for m, c in counts.items()}}, counts, block_mode


def _evaluate_block(model, x, y, todo: list[Job], *, seed: int, key: str, warned: set) -> list[int]:
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    counts = [len(y), int(clean_ok.sum())]  # one host sync per block and metric, nothing per step
    # a sample misclassified when clean counts as broken under every attack: attack only the rest
    xs, ys = x[clean_ok], y[clean_ok]
    for job in todo:
        if len(ys) == 0:
            counts.append(0)
            continue
        x_adv = run_attack(job.attack, model, xs, ys, job.eps, seed=derive_seed(seed, key, job.metric), **job.params)
        x_adv = _admissible(x_adv, xs, job, warned)
        with torch.no_grad():
            counts.append(int((model(x_adv).argmax(1) == ys).sum()))
    return counts


def _admissible(x_adv: torch.Tensor, x: torch.Tensor, job: Job, warned: set) -> torch.Tensor:
    """Project onto the threat model (ε-ball ∩ [0, 1]) so that a faulty attack can never overstate its success."""
    finite = torch.isfinite(x_adv)
    x_adv = torch.where(finite, x_adv.detach(), x)
    bad = (x_adv < 0).flatten(1).any(1) | (x_adv > 1).flatten(1).any(1) | ~finite.flatten(1).all(1)
    if job.eps is not None:
        bad |= (x_adv - x).abs().flatten(1).amax(1) > job.eps + 1e-5
        x_adv = torch.min(torch.max(x_adv, x - job.eps), x + job.eps)
    x_adv = x_adv.clamp(0, 1)
    if bad.any() and job.metric not in warned:
        warned.add(job.metric)
        warnings.warn(f"{job.metric}: the attack returned {int(bad.sum())} point(s) outside the ε-ball or [0, 1]; "
                      "projected before counting", stacklevel=2)
    return x_adv


# --------------------------------------------------------------------------- one checkpoint

def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "model"


def evaluate_checkpoint(path: Path, cfg: Config, *, label: str) -> dict:
    """Evaluate one saved model; reuses ``<out>/<label>.json`` when its settings and checkpoint match."""
    path = Path(path)
    if not path.is_file():
        raise GuardxError(f"checkpoint not found: {path}")
    out = stage_dir(cfg) / f"{_safe(label)}.json"
    key_settings = {**settings(cfg), "checkpoint": _fingerprint(path)}
    ctx = init_distributed(cfg)
    if out.is_file():
        previous = read_json(out)
        if previous.get("settings") == key_settings:
            return previous
    model, meta = load_model(path, ctx.device)
    data_cfg = dataclasses.replace(cfg.data, resolution=meta.get("resolution", cfg.data.resolution))
    split = "test" if cfg.data.dataset == "digits" else "val"
    loader = build_loader(data_cfg, split, ctx.rank, ctx.world_size, batch_size=cfg.evaluate.batch_size,
                          seed=cfg.run.seed, augment=False, device=ctx.device, max_samples=cfg.evaluate.max_samples,
                          shard_block=True)
    if loader.num_classes != meta.get("num_classes", loader.num_classes):
        raise ConfigError(f"{path} predicts {meta['num_classes']} classes but the {split} split has "
                          f"{loader.num_classes}: point data.* at the data it was trained on")
    digest = hashlib.sha256(json.dumps(key_settings, sort_keys=True).encode()).hexdigest()[:12]
    partial = stage_dir(cfg) / ".partial" / f"{_safe(label)}-{digest}"
    log = BlockLog(partial, ctx.rank)
    ctx.barrier()  # every rank has read the logs before any rank rewrites its own
    t0 = time.perf_counter()
    acc, counts, block_mode = evaluate_model(model, loader, cfg, ctx, desc=f"evaluate {label}", log=log)
    seconds = time.perf_counter() - t0
    result = {"label": label, "checkpoint": str(path), "architecture": meta.get("name"), "accuracy": acc,
              "counts": counts, "settings": key_settings, "seconds": seconds, "world_size": ctx.world_size,
              "sharding": "block" if block_mode else "per-rank (reproducible for this world size only)",
              "split": split, "resolution": data_cfg.resolution, "device": str(ctx.device),
              "environment": environment(ctx.device)}
    ctx.barrier()  # every rank has flushed its block log before rank 0 replaces it with the result
    if ctx.is_main:
        write_json(result, out)
        shutil.rmtree(partial, ignore_errors=True)
        if partial.parent.is_dir() and not any(partial.parent.iterdir()):
            partial.parent.rmdir()
    ctx.barrier()
    return result


def labelled_paths(specs: list[str], what: str = "evaluate.checkpoints") -> list[tuple[str, Path]]:
    """``["guard=a/student.pt", "b/student.pt"]`` -> unique ``(label, path)`` pairs; unnamed entries are
    labelled by their file stem, with parent folders added until the labels are unique."""
    named = []
    for s in specs:
        label, sep, p = s.partition("=")
        named.append((label, Path(p)) if sep and label and p else (None, Path(s)))
    unnamed = [p for label, p in named if label is None]
    depth = 1
    while True:
        auto = {p: "/".join(p.with_suffix("").parts[-depth:]) for p in unnamed}
        if len(set(auto.values())) == len(auto) or depth > max((len(p.parts) for p in unnamed), default=1):
            break
        depth += 1
    entries = [(label if label is not None else auto[p], p) for label, p in named]
    labels = [lab for lab, _ in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{what}: labels must be unique, got {labels}")
    return entries


# --------------------------------------------------------------------------- reports

def results_table(rows: list[dict], names: list[str]) -> str:
    """Markdown table; each row has ``method``, ``model`` and ``accuracy``."""
    head = "| method | model | " + " | ".join(names) + " |"
    sep = "|---|---|" + "---:|" * len(names)
    lines = [head, sep]
    for r in rows:
        acc = r["accuracy"]
        lines.append(f"| {r['method']} | {r['model']} | " + " | ".join(f"{acc[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def results_csv(rows: list[dict], cfg: Config) -> str:
    """One line per (model, metric) with the attack, ε, its parameters and the seed."""
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
                        json.dumps(job.params if job else {}, sort_keys=True), cfg.run.seed, r["accuracy"]["n"],
                        r.get("counts", {}).get(m, ""), f"{r['accuracy'][m]:.4f}"])
    return buf.getvalue()


def write_results(rows: list[dict], cfg: Config) -> None:
    out = stage_dir(cfg)
    names = metric_names(cfg)
    subset = f"the first {cfg.evaluate.max_samples}" if cfg.evaluate.max_samples else "all"
    md = ["# guardx evaluate", "", f"{describe(cfg)} · seed {cfg.run.seed}", "",
          f"Accuracy (%) on {subset} test images (n = {rows[0]['accuracy']['n']}):", "",
          results_table(rows, names), ""]
    write_text("\n".join(md), out / "results.md")
    write_json({"metrics": names, "seed": cfg.run.seed, "settings": settings(cfg),
                "describe": describe(cfg), "rows": rows}, out / "results.json")
    write_text(results_csv(rows, cfg), out / "results.csv")


def run(cfg: Config) -> list[dict]:
    from guardx.squeeze import teacher_path
    from guardx.train import student_path

    rows = []
    if cfg.evaluate.checkpoints:
        for label, path in labelled_paths(cfg.evaluate.checkpoints):
            result = evaluate_checkpoint(path, cfg, label=label)
            rows.append({"method": label, "model": result.get("architecture") or path.stem, **result})
    else:
        for label, path in (("teacher", teacher_path(cfg)), ("student", student_path(cfg))):
            if path.is_file() and (label == "student" or cfg.pipeline.eval_teacher):
                rows.append({"method": Path(cfg.run.out_dir).name, "model": label,
                             **evaluate_checkpoint(path, cfg, label=label)})
    ctx = init_distributed(cfg)
    if ctx.is_main and rows:
        write_results(rows, cfg)
    return rows
