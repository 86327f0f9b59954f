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


def test_paper_table_puts_methods_in_columns_and_attacks_in_rows():
    from guardx.config import load_config
    from guardx.report import metric_label, paper_table, summarize

    cfg = load_config(None, ["evaluate.attacks=[pgd100,cw]", "evaluate.eps=[1/255]", "pipeline.methods=["
                             "{name: a1, column: DC, group: IPC 1}, {name: b1, column: GUARD(DC), group: IPC 1}, "
                             "{name: a10, column: DC, group: IPC 10}]"])
    metrics = ["clean", "pgd100@1/255", "cw"]
    rows = [{"method": m, "model": "student", "seed": 0, "accuracy": {"n": 10, "clean": c, "pgd100@1/255": c - 5,
                                                                     "cw": c - 7}}
            for m, c in (("a1", 30.0), ("b1", 31.0), ("a10", 45.0))]
    report = {"rows": rows, "metrics": metrics}
    report.update(summarize(report, cfg))
    lines = paper_table(report, cfg).splitlines()
    assert lines[0] == "| group | attack | DC | GUARD(DC) |"
    assert lines[2:5] == ["| IPC 1 | None (Clean) | 30.00 | 31.00 |", "| IPC 1 | PGD100 | 25.00 | 26.00 |",
                          "| IPC 1 | CW | 23.00 | 24.00 |"]
    assert lines[5] == "| IPC 10 | None (Clean) | 45.00 | – |"  # no GUARD(DC) at ipc 10 here
    assert metric_label("autoattack@4/255", 2) == "AutoAttack @ 4/255" and metric_label("mim20@1/255", 1) == "MIM20"


def test_workers_run_seeds_and_evaluations_in_processes_with_the_in_process_result(tiny_cfg, tmp_path):
    import os

    from guardx import pipeline
    from guardx.models._io import load_model

    cfg = tiny_cfg("run.seeds=[3,4]", "pipeline.eval_teacher=false",
                   "pipeline.methods=[{name: plain, objective: {name: plain}}]")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # the workers' share: same kernels, same numbers
    try:
        seq = pipeline.run(cfg.with_overrides({"run": {"out_dir": str(tmp_path / "seq")}}))
    finally:
        torch.set_num_threads(threads)
    par = pipeline.run(cfg.with_overrides({"pipeline": {"workers": 2}}))
    assert [(r["seed"], r["accuracy"]) for r in par["rows"]] == [(r["seed"], r["accuracy"]) for r in seq["rows"]]
    for seed in (3, 4):
        a, _ = load_model(tmp_path / "seq" / "plain" / f"seed{seed}" / "train" / "student.pt")
        b, _ = load_model(pipeline.Path(cfg.run.out_dir) / "plain" / f"seed{seed}" / "train" / "student.pt")
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    again = pipeline.run(cfg)  # in one process: every stage is found done, the same report
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in par["rows"]]
    assert all(v < 5 for v in again["stage_seconds"].values())


def test_record_run_copies_the_report_and_adds_command_wall_time_and_device(tmp_path, monkeypatch):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("record_run", Path(__file__).parents[1] / "scripts" / "record_run.py")
    record_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record_run)
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"rows": [1], "environment": {"git_revision": "abc"}}))
    (run / "report.md").write_text("# guardx report\n")
    (run / "report.html").write_text("<html></html>")
    monkeypatch.setattr(record_run, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(sys, "argv", ["record_run", str(run), "x-cpu", "--wall", "12.5", "--command", "make demo"])
    record_run.main()
    data = json.loads((tmp_path / "results" / "x-cpu.json").read_text())
    assert data["rows"] == [1] and data["wall_seconds_including_startup"] == 12.5 and data["command"] == "make demo"
    assert "wall time 12 s" in (tmp_path / "results" / "x-cpu.md").read_text()
    assert (tmp_path / "results" / "x-cpu.html").read_text() == "<html></html>"
