"""``guardx bench``: the commands run on a tiny config and write complete JSON/markdown (no timing asserts),
and the benchmark's baselines compute the same regulariser as guardx's objectives."""
import copy
import json

import pytest
import torch

from guardx.bench.methods import METHODS
from guardx.cli import main

TINY_MODEL = ["--model", "resnet18_small", "--width", "4", "--num-classes", "5", "--threads", "1",
              "--warmup", "1", "--iters", "1", "--repeats", "2"]
ENV_KEYS = {"device", "device_name", "torch", "cuda", "triton", "python", "threads", "git_revision",
            "kernels_backend", "timestamp_utc"}
POINT_KEYS = {"batch_size", "resolution", "s_per_iter", "s_per_iter_mean", "s_per_iter_std", "peak_mem_mib",
              "static_mem_mib", "step_mem_mib", "img_per_s", "final_loss", "loss_finite"}


def read(path):
    """Strict JSON: NaN/Infinity (which json.dumps writes by default) fail the test."""
    def reject(constant):
        raise AssertionError(f"{path.name} is not valid JSON: it contains {constant}")
    return json.loads(path.read_text(), parse_constant=reject)


def test_overhead_writes_every_field(tmp_path, capsys):
    assert main(["bench", "overhead", *TINY_MODEL, "--batch-size", "2", "--resolution", "8", "--isolate", "none",
                 "--pgd-steps", "2", "--out", str(tmp_path), "--name", "overhead-t4"]) == 0
    printed = capsys.readouterr().out
    data = read(tmp_path / "overhead-t4.json")
    assert data["benchmark"] == "overhead"
    assert ENV_KEYS <= set(data["env"])
    cfg = data["config"]
    assert (cfg["batch_size"], cfg["resolution"], cfg["repeats"], cfg["iters"], cfg["pgd_steps"]) == (2, 8, 2, 1, 2)
    assert cfg["methods"] == list(METHODS)
    assert list(data["methods"]) == list(METHODS)
    for name, m in data["methods"].items():
        assert POINT_KEYS <= set(m), name
        assert len(m["s_per_iter"]) == 2 and all(t > 0 for t in m["s_per_iter"])
        assert m["peak_mem_mib"] > 0 and m["time_x_plain"] > 0 and m["mem_x_plain"] > 0
        assert m["kind"] == ("baseline" if name.startswith("ref_") else "guardx")
        assert m["label"] in printed
    assert data["methods"]["plain"]["time_x_plain"] == 1.0
    assert "time_x_baseline" in data["methods"]["guard_exact"] and "time_x_baseline" in data["methods"]["guard_lossdiff"]
    # adv targets compare against PGD-10 only: with k=2 just the four GUARD-vs-plain targets apply
    assert {t["target"] for t in data["targets"]} == {
        "GUARD lossdiff step ≤ 3.3× plain (its FLOP floor)", "GUARD exact step ≤ 5× plain",
        "GUARD lossdiff peak memory ≤ 1.3× plain", "GUARD exact peak memory ≤ 1.3× plain"}
    assert all(isinstance(t["met"], bool) for t in data["targets"])
    assert data["paper_table4"]["GUARD"]["s_per_iter"] == 0.007
    md = (tmp_path / "overhead-t4.md").read_text()
    assert "| Method | Time (s) / Iter | Peak Mem |" in md and "Adv training, PGD-2" in md

    # the README block is generated from the JSON: the run's numbers appear next to the paper's
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- measured-results:start -->\n<!-- measured-results:end -->\ntail\n")
    argv = ["bench", "report", "--results", str(tmp_path), "--readme", str(readme)]
    before = readme.read_text()
    assert main([*argv, "--check"]) == 1 and readme.read_text() == before  # stale: reported, nothing written
    assert main(argv) == 0 and main([*argv, "--check"]) == 0
    block = readme.read_text()
    plain = data["methods"]["plain"]
    assert f"{plain['s_per_iter_mean']:.4g} ± {plain['s_per_iter_std']:.2e}" in block
    assert "0.007 ± 2.661e-04 s, 3851 MiB" in block and block.startswith("intro\n") and block.endswith("tail\n")


@pytest.mark.slow
def test_overhead_in_fresh_processes(tmp_path):
    assert main(["bench", "overhead", *TINY_MODEL, "--batch-size", "2", "--resolution", "8",
                 "--methods", "plain,guard_lossdiff", "--out", str(tmp_path), "--name", "iso"]) == 0
    data = read(tmp_path / "iso.json")
    assert data["isolation"] == "fresh process per method"
    assert set(data["methods"]) == {"plain", "guard_lossdiff"}
    assert all(POINT_KEYS <= set(m) for m in data["methods"].values())


