"""The evaluate stage: every attack counted, reports, resume, block sharding, and 2 ranks == 1 rank."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from guardx import evaluate
from guardx.attacks import accuracy
from guardx.attacks.plan import Job, metric_names
from guardx.config import load_config
from guardx.data import build_loader
from guardx.data.sampler import ShardedSampler
from guardx.errors import ConfigError
from guardx.models import create_model
from guardx.models._io import save_model
from guardx.utils.misc import labelled_paths

pytest.importorskip("torchattacks")

DATA = ["data.dataset=digits", "data.resolution=16", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"]
CHEAP = ["evaluate.pgd_steps=4", "evaluate.mim_steps=4", "evaluate.cw_steps=8", "evaluate.square_queries=15",
         "evaluate.autoattack_steps=3", "evaluate.autoattack_targets=2", "evaluate.max_samples=24",
         "evaluate.batch_size=8", "run.progress=false", "run.device=cpu"]
ALL = "evaluate.attacks=[pgd,fgsm,mim,cw,square,autoattack]"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A width-8 ConvNet trained for one epoch on 16 px digits (about half the test set right)."""
    torch.manual_seed(0)
    cfg = load_config(None, DATA)
    loader = build_loader(cfg.data, "train", batch_size=64, seed=0, augment=False)
    model = create_model("convnet", num_classes=10, width=8, resolution=16, mean=[0.5] * 3, std=[0.5] * 3)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    meta = {"name": "convnet", "width": 8, "num_classes": 10, "classes": loader.classes, "resolution": 16,
            "mean": [0.5] * 3, "std": [0.5] * 3}
    save_model(path, model.eval(), meta)
    return path


def make_cfg(tmp_path, checkpoint, *extra):
    return load_config(None, [*DATA, *CHEAP, f"run.out_dir={tmp_path / 'run'}",
                              f"evaluate.out_dir={tmp_path / 'eval'}", f"evaluate.checkpoints=[{checkpoint}]", *extra])


def test_every_attack_breaks_some_samples_and_reports_are_complete(tmp_path, checkpoint):
    # cw at the paper's c = 1e-5 barely moves in 8 steps: a larger c shows that it attacks at all
    cfg = make_cfg(tmp_path, checkpoint, ALL, "evaluate.eps=[8/255]", "evaluate.cw_c=1.0", "evaluate.cw_lr=0.05")
    (row,) = evaluate.run(cfg)
    acc, counts = row["accuracy"], row["counts"]
    assert acc["n"] == 24 and 0 < counts["clean"] < 24
    names = metric_names(cfg)
    assert names == ["clean", "pgd@8/255", "fgsm@8/255", "mim@8/255", "cw", "square@8/255", "autoattack@8/255"]
    for m in names:  # percentages of the n evaluated samples (robust <= clean holds by construction: only
        # clean-correct samples are attacked)
        assert acc[m] == pytest.approx(100 * counts[m] / 24), m
    for m in names[1:]:  # every attack breaks some clean-correct sample at 8/255 (cw: c = 1e-5, unbounded)
        assert counts[m] < counts["clean"], (m, counts)
    out = tmp_path / "eval"
    saved = json.loads((out / "results.json").read_text())
    assert saved["seed"] == cfg.run.seed and saved["settings"]["evaluate.attack_params"]["cw"]["c"] == 1.0
    assert saved["rows"][0]["counts"] == counts
    from guardx.attacks.accuracy import unpack_bits

    for metric, bits in row["per_sample"].items():  # per-sample results add up to the counts, attacked ⊆ clean
        flags = unpack_bits(bits, acc["n"])
        assert int(flags.sum()) == counts[metric]
        assert not (flags & ~unpack_bits(row["per_sample"]["clean"], acc["n"])).any()
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0].startswith("method,model,checkpoint,metric,attack,eps,params,seed") and len(lines) == 1 + len(names)
    assert "| tiny | convnet |" in (out / "results.md").read_text()
    assert not (out / ".partial").exists()


