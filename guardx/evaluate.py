"""Evaluate: clean and adversarial accuracy of the teacher and the student on the test split.

    guardx evaluate --config configs/demo.yaml evaluate.eps=[1/255,4/255,8/255]

Attacks run on images in [0, 1] (the normaliser is inside the model), with ε in pixel units, so
ε = 1/255 means what the paper means. Each rank evaluates a disjoint shard; counts are summed.
Writes ``<run>/evaluate/<teacher|student>.json`` and a markdown table.
"""
from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path

import torch

from guardx.attacks import run_attack
from guardx.config import Config
from guardx.data import build_loader
from guardx.distributed import init_distributed
from guardx.models._io import load_model
from guardx.utils.io import read_json, write_json, write_text
from guardx.utils.misc import progress


def stage_dir(cfg: Config) -> Path:
    return Path(cfg.run.out_dir) / "evaluate"


def fmt_eps(eps: float) -> str:
    """1/255-style label when ε is a multiple of 1/255, else the plain number."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return str(Fraction(eps).limit_denominator(10000)) if eps else "0"


def metric_names(cfg: Config) -> list[str]:
    return ["clean"] + [f"{a}@{fmt_eps(e)}" for a in cfg.evaluate.attacks for e in cfg.evaluate.eps]


def attack_params(cfg: Config, name: str) -> dict:
    ev = cfg.evaluate
    if name == "pgd":
        return {"steps": ev.pgd_steps, "alpha": ev.pgd_alpha or None, "random_start": ev.pgd_random_start,
                "early_stop": ev.pgd_early_stop}
    return {}


def settings(cfg: Config) -> dict:
    return {"attacks": list(cfg.evaluate.attacks), "eps": list(cfg.evaluate.eps),
            "params": {a: attack_params(cfg, a) for a in cfg.evaluate.attacks},
            "max_samples": cfg.evaluate.max_samples, "seed": cfg.run.seed}


def evaluate_model(model, loader, cfg: Config, ctx, *, desc: str = "evaluate") -> dict:
    """Accuracy (%) per metric over the loader's shard, summed over ranks."""
    model.eval()
    names = metric_names(cfg)
    correct = torch.zeros(len(names), dtype=torch.float64)
    total = 0
    gen = torch.Generator().manual_seed(cfg.run.seed)
    bar = progress(loader, enabled=cfg.run.progress and ctx.is_main, total=len(loader), desc=desc, unit="batch")
    for x, y in bar:
        x, y = x.to(ctx.device), y.to(ctx.device)
        with torch.no_grad():
            clean_ok = model(x).argmax(1) == y
        counts = [clean_ok.sum()]
        # a sample misclassified when clean counts as broken under every attack: attack only the rest
        xs, ys = x[clean_ok], y[clean_ok]
        for attack in cfg.evaluate.attacks:
            for eps in cfg.evaluate.eps:
                if len(ys) == 0:
                    counts.append(clean_ok.sum())
                    continue
                x_adv = run_attack(attack, model, xs, ys, eps, generator=gen, **attack_params(cfg, attack))
                with torch.no_grad():
                    counts.append((model(x_adv).argmax(1) == ys).sum())
        correct += torch.stack(counts).double().cpu()
        total += len(y)
        bar.set_postfix({n: f"{100 * c / total:.1f}" for n, c in zip(names, correct.tolist())})
    bar.close()
    summed = ctx.all_reduce_sum(torch.cat([correct, torch.tensor([float(total)], dtype=torch.float64)]))
    n = int(summed[-1])
    return {"n": n, **{name: 100.0 * float(c) / max(n, 1) for name, c in zip(names, summed[:-1].tolist())}}


def evaluate_checkpoint(path: Path, cfg: Config, *, label: str) -> dict:
    """Evaluate one saved model; reuses ``<run>/evaluate/<label>.json`` when its settings match."""
    out = stage_dir(cfg) / f"{label}.json"
    if out.is_file():
        previous = read_json(out)
        if previous.get("settings") == settings(cfg):
            return previous
    ctx = init_distributed(cfg)
    model, meta = load_model(path, ctx.device)
    loader = build_loader(cfg.data, "test" if cfg.data.dataset == "digits" else "val", ctx.rank, ctx.world_size,
                          batch_size=cfg.evaluate.batch_size, seed=cfg.run.seed, augment=False,
                          device=ctx.device, max_samples=cfg.evaluate.max_samples)
    t0 = time.perf_counter()
    acc = evaluate_model(model, loader, cfg, ctx, desc=f"evaluate {label}")
    result = {"label": label, "checkpoint": str(path), "accuracy": acc, "settings": settings(cfg),
              "seconds": time.perf_counter() - t0, "world_size": ctx.world_size}
    if ctx.is_main:
        write_json(result, out)
    ctx.barrier()
    return result


def results_table(rows: list[dict], names: list[str]) -> str:
    """Markdown table; each row has ``method``, ``model`` and ``accuracy``."""
    head = "| method | model | " + " | ".join(names) + " |"
    sep = "|---|---|" + "---:|" * len(names)
    lines = [head, sep]
    for r in rows:
        acc = r["accuracy"]
        lines.append(f"| {r['method']} | {r['model']} | " + " | ".join(f"{acc[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def run(cfg: Config) -> list[dict]:
    from guardx.squeeze import teacher_path
    from guardx.train import student_path

    rows = []
    for label, path in (("teacher", teacher_path(cfg)), ("student", student_path(cfg))):
        if path.is_file() and (label == "student" or cfg.pipeline.eval_teacher):
            rows.append({"method": Path(cfg.run.out_dir).name, "model": label,
                         **evaluate_checkpoint(path, cfg, label=label)})
    ctx = init_distributed(cfg)
    if ctx.is_main and rows:
        write_text(results_table(rows, metric_names(cfg)) + "\n", stage_dir(cfg) / "results.md")
    return rows
