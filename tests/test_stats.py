"""Statistics behind the report's verdicts, and the seeds axis of the pipeline."""
import math

import pytest
import torch

from guardx.stats import bootstrap_interval, paired_comparison, summary, t_interval, verdict


def test_t_interval_matches_the_textbook_formula():
    diffs = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, sd sqrt(2.5), t(0.975, 4) = 2.7764451
    lo, hi = t_interval(diffs)
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)
    assert lo == pytest.approx(3 - half, abs=1e-6) and hi == pytest.approx(3 + half, abs=1e-6)


def test_verdicts_follow_the_interval():
    assert verdict(0.1, 2.0) == "better" and verdict(-3.0, -0.5) == "worse" and verdict(-1.0, 1.0) == "within noise"
    same = paired_comparison({0: 50.0, 1: 60.0, 2: 55.0}, {0: 40.0, 1: 50.0, 2: 45.0})  # +10 on every seed
    assert same["verdict"] == "better" and same["ci"][0] == pytest.approx(10.0) == same["ci"][1]
    noisy = paired_comparison({0: 50.0, 1: 40.0, 2: 55.0}, {0: 45.0, 1: 45.0, 2: 50.0})
    assert noisy["verdict"] == "within noise" and noisy["ci"][0] < 0 < noisy["ci"][1]
    assert paired_comparison({0: 1.0}, {1: 2.0})["verdict"] == "n/a"  # no shared seed: no claim


def test_bootstrap_over_images_with_one_seed():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(2000, generator=g) < 0.5
    better = base | (torch.rand(2000, generator=g) < 0.2)  # ~10 points more correct, on the same images
    lo, hi = bootstrap_interval(better, base)
    diff = 100 * (better.double() - base.double()).mean().item()
    assert lo < diff < hi and lo > 0
    c = paired_comparison({0: 60.0}, {0: 50.0}, per_sample=(better, base))
    assert c["verdict"] == "better" and "bootstrap" in c["interval"]
    tie = paired_comparison({0: 50.0}, {0: 50.0}, per_sample=(base, base))
    assert tie["verdict"] == "within noise"


def test_summary_is_mean_and_sample_std():
    s = summary([1.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(math.sqrt(2)) and s["values"] == [1.0, 3.0]


@pytest.mark.slow
def test_pipeline_runs_every_method_per_seed_and_compares_them(tiny_cfg):
    from guardx import pipeline

    cfg = tiny_cfg("run.seeds=[3,4]", "pipeline.eval_teacher=false", "pipeline.baseline=plain",
                   "pipeline.methods=[{name: guard, objective: {name: guard, mode: lossdiff}}, "
                   "{name: plain, objective: {name: plain}}]")
    report = pipeline.run(cfg)
    out = pipeline.Path(cfg.run.out_dir)
    assert sorted((r["method"], r["seed"]) for r in report["rows"]) == \
        [("guard", 3), ("guard", 4), ("plain", 3), ("plain", 4)]
    assert (out / "guard" / "seed3" / "train" / "student.pt").is_file()
    guard = next(s for s in report["summary"] if s["method"] == "guard")
    acc = {r["seed"]: r["accuracy"]["clean"] for r in report["rows"] if r["method"] == "guard"}
    assert guard["metrics"]["clean"]["values"] == [acc[3], acc[4]]
    comp = [c for c in report["comparisons"] if c["metric"] == "clean"]
    assert len(comp) == 1 and comp[0]["method"] == "guard" and comp[0]["baseline"] == "plain"
    base = {r["seed"]: r["accuracy"]["clean"] for r in report["rows"] if r["method"] == "plain"}
    assert comp[0]["diffs"] == [acc[3] - base[3], acc[4] - base[4]]
    md = (out / "report.md").read_text()
    assert "guard − plain" in md and "Student t over 2 seeds" in md
