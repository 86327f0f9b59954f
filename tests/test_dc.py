"""DC and GUARD(DC): the matching distance, the loop, the regularised gradient, resume, atomic output, ranks."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guardx.data.dsa import DSA
from guardx.distill import dc
from guardx.distill.dc import GradientMatching, match_distance
from guardx.errors import ConfigError, GuardxError
from guardx.models import create_model
from guardx.models.convnet import depth_for_resolution
from guardx.objectives import build_objective
from guardx.utils.io import load_torch, save_torch

REPO = Path(__file__).resolve().parents[1]
C, R = 3, 16


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread avoids OpenMP's fork/join cost, and each of the 2 ranks below has
    one too (the thread count changes how CPU kernels sum, so the 1-rank reference must match it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _real(n: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(n, 3, R, R, generator=g) * 0.6 + 0.2 * c).clamp(0, 1) for c in range(C)]


def _model():
    return create_model("convnet", num_classes=C, width=8, resolution=R, mean=[0.5] * 3, std=[0.25] * 3)


def _gm(objective="plain", *, real=None, **kw) -> GradientMatching:
    obj = build_objective(objective) if isinstance(objective, str) else objective
    kw = {"ipc": 2, "outer_loop": 2, "inner_loop": 1, "batch_real": 8, "batch_train": 4, **kw}
    return GradientMatching(real if real is not None else _real(), _model, obj, **kw)


# ---------------------------------------------------------------------- the distance
def test_match_distance_on_hand_computed_vectors():
    conv = torch.randn(4, 2, 3, 3)  # 4 output rows
    lin = torch.randn(3, 5)  # 3 output rows
    bias = torch.randn(4)
    assert match_distance([conv, lin, bias], [conv, lin, bias]).item() == pytest.approx(0, abs=1e-5)
    assert match_distance([conv, lin], [-conv, -lin]).item() == pytest.approx(2 * (4 + 3), abs=1e-5)
    assert match_distance([conv], [2.5 * conv]).item() == pytest.approx(0, abs=1e-5)  # scale-free per row
    # 1-D tensors (biases, instance-norm affine) do not count, as in DC's distance_wb
    assert match_distance([bias], [-bias]).item() == 0
    # rows [1, 0] vs [1, 1] and [0, 2] vs [3, 0]: (1 − 1/√2) + (1 − 0)
    got = match_distance([torch.tensor([[1.0, 0.0], [0.0, 2.0]])], [torch.tensor([[1.0, 1.0], [3.0, 0.0]])])
    assert got.item() == pytest.approx(1 - 1 / math.sqrt(2) + 1, abs=1e-5)


def test_dc_loop_counts_and_convnet_depth():
    assert dc.default_loops(1) == (1, 1) and dc.default_loops(10) == (10, 50) and dc.default_loops(50) == (50, 10)
    with pytest.raises(ConfigError, match="set dc.outer_loops and dc.inner_loops"):
        dc.default_loops(7)
    assert [depth_for_resolution(r) for r in (28, 32, 64, 128)] == [3, 3, 4, 5]
    net = create_model("convnet", num_classes=10, resolution=64).net
    assert net.depth == 4 and net.classifier.in_features == 128 * 4 * 4  # width 128, 4×4 features
    assert create_model("convnet", num_classes=10, resolution=64, depth=2).net.depth == 2


# ---------------------------------------------------------------------- the loop
def test_one_iteration_changes_the_images_and_keeps_their_labels():
    gm = _gm(dsa=DSA())
    x0, y0 = gm.images.detach().clone(), gm.labels.clone()
    assert y0.tolist() == [0, 0, 1, 1, 2, 2]
    gm.step()
    assert gm.iteration == 1 and torch.equal(gm.labels, y0)
    moved = (gm.images.detach() - x0).flatten(1).abs().amax(1)
    assert (moved > 0).all()  # every synthetic image was updated
    assert gm.history[0]["match"] > 0 and math.isfinite(gm.history[0]["real_ce"])
    px = gm.pixels()
    assert px.shape == (6, 3, R, R) and px.min() >= 0 and px.max() <= 1


def test_init_real_takes_real_images_of_the_class_and_noise_does_not():
    real = _real()
    gm = _gm(real=real)
    for c in range(C):  # each synthetic image starts as one of its class's real images
        for img in gm.pixels()[2 * c:2 * c + 2]:
            assert min((img - r).abs().max().item() for r in real[c]) < 1e-5
    noise = _gm(init="noise").images.detach()
    assert abs(noise.mean().item()) < 0.2 and abs(noise.std().item() - 1) < 0.2  # N(0, 1), normalised space


def test_guard_with_lambda_zero_gives_the_dc_set_and_the_regulariser_changes_it():
    plain, guard0, guard = _gm("plain"), _gm(build_objective("guard", lam=0.0)), _gm(build_objective("guard"))
    for gm in (plain, guard0, guard):
        gm.run(1)
    assert torch.allclose(guard0.images, plain.images, rtol=0, atol=1e-6)
    assert (guard.images - plain.images).abs().max() > 1e-3
    assert guard.history[-1]["real_reg"] > 0 and plain.history[-1]["real_reg"] == 0


def test_the_matched_real_gradient_is_the_gradient_of_the_regularised_loss():
    """GUARD's low_memory surrogate (value ℓ_R, zero-valued injected gradient) gives exactly ∇θ ℓ_R, the
    gradient of the plainly differentiated regularised loss — and not the cross-entropy gradient."""
    gm = _gm()
    model = gm._fresh_model(0)
    params = list(model.parameters())
    grads = {}
    for name, obj in [("fast", build_objective("guard", low_memory=True)),
                      ("plain_autograd", build_objective("guard", low_memory=False)),
                      ("ce", build_objective("plain"))]:
        gm.objective = obj
        grads[name], _ = gm._real_grads(model, params, 1, 0, 0, seed=3)
    for a, b in zip(grads["fast"], grads["plain_autograd"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(grads["fast"], grads["ce"])) > 1e-3


def test_batched_classes_equal_the_per_class_loop():
    batched, loop = _gm(dsa=DSA()), _gm(dsa=DSA(), batched=False)
    batched.run(1)
    loop.run(1)
    assert torch.allclose(batched.images, loop.images, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- resume and output
def test_resumes_from_an_iteration_checkpoint_to_the_uninterrupted_result(tmp_path):
    whole = _gm(dsa=DSA())
    whole.run(2)

    class Killed(Exception):
        pass

    def save_then_die(g):
        save_torch(g.state_dict(), tmp_path / "state.pt")
        if g.iteration == 1:
            raise Killed

    first = _gm(dsa=DSA())
    with pytest.raises(Killed):
        first.run(2, on_iteration=save_then_die)
    resumed = _gm(dsa=DSA())
    resumed.load_state_dict(load_torch(tmp_path / "state.pt"))  # weights_only
    assert resumed.iteration == 1
    resumed.run(2)
    assert torch.equal(resumed.images, whole.images)
    assert [h["match"] for h in resumed.history] == [h["match"] for h in whole.history]
    with pytest.raises(GuardxError, match="other settings.*lr_img"):
        _gm(lr_img=0.5).load_state_dict(load_torch(tmp_path / "state.pt"))


TINY = ["data.dataset=digits", "data.resolution=16", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]",
        "dc.ipc=1", "dc.iterations=2", "dc.outer_loops=2", "dc.inner_loops=1", "dc.batch_real=8",
        "dc.batch_train=8", "dc.width=8", "dc.dsa=true", "dc.ckpt_every=1", "run.progress=false", "run.device=cpu"]


def _cfg(out: Path, *extra: str):
    from guardx.config import load_config

    return load_config(None, [*TINY, f"run.out_dir={out}", *extra])


def _pngs(images: Path) -> dict[str, bytes]:
    return {str(p.relative_to(images)): p.read_bytes() for p in sorted(images.rglob("*.png"))}


def test_run_is_killed_then_resumes_and_writes_the_set_atomically(tmp_path, monkeypatch):
    import guardx.data.distilled

    ref = dc.run(_cfg(tmp_path / "ref"))
    manifest = json.loads((tmp_path / "ref" / "dc" / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("distiller", "labels", "num_classes", "resolution", "ipc", "images")} == \
        {"distiller": "dc", "labels": "hard", "num_classes": 10, "resolution": 16, "ipc": 1, "images": 10}
    assert manifest["classes"] == [str(i) for i in range(10)] and manifest["mean"] == [0.5] * 3
    assert sorted(_pngs(ref)) == sorted(f"{c}/{c}_0000.png" for c in range(10))

    # killed inside iteration 2 (checkpoint of iteration 1 on disk), then while writing the PNGs
    cfg, out = _cfg(tmp_path / "run"), tmp_path / "run" / "dc"
    step, calls = GradientMatching.step, []

    def dying_step(self):
        calls.append(self.iteration)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(GradientMatching, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        dc.run(cfg)
    assert calls == [0, 1] and sorted(p.name for p in (out / "ckpt").iterdir()) == ["step_000000001.pt"]
    save_png, written = guardx.data.distilled.save_png, []

    def dying_save(img, path):
        written.append(path)
        if len(written) == 5:
            raise KeyboardInterrupt
        save_png(img, path)

    monkeypatch.setattr(guardx.data.distilled, "save_png", dying_save)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        dc.run(cfg)
    assert calls == [1]  # resumed after iteration 1
    assert not (out / "manifest.json").exists() and not (out / "images").exists()  # nothing half-written visible
    monkeypatch.setattr(guardx.data.distilled, "save_png", save_png)
    calls.clear()
    assert _pngs(dc.run(cfg)) == _pngs(ref) and calls == []  # the final checkpoint is reused, not recomputed
    assert json.loads((out / "manifest.json").read_text())["images"] == 10


# ---------------------------------------------------------------------- ranks
@pytest.mark.slow
def test_two_gloo_ranks_give_the_one_process_set(tmp_path):
    """Classes dealt out over 2 ranks (5 each): the all-reduced image gradients and a θ trained on the whole
    set on every rank give one process's images — bit for bit with the per-class loop; with the classes
    vectorised, to rounding (vmap over 5 classes instead of 10 sums in another order)."""
    variants = {"loop": ["dc.batched=false"], "batched": ["dc.batched=true"]}
    for name, extra in variants.items():  # one thread, as each rank (fixture above)
        dc.run(_cfg(tmp_path / f"one_{name}", *extra))
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps([[*TINY, f"run.out_dir={tmp_path / f'two_{name}'}", "distributed.backend=ddp", *extra]
                                for name, extra in variants.items()]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "tests/dc_dist_worker.py", str(spec)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, atol in (("loop", 0.0), ("batched", 1e-5)):
        one, two = tmp_path / f"one_{name}" / "dc", tmp_path / f"two_{name}" / "dc"
        a, b = load_torch(one / "ckpt" / "step_000000002.pt"), load_torch(two / "ckpt" / "step_000000002.pt")
        assert torch.allclose(a["images"], b["images"], rtol=0, atol=atol), name
        ma, mb = (s["optimizer"]["state"][0]["momentum_buffer"] for s in (a, b))
        assert torch.allclose(ma, mb, rtol=0, atol=atol), name
        assert json.loads((two / "manifest.json").read_text())["world_size"] == 2
    assert _pngs(tmp_path / "two_loop" / "dc" / "images") == _pngs(tmp_path / "one_loop" / "dc" / "images")


@pytest.mark.slow
def test_dc_gdc_and_cda_train_students_through_the_pipeline(tmp_path):
    """The distiller interface end to end: DC and GUARD(DC) write hard-label sets (exact float pixels beside the
    PNGs), CDA runs SRe2L's stages with the crop curriculum; the shared train and evaluate take all three."""
    import json

    from guardx import pipeline
    from guardx.config import load_config
    from conftest import TINY as SRE2L_TINY

    student = "{train: {recipe: config, optimizer: sgd, lr: 0.01, epochs: 2, batch_size: 10, augment: dsa}}"
    cfg = load_config(None, [*SRE2L_TINY, *TINY, f"run.out_dir={tmp_path}", "pipeline.eval_teacher=false",
                             "pipeline.methods=["
                             f"{{name: dc, distiller: dc, overrides: {student}}}, "
                             f"{{name: gdc, distiller: dc, objective: {{name: guard, mode: lossdiff}}, overrides: {student}}}, "
                             "{name: cda, distiller: cda}]"])
    report = pipeline.run(cfg)
    assert [(r["method"], r["model"]) for r in report["rows"]] == [("dc", "student"), ("gdc", "student"),
                                                                   ("cda", "student")]
    for name in ("dc", "gdc"):
        manifest = json.loads((tmp_path / name / "dc" / "manifest.json").read_text())
        assert manifest["labels"] == "hard" and manifest["exact_tensors"] == "synthetic.pt"
        assert manifest["student"]["optimizer"] == "sgd"  # DC's recipe travels with the set
        metrics = json.loads((tmp_path / name / "train" / "metrics.json").read_text())
        assert metrics["labels"] == "hard" and metrics["objective"].startswith("DSA(Plain")
    assert "Guard(mode=lossdiff" in json.loads((tmp_path / "gdc" / "dc" / "manifest.json").read_text())["objective"]
    used = json.loads((tmp_path / "cda" / "recover" / "manifest.json").read_text())
    assert used["distiller"] == "cda" and used["labels"] == "teacher"
    import yaml

    assert yaml.safe_load((tmp_path / "cda" / "squeeze" / "config.yaml").read_text())["recover"]["crop_schedule"] == "cda"
