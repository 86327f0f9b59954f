"""``guardx bench``: the commands run on a tiny config and write complete JSON/markdown (no timing asserts),
and the benchmark's baselines compute the same regulariser as guardx's objectives."""
import copy
import json
import statistics

import pytest
import torch

from guardx.bench.methods import METHODS, SUSPECT_BELOW, TARGETS, method_kind
from guardx.cli import main

TINY_MODEL = ["--model", "resnet18_small", "--width", "8", "--num-classes", "5", "--threads", "1",
              "--warmup", "1", "--rounds", "3", "--memory-steps", "1"]
ENV_KEYS = {"device", "device_name", "torch", "cuda", "triton", "python", "threads", "git_revision",
            "kernels_backend", "timestamp_utc"}
ROW_KEYS = {"label", "kind", "flops", "s_per_iter", "stats", "loss_finite", "final_loss", "peak_mem_mib",
            "static_mem_mib", "step_mem_mib", "time_x_plain", "paired_x_plain", "mem_x_plain", "flops_x_plain",
            "time_per_flop_ratio", "suspect"}


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
    assert data["load"]["cores"] >= 1 and len(data["load"]["before"]) == len(data["load"]["after"]) == 3
    cfg = data["config"]
    assert (cfg["batch_size"], cfg["resolution"], cfg["rounds"], cfg["iters"], cfg["pgd_steps"]) == (2, 8, 3, 1, 2)
    assert cfg["methods"] == list(METHODS) == list(data["methods"])
    plain = data["methods"]["plain"]
    for name, m in data["methods"].items():
        assert ROW_KEYS <= set(m), name
        assert len(m["s_per_iter"]) == 3 and all(t > 0 for t in m["s_per_iter"])
        assert m["stats"]["min"] <= m["stats"]["median"] <= m["stats"]["max"]
        # every ratio takes the same statistic of the raw blocks: the median
        assert m["time_x_plain"] == pytest.approx(statistics.median(m["s_per_iter"])
                                                  / statistics.median(plain["s_per_iter"]), rel=1e-12)
        assert m["paired_x_plain"]["min"] <= m["paired_x_plain"]["median"] <= m["paired_x_plain"]["max"]
        assert m["suspect"] == (name != "plain" and m["time_x_plain"] < SUSPECT_BELOW * m["flops_x_plain"])
        assert m["peak_mem_mib"] > 0 and m["mem_x_plain"] > 0
        assert m["kind"] == method_kind(name) and m["label"] in printed
    # FLOPs of one whole step (convolutions and matmuls, double backward included) follow the cost model:
    # lossdiff 3 forwards + 3 full backwards ≈ 3×; PGD-k with input-only attack backwards ≈ 1 + 2k/3, with
    # full ones (the official code) ≈ k + 1; folding BatchNorm changes no FLOP
    x = {name: m["flops_x_plain"] for name, m in data["methods"].items()}
    assert x["guard_lossdiff"] == pytest.approx(3, rel=0.03) and x["ref_lossdiff_4fwd"] == pytest.approx(4, rel=0.03)
    assert x["adv"] == pytest.approx(1 + 2 * 2 / 3, rel=0.03) and x["ref_adv_official"] == pytest.approx(3, rel=0.03)
    assert 4.5 < x["guard_exact"] == x["guard_cure"] < x["ref_exact_naive"] < 6.5
    assert x["guard_exact_nofold"] == x["guard_exact"] and x["guard_lossdiff_nofold"] == x["guard_lossdiff"]
    # autograd's own convolution double backward counts a little more (its transposed weight-gradient convolutions)
    assert x["guard_exact"] <= x["guard_exact_autograd"] < 1.05 * x["guard_exact"]
    md = (tmp_path / "overhead-t4.md").read_text()
    assert "| Method | s/iter median [min–max] |" in md and "Adv training, PGD-2" in md and "Load average" in md
    assert {t["target"] for t in data["targets"]} == {t[0] for t in TARGETS if "PGD-10" not in t[0]}
    assert all(isinstance(t["met"], bool) for t in data["targets"])

    # the README block is generated from the JSON: the run's numbers appear next to the paper's
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- measured-results:start -->\n<!-- measured-results:end -->\ntail\n")
    argv = ["bench", "report", "--results", str(tmp_path), "--readme", str(readme)]
    before = readme.read_text()
    assert main([*argv, "--check"]) == 1 and readme.read_text() == before  # stale: reported, nothing written
    assert main(argv) == 0 and main([*argv, "--check"]) == 0
    block = readme.read_text()
    s = plain["stats"]
    assert f"| {s['median']:.4g} [{s['min']:.4g}–{s['max']:.4g}] |" in block
    assert "(1 + 2k/3)× plain = 2.3×" in block and "(k + 1)× plain = 3×" in block  # PGD-2's cost model
    assert block.startswith("intro\n") and block.endswith("tail\n")


