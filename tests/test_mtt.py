"""MTT and TESLA (guardx.distill.mtt).

* TESLA's constant-memory gradient (``exact``) w.r.t. images, step size and learned labels equals MTT's
  unrolled gradient in fp64 (1e-6), with a random differentiable augmentation and changing batches;
* ``first_order`` is TESLA's public code: its formula, exact for one step, not beyond;
* what autograd saves stays flat in N for TESLA and grows linearly for MTT (a property of the graph);
* the loss is MTT's normalised distance; MTT's batch order;
* ``guardx mtt`` end to end (MTT, TESLA assign, learned labels, ZCA): the written set, its manifest, and a
  run killed mid-way that resumes to the bytes of an uninterrupted one;
* the shipped presets load.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from guardx.bench.mtt_memory import SavedTensorMeter
from guardx.config import load_config
from guardx.distill import buffers, mtt
from guardx.distill.mtt import Matcher, plan_batches
from guardx.distill.trajectory import FlatModel, build_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are tiny: one intra-op thread (two spin against each other on a busy 2-core machine and
    make a 0.3 s run take 5 s); also the thread count the 2-rank comparison uses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the gradient
def _problem(dtype=torch.float64, n=6, classes=3, soft=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = build_model({"name": "convnet", "width": 8, "depth": 2, "num_classes": classes, "resolution": 8})
    flat = FlatModel(model.to(dtype))
    start = flat.flat_params()
    target = start + 0.05 * torch.randn(flat.num_params, generator=gen, dtype=dtype)
    images = torch.randn(n, 3, 8, 8, generator=gen, dtype=dtype).requires_grad_(True)
    syn_lr = torch.tensor(0.05, dtype=dtype).requires_grad_(True)
    if soft:
        labels = torch.randn(n, classes, generator=gen, dtype=dtype).requires_grad_(True)
    else:
        labels = torch.arange(classes).repeat_interleave(n // classes)
    return flat, images, syn_lr, labels, start, target


def toy_augment(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded and differentiable, like DSA: a per-image brightness scale and a shift of the columns."""
    gen = torch.Generator().manual_seed(seed)
    scale = 1 + 0.2 * torch.rand(len(x), 1, 1, 1, generator=gen, dtype=x.dtype)
    return (x * scale).roll(int(torch.randint(1, 3, (1,), generator=gen)), dims=-1)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "learned_soft"])
def test_tesla_gradient_equals_unrolled(soft):
    flat, images, syn_lr, labels, start, target = _problem(soft=soft)
    plan, seeds = plan_batches(len(images), 4, 3, seed=1), [11, 12, 13]  # batches of 4 and 2 images
    matcher = Matcher(flat, toy_augment)
    ref = matcher("unrolled", images, syn_lr, labels, start, target, plan, seeds)
    got = matcher("exact", images, syn_lr, labels, start, target, plan, seeds)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=0)  # the same forward, the same loss
    for name, a, b in zip(("images", "syn_lr", "labels"), got[1:], ref[1:]):
        if name == "labels" and not soft:
            assert a is None and b is None
            continue
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()), msg=name)


def _tesla_public_code_gradient(flat, images, syn_lr, labels, start, target, plan):
    """TESLA's distill.py in formulas: with G = Σ g_i, dL/dx_i = 2 ∂[(α(θ*−θ0) + α²G)·g_i / D]/∂x_i with g_i's
    dependence on θ_i ignored, and dL/dα from ‖θ0 − αG − θ*‖²/D with G held constant."""
    from guardx.distill.mtt import step_loss

    alpha, theta, grads = syn_lr.detach(), start, []
    for idx in plan:
        th = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(step_loss(flat(th, images.detach()[idx]), labels[idx]), th)
        grads.append((th.detach(), g))
        theta = theta - alpha * g
    total = sum(g for _, g in grads)
    dist = (start - target).pow(2).sum()
    g_images = torch.zeros_like(images)
    for (th, _), idx in zip(grads, plan):
        x = images.detach()[idx].requires_grad_(True)
        th = th.requires_grad_(True)
        (g,) = torch.autograd.grad(step_loss(flat(th, x), labels[idx]), th, create_graph=True)
        term = (alpha * (target - start) + alpha ** 2 * total) @ g / dist
        g_images[idx] += 2 * torch.autograd.grad(term, x)[0]
    lr = syn_lr.detach().clone().requires_grad_(True)
    loss = (start - lr * total - target).pow(2).sum() / dist
    return g_images, torch.autograd.grad(loss, lr)[0]