def test_metric_names_budget_suffix_and_unbounded_cw(tmp_path, checkpoint):
    cfg = make_cfg(tmp_path, checkpoint, "evaluate.attacks=[pgd100,cw,square]", "evaluate.eps=[1/255,4/255]")
    assert metric_names(cfg) == ["clean", "pgd100@1/255", "pgd100@4/255", "cw", "square@1/255",
                                          "square@4/255"]
    assert cfg.evaluate.attack_params("pgd100")["steps"] == 100
    with pytest.raises(ConfigError, match="unknown attack"):
        make_cfg(tmp_path, checkpoint, "evaluate.attacks=[pgd,autoatack]")


def test_a_finished_evaluation_is_reused_and_an_interrupted_one_resumes(tmp_path, checkpoint, monkeypatch):
    reference = evaluate.run(make_cfg(tmp_path / "ref", checkpoint))[0]["counts"]
    calls = []
    real = accuracy.run_attack

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(accuracy, "BLOCK_LOG_EVERY_S", 0.0)  # log every block
    monkeypatch.setattr(accuracy, "run_attack", failing)
    cfg = make_cfg(tmp_path, checkpoint)
    with pytest.raises(RuntimeError, match="simulated"):
        evaluate.run(cfg)
    assert list((tmp_path / "eval" / ".partial").glob("*/rank0.json"))

    calls.clear()
    monkeypatch.setattr(accuracy, "run_attack", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert evaluate.run(cfg)[0]["counts"] == reference
    assert len(calls) == 2  # 3 blocks of 8, the first finished before the crash
    assert not (tmp_path / "eval" / ".partial").exists()

    calls.clear()
    assert evaluate.run(cfg)[0]["counts"] == reference and not calls  # settings unchanged: reused outright
    evaluate.run(make_cfg(tmp_path, checkpoint, "evaluate.pgd_steps=2"))
    assert calls  # a changed setting is evaluated again


def test_attack_output_is_projected_onto_the_threat_model():
    x = torch.full((2, 3, 4, 4), 0.5)
    job = Job("fake@1/255", "fake", 1 / 255, {})
    bad = x + torch.tensor([0.1, 0.0]).view(2, 1, 1, 1)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match="2 point"):
        fixed = accuracy._admissible(bad, x, job, set())
    assert torch.isfinite(fixed).all() and (fixed - x).abs().max() <= 1 / 255 + 1e-7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accuracy._admissible(x + 0.5 / 255, x, job, set())  # a correct attack passes silently


@pytest.mark.parametrize("n", [0, 1, 7, 24, 25])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("block", [1, 4, 8])
def test_block_sharding_deals_fixed_global_blocks(n, world, block):
    seen = []
    for rank in range(world):
        s = ShardedSampler(n, rank=rank, world_size=world, shuffle=False, pad=False, block=block)
        idx = s.indices().tolist()
        assert len(s) == len(idx)
        for k in range(0, len(idx), block):  # the k-th batch of this rank is global block rank + k·W
            b = rank + (k // block) * world
            assert idx[k:k + block] == list(range(b * block, min((b + 1) * block, n)))
        seen += idx
    assert sorted(seen) == list(range(n))


def test_cli_flags_map_onto_the_config(tmp_path):
    from guardx.cli import _flag_overrides, build_parser

    args = build_parser().parse_args(["evaluate", "--checkpoint", "guard=a/t.pt,b/t.pt", "--checkpoint", "c.pt",
                                      "--attacks", "pgd100,square", "--eps", "1/255,0.01", "--out", str(tmp_path),
                                      "run.seed=3"])
    cfg = load_config(None, args.overrides + _flag_overrides(args))
    assert cfg.evaluate.checkpoints == ["guard=a/t.pt", "b/t.pt", "c.pt"]
    assert cfg.evaluate.attacks == ["pgd100", "square"] and cfg.run.seed == 3
    assert cfg.evaluate.eps == pytest.approx([1 / 255, 0.01]) and cfg.evaluate.out_dir == str(tmp_path)


def test_checkpoint_labels_are_unique():
    entries = labelled_paths(["runs/a/x/teacher.pt", "runs/b/x/teacher.pt", "guard=c/student.pt"])
    assert [label for label, _ in entries] == ["a/x/teacher", "b/x/teacher", "guard"]
    with pytest.raises(ConfigError, match="unique"):
        labelled_paths(["g=a.pt", "g=b.pt"])


@pytest.mark.slow
def test_two_ranks_give_the_same_counts_as_one(tmp_path, checkpoint):
    """Every attack, including the seeded random ones (PGD start, Square, AutoAttack), over 2 gloo ranks."""
    args = ["evaluate", "--checkpoint", str(checkpoint), "--attacks", "pgd,fgsm,mim,cw,square,autoattack",
            "--eps", "4/255", *DATA, *CHEAP, "evaluate.max_samples=16", "evaluate.batch_size=4"]  # 2 blocks per rank
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    one = subprocess.run([sys.executable, "-m", "guardx", *args[:1], "--out", str(tmp_path / "one"), *args[1:]],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "guardx", *args[:1], "--out", str(tmp_path / "two"), *args[1:],
                          "distributed.backend=ddp"], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "tiny.json").read_text())
    b = json.loads((tmp_path / "two" / "tiny.json").read_text())
    assert b["world_size"] == 2 and b["sharding"] == "block"
    assert a["accuracy"]["n"] == b["accuracy"]["n"] == 16
    assert a["counts"] == b["counts"]
    assert a["per_sample"] == b["per_sample"]  # the same images, not only the same totals
    assert a["counts"]["clean"] > a["counts"]["pgd@4/255"]  # the attacks did something


