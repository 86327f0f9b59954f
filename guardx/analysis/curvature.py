"""Fig. 2: the input-space curvature of models on real test images, side by side.

    guardx analyze curvature --config configs/demo.yaml \\
        --checkpoint SRe2L=runs/demo/sre2l/squeeze/teacher.pt --checkpoint GUARD=runs/demo/guard/squeeze/teacher.pt

For the first ``--samples`` images of the test split (the same images for every model) it computes the
``--topk`` largest eigenvalues of each image's loss Hessian (:mod:`guardx.analysis.hessian`) and writes
``curvature.json`` (every eigenvalue, per model and sample, plus the settings) and ``curvature.png``:
per model, the images' largest eigenvalue λ1 sorted in decreasing order (the paper's "sorted eigenvalues";
a flatter, lower curve = a more linear loss landscape) above a histogram of all top-k eigenvalues,
on shared axes.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch

from guardx.analysis.hessian import hessian_eigenvalues
from guardx.analysis.plots import new_figure, save_figure
from guardx.data import build_loader
from guardx.models._io import load_model
from guardx.utils.io import write_json
from guardx.utils.misc import pick_device, progress


def model_spectrum(model, loader, *, samples: int, k: int, iters: int, method: str, space: str, seed: int,
                   device, show_progress: bool = True, desc: str = "curvature") -> dict:
    """Top-k eigenvalues (list per sample) of the first ``samples`` images of ``loader``."""
    eig, labels, correct = [], [], []
    bar = progress(total=samples, enabled=show_progress, desc=desc, unit="img")
    for b, (x, y) in enumerate(loader):
        if len(eig) >= samples:
            break
        x, y = x[: samples - len(eig)].to(device), y[: samples - len(eig)].to(device)
        with torch.no_grad():
            correct += (model(x).argmax(1) == y).tolist()
        eig += hessian_eigenvalues(model, x, y, k=k, iters=iters, method=method, space=space,
                                   seed=seed + b).cpu().tolist()
        labels += y.tolist()
        bar.update(len(y))
    bar.close()
    top1 = [e[0] for e in eig]
    return {"eigenvalues": eig, "labels": labels, "correct": correct,
            "summary": {"n": len(eig), "top1_mean": statistics.fmean(top1), "top1_median": statistics.median(top1),
                        "top1_max": max(top1), "top1_min": min(top1)}}


def plot_curvature(models: list[dict], path: Path, *, space: str) -> None:
    """Sorted λ1 (top row) and the top-k histogram (bottom row), one column per model, shared axes."""
    fig, axes = new_figure(2, len(models), width=4.2, height=3.2, sharey="row", sharex="row", squeeze=False)
    all_eigs = [v for m in models for e in m["eigenvalues"] for v in e]
    lo, hi = min(all_eigs), max(all_eigs)
    bins = torch.linspace(lo, hi if hi > lo else lo + 1e-12, 41).tolist()
    for col, m in enumerate(models):
        top1 = sorted((e[0] for e in m["eigenvalues"]), reverse=True)
        ax = axes[0][col]
        ax.plot(range(1, len(top1) + 1), top1, lw=1.5)
        ax.set_title(m["label"])
        ax.set_xlabel("image (sorted by λ1)")
        ax.grid(alpha=0.3)
        ax = axes[1][col]
        ax.hist([v for e in m["eigenvalues"] for v in e], bins=bins, color="tab:orange")
        ax.set_xlabel(f"top-{len(m['eigenvalues'][0])} Hessian eigenvalues")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"largest eigenvalue λ1 ({space} input)")
    axes[1][0].set_ylabel("count")
    save_figure(fig, path)


def run_curvature(cfg, entries: list[tuple[str, Path]], *, samples: int, k: int, iters: int, method: str,
                  space: str, batch_size: int, out: Path) -> dict:
    device = pick_device(cfg.run.device)
    results = []
    for label, path in entries:
        model, meta = load_model(path, device)
        data_cfg = dataclasses.replace(cfg.data, resolution=meta.get("resolution", cfg.data.resolution))
        split = "test" if cfg.data.dataset == "digits" else "val"
        loader = build_loader(data_cfg, split, batch_size=batch_size, seed=cfg.run.seed, augment=False,
                              device=device, max_samples=samples, classes=meta.get("classes"))  # the model's label order
        t0 = time.perf_counter()
        spec = model_spectrum(model, loader, samples=samples, k=k, iters=iters, method=method, space=space,
                              seed=cfg.run.seed, device=device, show_progress=cfg.run.progress,
                              desc=f"curvature {label}")
        results.append({"label": label, "checkpoint": str(path), "architecture": meta.get("name"),
                        "seconds": time.perf_counter() - t0, **spec})
    report = {"space": space, "method": method, "iters": iters, "topk": k, "samples": samples, "split": split,
              "seed": cfg.run.seed, "device": str(device), "models": results}
    write_json(report, out / "curvature.json")
    plot_curvature(results, out / "curvature.png", space=space)
    return report