def test_first_order_is_tesla_public_code():
    flat, images, syn_lr, labels, start, target = _problem()
    matcher = Matcher(flat)
    plan = plan_batches(len(images), 4, 3, seed=1)
    _, g_img, g_lr, _ = matcher("first_order", images, syn_lr, labels, start, target, plan, [0, 1, 2])
    ref_img, ref_lr = _tesla_public_code_gradient(flat, images, syn_lr, labels, start, target, plan)
    torch.testing.assert_close(g_img, ref_img, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(g_lr, ref_lr, rtol=1e-6, atol=1e-12)
    # exact for one step, an approximation of the unrolled gradient beyond
    one = plan[:1]
    a = matcher("first_order", images, syn_lr, labels, start, target, one, [0])
    b = matcher("unrolled", images, syn_lr, labels, start, target, one, [0])
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-12)
    unrolled = matcher("unrolled", images, syn_lr, labels, start, target, plan, [0, 1, 2])
    assert (g_img - unrolled[1]).abs().max() > 1e-3 * unrolled[1].abs().max()


def test_loss_is_normalised_parameter_distance():
    flat, images, syn_lr, labels, start, target = _problem()
    plan = plan_batches(len(images), 0, 2, seed=0)
    matcher = Matcher(flat)
    with torch.no_grad():
        syn_lr.zero_()
    assert matcher("exact", images, syn_lr, labels, start, target, plan, [0, 1])[0] == 1.0  # no step: ratio 1
    with torch.no_grad():
        syn_lr.fill_(0.05)
    theta = start
    for idx in plan:  # plain SGD on the synthetic batches
        th = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(flat(th, images.detach()[idx]), labels[idx]), th)
        theta = theta - 0.05 * g
    expected = (theta - target).pow(2).sum() / (start - target).pow(2).sum()
    for mode in mtt.GRADIENTS:
        torch.testing.assert_close(matcher(mode, images, syn_lr, labels, start, target, plan, [0, 1])[0], expected)


def test_plan_batches_is_mtts_order():
    plan = plan_batches(10, 4, 6, seed=0)
    assert [len(p) for p in plan] == [2, 4, 4, 2, 4, 4]  # chunks of a permutation, taken from the end
    assert sorted(torch.cat(plan[:3]).tolist()) == list(range(10))
    assert sorted(torch.cat(plan[3:]).tolist()) == list(range(10))
    assert all(len(p) == 10 for p in plan_batches(10, 0, 3, seed=0))


def _saved_peak(mode: str, steps: int) -> int:
    flat, images, syn_lr, labels, start, target = _problem(dtype=torch.float32)
    with SavedTensorMeter() as meter:
        Matcher(flat)(mode, images, syn_lr, labels, start, target, plan_batches(6, 3, steps, 0), list(range(steps)))
    assert meter.live == 0  # every graph was freed
    return meter.peak


def test_tesla_saved_memory_flat_in_steps():
    """What autograd holds for backward: one step's graph for TESLA, all N steps' graphs for MTT."""
    for mode in ("exact", "first_order"):
        peaks = [_saved_peak(mode, n) for n in (2, 4, 8)]
        assert peaks[0] == peaks[1] == peaks[2] > 0, (mode, peaks)
    mtt_peaks = [_saved_peak("unrolled", n) for n in (2, 4, 8)]
    assert mtt_peaks[0] < mtt_peaks[1] < mtt_peaks[2]
    assert mtt_peaks[2] > 3 * mtt_peaks[0]  # about linear in N
    assert mtt_peaks[0] > _saved_peak("exact", 2)


