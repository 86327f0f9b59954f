"""Expert trajectories (guardx.distill.buffers) and MTT's ZCA whitening (guardx.data.zca).

* ZCA equals kornia's recipe (covariance SVD, eps on the eigenvalues) and inverts exactly;
* buffers write one (epochs + 1, P) trajectory per expert, consistent with the architecture, objective recorded;
* killed in the middle of an expert, a rerun ends with the bytes of an uninterrupted run, and does not
  retrain what was finished;
* 2 ranks (gloo, torchrun) write exactly the files 1 process writes, ZCA included;
* GUARD(MTT): the experts train with the GUARD objective when the run's objective is guard.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guardx.config import load_config
from guardx.data.zca import ZCA
from guardx.distill import buffers
from guardx.distill.trajectory import FlatModel, build_model, expert_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are tiny: one intra-op thread (two spin against each other on a busy 2-core machine and
    make a 0.3 s run take 5 s); also the thread count the 2-rank comparison uses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# digits at 8 px, a width-8 depth-2 ConvNet: a whole expert epoch is 6 batches of 256 tiny images
BASE = [
    "data.dataset=digits", "data.resolution=8", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]",
    "buffers.width=8", "buffers.depth=2", "buffers.num_experts=2", "buffers.epochs=2",
    "buffers.dsa_strategy=none", "run.progress=false", "run.device=cpu",
]


def _cfg(out: Path, *extra: str):
    return load_config(None, [*BASE, f"run.out_dir={out}", *extra])


def _experts(out: Path, n: int) -> list[dict]:
    return [torch.load(expert_path(out / "buffers", e), weights_only=True) for e in range(n)]


def _assert_same_experts(got: list[dict], ref: list[dict]) -> None:
    for a, b in zip(got, ref):
        assert torch.equal(a["params"], b["params"])  # bit for bit
        assert a["history"] == b["history"] and a["seed"] == b["seed"]


# ---------------------------------------------------------------- ZCA
def test_zca_matches_kornia_recipe_and_inverts():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 4, 4, generator=gen) * torch.linspace(0.2, 1, 48).view(1, 3, 4, 4)
    zca = ZCA.fit(x, eps=0.1)
    # kornia.enhance.zca_mean, written out: unbiased covariance, SVD, T = U diag((s + eps)^-1/2) Uᵀ
    flat = x.double().reshape(64, -1)
    mean = flat.mean(0, keepdim=True)
    cov = (flat - mean).T @ (flat - mean) / 63
    u, s, _ = torch.linalg.svd(cov)
    t = u @ torch.diag((s + 0.1).rsqrt()) @ u.T
    expected = ((flat - mean) @ t).reshape(x.shape)
    assert torch.allclose(zca(x).double(), expected, atol=1e-5)
    assert torch.allclose(zca.inverse(zca(x)), x, atol=1e-5)
    # whitened training data has covariance U diag(s / (s + eps)) Uᵀ; eps -> 0 gives the identity
    white = ZCA.fit(x, eps=1e-9)(x).double().reshape(64, -1)
    cov_w = white.T @ white / 63
    rank = int((s > 1e-9).sum())
    top = u[:, :rank]
    assert torch.allclose(top.T @ cov_w @ top, torch.eye(rank, dtype=torch.float64), atol=1e-3)
    # plain-tensor state round trip (weights_only loadable)
    again = ZCA.from_state(zca.to_state())
    assert torch.equal(again(x), zca(x))


def test_zca_refuses_large_images():
    with pytest.raises(ValueError, match="64 px"):
        ZCA.fit(torch.zeros(2, 3, 128, 128, dtype=torch.uint8))


# ---------------------------------------------------------------- trajectories
def test_buffers_write_trajectories(tmp_path):
    out = buffers.run(_cfg(tmp_path))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_experts"] == 2 and manifest["epochs"] == 2
    assert manifest["objective"]["name"] == "plain" and manifest["input_space"]["kind"] == "normalize"
    flat = FlatModel(build_model(manifest["model"]))
    experts = _experts(tmp_path, 2)
    for e, rec in enumerate(experts):
        assert rec["params"].shape == (3, flat.num_params) and rec["params"].dtype == torch.float32
        assert rec["names"] == flat.names and [tuple(s) for s in rec["shapes"]] == flat.shapes
        assert rec["expert"] == e and len(rec["history"]) == 2
        steps = (rec["params"][1:] - rec["params"][:-1]).norm(dim=1)
        assert (steps > 0).all()  # every epoch moved the parameters
        assert rec["history"][-1]["ce"] < rec["history"][0]["ce"]  # and trained
    assert not torch.equal(experts[0]["params"][0], experts[1]["params"][0])  # own initialisations
    assert not (out / "partial").exists()
    # loads memory-mapped, rows as the flat parameters of the expert network
    flat_vec = experts[0]["params"][2]
    logits = flat(flat_vec, torch.zeros(2, 3, 8, 8))
    assert logits.shape == (2, 10)


class Killed(Exception):
    pass


def _objective_killing_at(monkeypatch, call: int) -> dict:
    """Make buffers' objective raise at its ``call``-th use (a kill in the middle of an epoch)."""
    from guardx.objectives import build_objective

    calls = {"n": 0}

    def build(name, **params):
        inner = build_objective(name, **params)

        def objective(model, x, y):
            calls["n"] += 1
            if call and calls["n"] == call:
                raise Killed
            return inner(model, x, y)

        return objective

    monkeypatch.setattr(buffers, "build_objective", build)
    return calls