def test_an_attack_can_be_run_at_one_radius_only():
    cfg = load_config(None, ["evaluate.attacks=[pgd100,autoattack@1/255,cw]", "evaluate.eps=[1/255,2/255,4/255]"])
    assert metric_names(cfg) == ["clean", "pgd100@1/255", "pgd100@2/255", "pgd100@4/255", "autoattack@1/255", "cw"]
    assert cfg.evaluate.attack_params("autoattack@1/255")["version"] == "standard"
    with pytest.raises(ConfigError, match="twice"):
        load_config(None, ["evaluate.attacks=[pgd,pgd@1/255]", "evaluate.eps=[1/255]"])
    with pytest.raises(ConfigError, match="did you mean @2/255"):
        load_config(None, ["evaluate.attacks=[pgd@2]"])


def test_folded_batchnorm_breaks_the_same_images(tmp_path):
    """evaluate.fold_bn (default on) attacks a BatchNorm-folded copy: on a trained ResNet with BatchNorm, every
    attack leaves the very same images unbroken as on the model itself, and the setting is part of the cache key."""
    torch.manual_seed(0)
    cfg = load_config(None, DATA)
    loader = build_loader(cfg.data, "train", batch_size=64, seed=0, augment=False)
    model = create_model("resnet18_small", num_classes=10, width=8, mean=[0.5] * 3, std=[0.5] * 3)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(2):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = tmp_path / "bn.pt"
    save_model(path, model.eval(), {"name": "resnet18_small", "width": 8, "num_classes": 10, "classes": loader.classes,
                                    "resolution": 16, "mean": [0.5] * 3, "std": [0.5] * 3})
    rows = {}
    for fold in ("true", "false"):
        cfg = make_cfg(tmp_path / fold, path, "evaluate.attacks=[pgd20,square,autoattack]", "evaluate.eps=[4/255]",
                       "evaluate.max_samples=48", "evaluate.batch_size=48", "evaluate.square_queries=60",
                       "evaluate.autoattack_steps=10", f"evaluate.fold_bn={fold}")
        (rows[fold],) = evaluate.run(cfg)
    on, off = rows["true"], rows["false"]
    assert on["settings"]["evaluate.fold_bn"] is True and off["settings"]["evaluate.fold_bn"] is False
    assert off["counts"]["clean"] > off["counts"]["pgd20@4/255"] > 0, off["counts"]  # the attacks did something
    assert on["per_sample"] == off["per_sample"]