# ---------------------------------------------------------------- guardx mtt, end to end
BASE = [
    "data.dataset=digits", "data.resolution=8", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]",
    "buffers.width=8", "buffers.depth=2", "buffers.num_experts=2", "buffers.epochs=3",
    "buffers.dsa_strategy=none", "run.progress=false", "run.device=cpu",
    "mtt.ipc=2", "mtt.iterations=4", "mtt.syn_steps=3", "mtt.batch_syn=8", "mtt.expert_epochs=1",
    "mtt.max_start_epoch=2", "mtt.dsa_strategy=none", "mtt.ckpt_every=1", "mtt.lr_img=10",
]
VARIANTS = {
    "mtt": [],
    "tesla": ["mtt.tesla=true"],
    "tesla_learn": ["mtt.tesla=true", "mtt.labels=learn"],
    "mtt_zca": ["buffers.zca=true"],
}


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    """Expert buffers, plain and ZCA, trained once for every end-to-end test."""
    root = tmp_path_factory.mktemp("buffers")
    plain = buffers.run(load_config(None, [*BASE, f"run.out_dir={root / 'plain'}"]))
    zca = buffers.run(load_config(None, [*BASE, f"run.out_dir={root / 'zca'}", "buffers.zca=true"]))
    return {"plain": plain, "zca": zca}


def _cfg(out: Path, trajectories, variant: str, *extra: str):
    bdir = trajectories["zca" if variant.endswith("zca") else "plain"]
    return load_config(None, [*BASE, *VARIANTS[variant], f"run.out_dir={out}", f"mtt.buffers_dir={bdir}", *extra])