def test_round_robin_interleaves_and_rotates():
    from guardx.bench.measure import round_robin

    calls = []
    steps = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    times = round_robin(steps, torch.device("cpu"), rounds=3, iters=2, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up: one of each
    blocks = [calls[i] for i in range(3, len(calls), 2)]
    assert calls[3:] == [n for n in blocks for _ in range(2)]  # a block is `iters` calls of one closure
    assert blocks == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # every round has each once, rotated
    assert {n: len(t) for n, t in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_block_stats_and_paired_ratios():
    from guardx.bench.measure import block_stats, paired_ratios

    s = block_stats([4.0, 1.0, 2.0, 100.0, 3.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (3.0, 1.0, 100.0, 5)
    assert s["spread"] == pytest.approx(99 / 3)
    assert paired_ratios([2.0, 6.0, 3.0], [1.0, 2.0, 3.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}


def test_load_above_the_cores_is_a_warning():
    from guardx.bench.measure import load_warning

    assert load_warning([1.5, 1.0, 1.0], [1.9, 1.2, 1.0], cores=2) is None
    msg = load_warning([1.5, 1.0, 1.0], [5.2, 3.0, 1.0], cores=2)
    assert "5.20" in msg and "2 available cores" in msg
    assert load_warning(None, None, cores=2) is None


@pytest.mark.slow
def test_overhead_in_fresh_processes(tmp_path):
    assert main(["bench", "overhead", *TINY_MODEL, "--batch-size", "2", "--resolution", "8",
                 "--methods", "plain,guard_lossdiff", "--out", str(tmp_path), "--name", "iso"]) == 0
    data = read(tmp_path / "iso.json")
    assert data["memory_isolation"] == "fresh process per method"
    assert set(data["methods"]) == {"plain", "guard_lossdiff"}
    assert all(ROW_KEYS <= set(m) for m in data["methods"].values())


def test_sweep_writes_json_markdown_and_plot(tmp_path):
    assert main(["bench", "sweep", *TINY_MODEL, "--batch-sizes", "2,3", "--resolutions", "8", "--isolate", "none",
                 "--methods", "plain,guard_lossdiff", "--out", str(tmp_path), "--name", "sw"]) == 0
    data = read(tmp_path / "sw.json")
    assert data["config"]["batch_sizes"] == [2, 3] and data["config"]["resolutions"] == [8]
    assert [(p["batch_size"], p["resolution"]) for p in data["points"]] == [(2, 8), (3, 8)]
    for p in data["points"]:
        assert list(p["methods"]) == ["plain", "guard_lossdiff"]
        assert all(ROW_KEYS <= set(m) for m in p["methods"].values())
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
    (["overhead", "--rounds", "0"], "--rounds must be >= 1"),
    (["sweep", "--resolutions", "32,big"], "--resolutions"),
    (["overhead", "--pgd-eps", "one/255"], "is not a number"),
    (["throughput", "--what", "everything"], "--what"),
    (["loaders", "--backends", "folder,tape"], "unknown loader backends"),
    (["squeeze-scaling", "--backends", "zero9"], "unknown backend"),
    (["kernels", "--dtypes", "fp8"], "--dtypes" if torch.cuda.is_available() else "needs a CUDA GPU"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys, tmp_path):
    assert main(["bench", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("guardx: error:") and message in err and "\n" not in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_cpu_peak_memory_resets_and_sees_a_new_allocation():
    from guardx.bench.measure import peak_memory_mib, reset_peak_memory

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


def test_official_adv_baseline_is_guardx_adv_with_full_backwards():
    """In eval mode and without a random start the official-code PGD baseline finds the same adversarial
    batch as guardx's adv (whose attack runs folded BatchNorm and input-only backwards): same loss and
    weight gradient. In train mode its attack steps update BatchNorm's running statistics, as the
    official code's do; guardx's attack leaves them alone."""
    from guardx.bench.baselines import OfficialAdv
    from guardx.objectives import build_objective

    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.double), torch.randint(0, 5, (4,), generator=g)
    pgd = dict(eps=8 / 255, alpha=2 / 255, steps=3, random_start=False)
    model = _model("eval")
    l_ours, _, g_ours = _loss_and_grad(build_objective("adv", **pgd), copy.deepcopy(model), x, y)
    l_base, _, g_base = _loss_and_grad(OfficialAdv(**pgd), copy.deepcopy(model), x, y)
    assert l_base == pytest.approx(l_ours, rel=1e-9)
    torch.testing.assert_close(g_base, g_ours, rtol=1e-6, atol=1e-9)

    ours, base = _model("train"), _model("train")
    build_objective("adv", **pgd)(ours, x, y)
    OfficialAdv(**pgd)(base, x, y)
    assert int(ours.net.bn1.num_batches_tracked) == 1 and int(base.net.bn1.num_batches_tracked) == 1 + 3