def test_sweep_writes_json_markdown_and_plot(tmp_path):
    assert main(["bench", "sweep", *TINY_MODEL, "--batch-sizes", "2,3", "--resolutions", "8", "--isolate", "none",
                 "--methods", "plain,guard_lossdiff", "--out", str(tmp_path), "--name", "sw"]) == 0
    data = read(tmp_path / "sw.json")
    assert data["config"]["batch_sizes"] == [2, 3] and data["config"]["resolutions"] == [8]
    for name in ("plain", "guard_lossdiff"):
        pts = data["points"][name]
        assert [(p["batch_size"], p["resolution"]) for p in pts] == [(2, 8), (3, 8)]
        assert all(POINT_KEYS <= set(p) for p in pts)
    assert (tmp_path / "sw.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "B=3" in (tmp_path / "sw.md").read_text()


def test_throughput_writes_every_part(tmp_path):
    tiny = ["data.resolution=16", "model.width=4", "squeeze.batch_size=8", "squeeze.max_steps=2",
            "recover.iterations=2", "recover.batch_size=10", "recover.ipc=1", "relabel.epochs=1", "train.epochs=1",
            "evaluate.pgd_steps=1", "evaluate.max_samples=10", "evaluate.batch_size=10",
            "pipeline.methods=[{name: plain, objective: {name: plain}}]"]
    assert main(["bench", "throughput", "--threads", "1", "--warmup", "1", "--iters", "2", "--repeats", "2",
                 "--out", str(tmp_path), "--name", "tp", *tiny]) == 0
    data = read(tmp_path / "tp.json")
    assert ENV_KEYS <= set(data["env"])
    assert data["config"]["what"] == ["squeeze", "recover", "loader", "e2e"]
    assert data["config"]["resolved"]["data"]["resolution"] == 16
    for part in ("squeeze", "recover", "loader"):
        r = data["results"][part]
        assert len(r["per_repeat"]) == 2 and r["mean"] > 0 and "std" in r and r["unit"], part
    e2e = data["results"]["e2e"]
    assert e2e["seconds"] > 0
    assert set(e2e["stage_seconds"]) == {f"plain/{s}" for s in ("squeeze", "recover", "relabel", "train", "evaluate")}
    assert "end-to-end" in (tmp_path / "tp.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["overhead", "--methods", "plain,fast"], "unknown benchmark method"),
    (["sweep", "--resolutions", "32,big"], "--resolutions"),
    (["overhead", "--pgd-eps", "one/255"], "is not a number"),
    (["throughput", "--what", "everything"], "--what"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys, tmp_path):
    assert main(["bench", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("guardx: error:") and message in err and "\n" not in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_cpu_peak_memory_resets_and_sees_a_new_allocation():
    from guardx.bench._measure import peak_memory_mib, reset_peak_memory

    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    before = peak_memory_mib(cpu)
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert peak_memory_mib(cpu) - before > 48
    del block


def _model(bn_mode):
    from guardx.models import create_model

    torch.manual_seed(0)
    m = create_model("resnet18_small", num_classes=5, width=4, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3]).double()
    return m.train() if bn_mode == "train" else m.eval()


def _loss_and_grad(objective, model, x, y):
    loss, stats = objective(model, x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.item(), stats, torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("pair", ["exact", "lossdiff"])
def test_baselines_compute_the_same_regulariser(pair):
    """The baselines cost more but compute guardx's maths: same loss, reg and weight gradient. (The
    official-style lossdiff runs its CE forward before the regulariser, so BatchNorm's running statistics
    differ in train mode; in eval mode the two must agree.)"""
    from guardx.bench.baselines import NaiveExact, OfficialLossDiff
    from guardx.objectives import build_objective

    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.double), torch.randint(0, 5, (4,), generator=g)
    if pair == "exact":
        ours, base, mode = build_objective("guard", mode="exact", lam=100.0), NaiveExact(lam=100.0), "train"
    else:
        ours, base, mode = build_objective("guard", mode="lossdiff", beta=0.5), OfficialLossDiff(beta=0.5), "eval"
    model = _model(mode)
    l_ours, st_ours, g_ours = _loss_and_grad(ours, copy.deepcopy(model), x, y)
    l_base, st_base, g_base = _loss_and_grad(base, copy.deepcopy(model), x, y)
    assert st_ours["reg"] > 0
    assert st_base["reg"] == pytest.approx(st_ours["reg"], rel=1e-7)
    assert l_base == pytest.approx(l_ours, rel=1e-9)
    torch.testing.assert_close(g_base, g_ours, rtol=1e-6, atol=1e-9)