def test_buffers_resume_after_kill(tmp_path, monkeypatch):
    ref = buffers.run(_cfg(tmp_path / "ref"))
    # 6 batches per epoch: expert 0 done after 12 calls; the kill falls in expert 1's second epoch
    calls = _objective_killing_at(monkeypatch, 12 + 6 + 3)
    with pytest.raises(Killed):
        buffers.run(_cfg(tmp_path / "killed"))
    assert expert_path(tmp_path / "killed" / "buffers", 0).is_file()
    assert (tmp_path / "killed" / "buffers" / "partial" / "expert_0001" / "epoch_0001.pt").is_file()
    assert not (tmp_path / "killed" / "buffers" / "manifest.json").exists()
    calls = _objective_killing_at(monkeypatch, 0)
    buffers.run(_cfg(tmp_path / "killed"))
    assert calls["n"] == 6  # only expert 1's second epoch was trained again
    _assert_same_experts(_experts(tmp_path / "killed", 2), _experts(ref.parent, 2))
    assert not (tmp_path / "killed" / "buffers" / "partial").exists()


def test_guard_experts(tmp_path):
    """GUARD(MTT): the experts' training objective is the run's objective section."""
    extra = ["buffers.num_experts=1", "buffers.epochs=1", "buffers.batch_size=512", "buffers.grad_clip=10"]
    plain = buffers.run(_cfg(tmp_path / "plain", *extra))
    guard = buffers.run(_cfg(tmp_path / "guard", *extra, "objective.name=guard", "objective.mode=lossdiff",
                             "objective.beta=10"))
    p, g = (torch.load(expert_path(d, 0), weights_only=True) for d in (plain, guard))
    assert torch.equal(p["params"][0], g["params"][0])  # same initialisation (same seed)
    assert not torch.allclose(p["params"][1], g["params"][1])  # different training
    assert g["objective"]["name"] == "guard" and "reg" in g["history"][0]
    assert json.loads((guard / "manifest.json").read_text())["objective"]["mode"] == "lossdiff"


# ---------------------------------------------------------------- ranks
@pytest.mark.slow
def test_two_ranks_write_what_one_rank_writes(tmp_path):
    extra = ["buffers.num_experts=3", "buffers.zca=true"]
    assert torch.get_num_threads() == 1  # as each rank (OMP_NUM_THREADS=1): the same kernels, the same bits
    buffers.run(_cfg(tmp_path / "one", *extra))
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps([[*BASE, f"run.out_dir={tmp_path / 'two'}", "distributed.backend=ddp", *extra]]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "tests/mtt_worker.py", str(spec)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_same_experts(_experts(tmp_path / "two", 3), _experts(tmp_path / "one", 3))
    one = torch.load(tmp_path / "one" / "buffers" / "zca.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "buffers" / "zca.pt", weights_only=True)
    assert torch.equal(one["matrix"], two["matrix"])
    assert json.loads((tmp_path / "two" / "buffers" / "manifest.json").read_text())["world_size"] == 2