class Killed(Exception):
    pass


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_distill_writes_the_set_and_resumes(tmp_path, trajectories, variant, monkeypatch):
    ref = mtt.run(_cfg(tmp_path / "ref", trajectories, variant))
    method = "tesla" if "tesla" in variant else "mtt"
    assert ref.name == method
    manifest = json.loads((ref / "manifest.json").read_text())
    soft = variant.startswith("tesla")
    assert manifest["distiller"] == method and manifest["labels"] == ("soft" if soft else "hard")
    assert manifest["ipc"] == 2 and manifest["images"] == 20 and manifest["num_classes"] == 10
    assert manifest["resolution"] == 8 and manifest["settings"]["gradient"] == ("exact" if soft else "unrolled")
    for k in ("classes", "mean", "std", "syn_lr", "quantisation", "student", "model"):
        assert k in manifest
    assert manifest["syn_lr"] != 0.01  # the step size was learned
    paths = manifest["paths"]
    assert paths[:3] == ["images/0/0_0000.png", "images/0/0_0001.png", "images/1/1_0000.png"]
    assert all((ref / p).is_file() for p in paths)
    exact = torch.load(ref / "synthetic.pt", weights_only=True)
    assert exact["images"].shape == (20, 3, 8, 8) and exact["labels"].tolist() == [c for c in range(10) for _ in "ab"]
    if soft:
        stored = torch.load(ref / manifest["soft_labels"], weights_only=True)
        assert stored["paths"] == paths and stored["logits"].shape == (20, 10)
        assert stored["logits"].dtype == torch.float32
    else:
        assert manifest["soft_labels"] is None
    if variant == "tesla_learn":  # learned: no longer the initial expert logits
        first = torch.load(ref / "ckpt" / "step_000000003.pt", weights_only=True)["labels"]
        assert not torch.equal(first, torch.load(ref / "synthetic.pt", weights_only=True)["logits"])
    if variant == "mtt_zca":  # stored un-whitened; zca.pt maps them back to what was distilled
        from guardx.data.zca import ZCA

        assert manifest["zca"] == "zca.pt" and manifest["mean"] == [0.0] * 3
        zca = ZCA.from_state(torch.load(ref / "zca.pt", weights_only=True))
        last = torch.load(ref / "ckpt" / "step_000000004.pt", weights_only=True)["images"]
        torch.testing.assert_close(zca(exact["images"]), last, rtol=1e-4, atol=1e-4)
    # a run killed in iteration 3 (after the checkpoint of iteration 2) resumes to the same bytes
    calls = {"n": 0}
    original = Matcher.__call__

    def dying(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return original(self, *args)

    monkeypatch.setattr(Matcher, "__call__", dying)
    with pytest.raises(Killed):
        mtt.run(_cfg(tmp_path / "killed", trajectories, variant))
    monkeypatch.setattr(Matcher, "__call__", original)
    out = tmp_path / "killed" / method
    assert not (out / "manifest.json").exists()
    mtt.run(_cfg(tmp_path / "killed", trajectories, variant))
    got = torch.load(out / "synthetic.pt", weights_only=True)
    for key in ("images", "labels", "logits"):
        if exact[key] is None:
            assert got[key] is None
        else:
            assert torch.equal(got[key], exact[key]), key
    assert got["syn_lr"] == exact["syn_lr"]
    resumed = json.loads((out / "metrics.json").read_text())["history"]
    assert resumed == json.loads((ref / "metrics.json").read_text())["history"]


def test_distill_refuses_start_epochs_beyond_the_experts(tmp_path, trajectories):
    from guardx.errors import ConfigError

    with pytest.raises(ConfigError, match="max_start_epoch"):
        mtt.run(_cfg(tmp_path, trajectories, "mtt", "mtt.max_start_epoch=3"))


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs" / "mtt").glob("*.yaml")))
def test_presets_load(preset):
    base = {"imagenette": "imagenette.yaml", "tinyimagenet": "tinyimagenet.yaml",
            "imagenet1k": "imagenet1k.yaml"}.get(preset.split("_")[0].replace("tesla-", ""))
    files = ([REPO / "configs" / base] if base else []) + [REPO / "configs" / "mtt" / preset]
    cfg = load_config(files)
    assert cfg.mtt.ipc == int(preset.rsplit("ipc", 1)[1].split(".")[0])
    assert cfg.buffers.model == "convnet" and cfg.buffers.width == 128 and cfg.buffers.depth in (3, 4, 5)
    assert cfg.mtt.max_start_epoch + cfg.mtt.expert_epochs <= cfg.buffers.epochs


@pytest.mark.slow
def test_mtt_and_tesla_sets_train_students_through_the_pipeline(tmp_path):
    """The distiller interface end to end: buffers → mtt/tesla → the shared train (its authors' recipe: the
    learned lr, hard or soft labels, exact float pixels, ZCA inside the student) → evaluate."""
    from guardx import pipeline
    from guardx.models._io import load_model

    cfg = load_config(None, [*BASE, f"run.out_dir={tmp_path}", "model.name=convnet", "model.width=8",
                             "train.epochs=2", "train.batch_size=10", "evaluate.max_samples=20",
                             "evaluate.batch_size=20", "evaluate.attacks=[pgd3]", "train.recipe=auto",
                             "pipeline.methods=[{name: mtt, distiller: mtt, overrides: {buffers: {zca: true}}}, "
                             "{name: tesla, distiller: tesla}]"])
    # the recipe's 1000 epochs / DSA would take minutes: keep the rest of it (sgd, learned lr, loss)
    import guardx.train as train_stage

    real = train_stage.student_recipe
    train_stage.student_recipe = lambda c, m: real(c, m).with_overrides({"train": {"epochs": 2, "augment": "none",
                                                                                   "batch_size": 10}})
    try:
        report = pipeline.run(cfg)
    finally:
        train_stage.student_recipe = real
    assert [(r["method"], r["model"]) for r in report["rows"]] == [("mtt", "student"), ("tesla", "student")]
    for method, labels in (("mtt", "hard"), ("tesla", "soft")):
        manifest = json.loads((tmp_path / method / method / "manifest.json").read_text())
        assert manifest["labels"] == labels
        metrics = json.loads((tmp_path / method / "train" / "metrics.json").read_text())
        assert metrics["labels"] == labels and metrics["steps"] == 2 * 2  # 20 images, batch 10, 2 epochs
        student, meta = load_model(tmp_path / method / "train" / "student.pt")
        assert (meta.get("zca") is not None) == (method == "mtt")  # ZCA travels inside the saved student
        if method == "mtt":
            assert student.whiten is not None and torch.count_nonzero(student.whiten.matrix) > 0
        import yaml

        used = yaml.safe_load((tmp_path / method / "train" / "config.yaml").read_text())["train"]
        assert used["optimizer"] == "sgd" and used["lr"] == pytest.approx(manifest["syn_lr"])  # the learned lr
        assert metrics["objective"].startswith("Plain" if labels == "hard" else "SoftLabelKD(T=1")
