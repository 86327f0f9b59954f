"""Statistics for claims over seeds: mean and spread, and paired comparisons with confidence intervals.

A comparison of method A against a baseline B is *paired*: per seed, A and B share the seed (same data
order, same initial weights where the stages allow), so the per-seed differences d_s = A_s − B_s carry
the effect and the 95 % interval is mean(d) ± t(0.975, n−1) · sd(d)/√n (Student t over n ≥ 2 seeds).
With a single seed there is no spread over seeds to use; the interval then comes from a paired
bootstrap over test images (the per-image correctness of both models on the same images), which
measures only the test-set sampling noise, not the training noise — the report says which was used.
"""
from __future__ import annotations

import math
import statistics

import torch

CONFIDENCE = 0.95


def summary(values: list[float]) -> dict:
    """mean, sample std (0 for one value), n and the values themselves."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": list(values)}


def t_interval(diffs: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t confidence interval of the mean of ``diffs`` (n ≥ 2)."""
    from scipy.stats import t  # scipy comes with scikit-learn, a core dependency

    n = len(diffs)
    mean = statistics.fmean(diffs)
    half = t.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean - half, mean + half


def bootstrap_interval(a: torch.Tensor, b: torch.Tensor, *, resamples: int = 10_000, seed: int = 0,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of mean(a − b) · 100 (accuracy points) by resampling the paired items."""
    d = (a.double() - b.double()) * 100.0
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(d), (resamples, len(d)), generator=gen)
    means = d[idx].mean(1).sort().values
    lo = means[int(math.floor((1 - confidence) / 2 * (resamples - 1)))].item()
    hi = means[int(math.ceil((1 + confidence) / 2 * (resamples - 1)))].item()
    return lo, hi


def verdict(lo: float, hi: float) -> str:
    """Plain words for an interval of a difference: better / worse / within noise."""
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "within noise"


def paired_comparison(method: dict[int, float], baseline: dict[int, float], *, per_sample=None) -> dict:
    """Compare per-seed accuracies ``{seed: %}`` of a method with a baseline's on the seeds both have.

    ``per_sample`` = ``(method_flags, baseline_flags)`` bool tensors on the same test images, used for the
    bootstrap when only one seed is shared."""
    seeds = sorted(set(method) & set(baseline))
    diffs = [method[s] - baseline[s] for s in seeds]
    out = {"seeds": seeds, "diffs": diffs, "mean_diff": statistics.fmean(diffs) if diffs else float("nan")}
    if len(seeds) >= 2:
        lo, hi = t_interval(diffs)
        out.update(ci=[lo, hi], interval=f"Student t over {len(seeds)} seeds")
    elif len(seeds) == 1 and per_sample is not None:
        lo, hi = bootstrap_interval(*per_sample, seed=seeds[0])
        out.update(ci=[lo, hi], interval="paired bootstrap over test images (one seed)")
    else:
        out.update(ci=None, interval="none (no shared seed or no per-image results)")
        return {**out, "verdict": "n/a"}
    return {**out, "verdict": verdict(*out["ci"])}
