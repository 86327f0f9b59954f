"""Every stage on tiny data, resume after an interruption, failure modes, and a pipeline smoke run."""
import json
import subprocess
import sys

import pytest
import torch

from guardx import evaluate, pipeline, recover, relabel, squeeze, train
from guardx.data.distilled import compress_logits, crop_plan, expand_logits
from guardx.errors import DataError, NonFiniteLossError
from guardx.models._io import load_model
from guardx.paths import layout
from guardx.utils.io import load_torch


def test_each_stage_on_tiny_data(tiny_cfg):
    cfg = tiny_cfg("objective.name=guard", "objective.mode=exact")
    teacher_file = squeeze.run(cfg)
    teacher, meta = load_model(teacher_file)
    assert meta["num_classes"] == 10 and meta["classes"] == [str(i) for i in range(10)]
    assert layout(cfg).ckpt_dir("squeeze").is_dir()

    images = recover.run(cfg)
    pngs = sorted(images.rglob("*.png"))
    assert len(pngs) == 10 * cfg.recover.ipc
    assert {p.parent.name for p in pngs} == set(meta["classes"])
    manifest = json.loads(layout(cfg).manifest("recover").read_text())
    assert manifest["images"] == 20 and manifest["synthesized_this_run"] == 20

    relabel.run(cfg)
    blob = torch.load(layout(cfg).relabel_epoch(1), weights_only=True)
    assert blob["order"].shape == (20,) and blob["crops"].shape == (20, 5) and blob["logits"].shape == (20, 10)
    assert blob["logits"].dtype == torch.float16 and sorted(blob["order"].tolist()) == list(range(20))

    student_file = train.run(cfg)
    student, smeta = load_model(student_file)
    assert smeta["num_classes"] == 10
    assert not all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))

    rows = evaluate.run(cfg)
    assert [r["model"] for r in rows] == ["teacher", "student"]
    for r in rows:
        acc = r["accuracy"]
        assert acc["n"] == cfg.evaluate.max_samples
        for metric in ("clean", "pgd@1/255"):  # percentages of the n samples, from the counts
            assert acc[metric] == pytest.approx(100 * r["counts"][metric] / acc["n"])


def test_relabel_stores_what_train_replays(tiny_cfg):
    """The crops train replays are the ones relabel labelled: the teacher on a replayed item reproduces
    the stored logits."""
    from guardx.data.distilled import DistilledSet, ReplayDataset

    cfg = tiny_cfg("relabel.topk=3")
    for stage in (squeeze, recover, relabel):
        stage.run(cfg)
    teacher, meta = load_model(layout(cfg).teacher)
    distilled = DistilledSet(layout(cfg).recover_images, meta["classes"])
    ds = ReplayDataset(distilled, resolution=meta["resolution"], plan_fn=crop_plan(cfg, distilled),
                       targets_fn=lambda e: expand_logits(load_torch(layout(cfg).relabel_epoch(e))))
    ds.set_epoch(1)
    x, target = ds[7]
    with torch.no_grad():
        logits = teacher(x[None])[0]
    top = logits.topk(3)
    assert torch.equal(torch.isfinite(target).nonzero().flatten().sort().values, top.indices.sort().values)
    assert torch.allclose(target[top.indices], logits[top.indices], atol=2e-2, rtol=2e-3)  # fp16 storage


def test_online_relabel_labels_the_crops_store_mode_stores(tiny_cfg, tmp_path):
    """relabel.mode=online stores no labels; train then runs the teacher on each batch of the very crops
    store mode labels, so the targets equal the stored soft labels (to their fp16 storage), the student's
    loss is the same in both modes, and so is the student trained on them."""
    import shutil

    from guardx.models import create_model
    from guardx.train import training_data

    store = tiny_cfg()
    for stage in (squeeze, recover, relabel):
        stage.run(store)
    online = tiny_cfg("relabel.mode=online", f"run.out_dir={tmp_path / 'online'}")
    for stage in ("squeeze", "recover"):  # the same teacher and distilled set
        shutil.copytree(layout(store).stage(stage), layout(online).stage(stage))
    relabel.run(online)
    assert json.loads(layout(online).manifest("relabel").read_text())["mode"] == "online"
    assert not list(layout(online).stage("relabel").glob("epoch_*.pt"))

    manifest = json.loads(layout(store).distilled_manifest.read_text())
    ds_store, kd_store = training_data(store, layout(store), manifest, torch.device("cpu"))
    ds_online, kd_online = training_data(online, layout(online), manifest, torch.device("cpu"))
    torch.manual_seed(0)
    student = create_model("resnet18_small", num_classes=10, width=4, mean=[0.5] * 3, std=[0.5] * 3).eval()
    for epoch in range(store.relabel.epochs):
        ds_store.set_epoch(epoch)
        ds_online.set_epoch(epoch)
        x, stored = (torch.stack(t) for t in zip(*(ds_store[k] for k in range(len(ds_store)))))
        x_online, labels = zip(*(ds_online[k] for k in range(len(ds_online))))
        x_online, labels = torch.stack(x_online), torch.tensor(labels)
        assert torch.equal(x_online, x)  # the same crops, in the same order
        assert torch.equal(labels, ds_online.distilled.labels[ds_online.order])  # online items carry the class
        with torch.no_grad():
            targets = kd_online.teacher(x)
        torch.testing.assert_close(targets, stored, atol=2e-2, rtol=2e-3)  # fp16 storage
        loss_online, _ = kd_online(student, x, labels)
        loss_store, _ = kd_store(student, x, stored)
        assert loss_online.item() == pytest.approx(loss_store.item(), rel=1e-3)

    students = {}
    for name, cfg in (("store", store), ("online", online)):
        students[name] = load_model(train.run(cfg))[0].state_dict()
        metrics = json.loads(layout(cfg).metrics("train").read_text())
        assert metrics["objective"].endswith(f"{'online' if name == 'online' else 'stored'})")
    # same initial weights (loading the teacher must not shift the seeded RNG), same batches, same loss: the
    # students differ by the fp16 rounding of the stored targets only (measured: 2.4e-4 after 4 AdamW steps)
    for key, value in students["store"].items():
        torch.testing.assert_close(students["online"][key], value, rtol=0, atol=1e-3, msg=key)


def test_compress_expand_logits_roundtrip():
    logits = torch.randn(6, 40)
    full = expand_logits(compress_logits(logits, 0))
    assert torch.allclose(full, logits, atol=1e-2)
    part = expand_logits(compress_logits(logits, 5))
    assert torch.isfinite(part).sum(1).tolist() == [5] * 6
    assert torch.equal(part.argmax(1), logits.argmax(1))


def test_recover_loss_decreases(tiny_cfg):
    # augmentation off so successive losses are comparable (with it, each iteration sees another view)
    cfg = tiny_cfg("recover.iterations=40", "squeeze.max_steps=20", "recover.rrc_scale=[1.0,1.0]",
                   "recover.jitter=0", "recover.flip=false")
    teacher, meta = load_model(squeeze.run(cfg))
    for p in teacher.parameters():
        p.requires_grad_(False)
    history: list = []
    images = recover.synthesize(teacher, torch.arange(10), cfg, resolution=16, seed=0, history=history)
    assert images.shape == (10, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5


def _interrupt_at(monkeypatch, step_to_fail: int):
    import guardx.loop as loop

    real = loop.check_finite

    def check(value, *, stage, step, last_good):
        if step == step_to_fail:
            raise KeyboardInterrupt
        real(value, stage=stage, step=step, last_good=last_good)

    monkeypatch.setattr(loop, "check_finite", check)


def test_squeeze_resumes_exactly_after_interruption(tiny_cfg, tmp_path, monkeypatch):
    overrides = ["squeeze.max_steps=0", "squeeze.epochs=2", "squeeze.ckpt_every_steps=1",
                 "objective.name=adv", "objective.steps=1"]  # adv draws random starts: RNG must resume too
    reference = squeeze.run(tiny_cfg(*overrides, f"run.out_dir={tmp_path / 'ref'}"))

    cfg = tiny_cfg(*overrides, f"run.out_dir={tmp_path / 'resumed'}")
    _interrupt_at(monkeypatch, 30)  # mid second epoch (23 steps per epoch)
    with pytest.raises(KeyboardInterrupt):
        squeeze.run(cfg)
    assert not layout(cfg).teacher.exists()
    ckpts = sorted(layout(cfg).ckpt_dir("squeeze").glob("step_*.pt"))
    # squeeze.keep_checkpoints (3) reaches the checkpointer: the newest three steps, across the restart too
    assert [c.name for c in ckpts] == ["step_000000028.pt", "step_000000029.pt", "step_000000030.pt"]
    monkeypatch.undo()
    resumed = squeeze.run(cfg)
    assert [c.name for c in sorted(layout(cfg).ckpt_dir("squeeze").glob("step_*.pt"))] == \
        ["step_000000044.pt", "step_000000045.pt", "step_000000046.pt"]
    a = torch.load(reference, weights_only=True)["model"]
    b = torch.load(resumed, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the resumed second epoch's metrics average all of its batches, those before the interruption too
    history = [json.loads(p.read_text())["history"] for p in (reference.parent / "metrics.json",
                                                              resumed.parent / "metrics.json")]
    assert history[0] == history[1]


def test_nan_loss_stops_with_last_good_checkpoint(tiny_cfg):
    cfg = tiny_cfg("squeeze.lr=1e12", "squeeze.max_steps=20", "squeeze.ckpt_every_steps=1")
    with pytest.raises(NonFiniteLossError) as e:
        squeeze.run(cfg)
    msg = str(e.value)
    assert "loss became" in msg and "last good checkpoint" in msg and "\n" not in msg
    path = msg.split("last good checkpoint: ")[1]
    state = torch.load(path, weights_only=True)  # intact and loadable
    assert all(torch.isfinite(v).all() for v in state["engine"]["model"].values() if v.is_floating_point())
    assert not layout(cfg).teacher.exists()


def test_missing_and_empty_data_folders(tiny_cfg, tmp_path):
    cfg = tiny_cfg("data.dataset=imagefolder", f"data.train_dir={tmp_path / 'nope'}")
    with pytest.raises(DataError, match="data folder not found"):
        squeeze.run(cfg)
    root = tmp_path / "tree"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    from PIL import Image

    Image.new("RGB", (20, 20)).save(root / "cat" / "a.jpg")
    cfg = tiny_cfg("data.dataset=imagefolder", f"data.train_dir={root}")
    with pytest.raises(DataError, match="class folder has no images: .*dog"):
        squeeze.run(cfg)


def test_stage_order_errors_are_one_line(tiny_cfg):
    from guardx.errors import GuardxError

    with pytest.raises(GuardxError, match="checkpoint not found: .*teacher.pt"):
        recover.run(tiny_cfg())


def test_pipeline_smoke_and_rerun_skips(tiny_cfg, capsys):
    cfg = tiny_cfg("pipeline.methods=[{name: sre2l, objective: {name: plain}}, "
                   "{name: guard, objective: {name: guard, mode: lossdiff}}]")
    report = pipeline.run(cfg)
    assert [(r["method"], r["model"]) for r in report["rows"]] == \
        [("sre2l", "teacher"), ("sre2l", "student"), ("guard", "teacher"), ("guard", "student")]
    out = pipeline.Path(cfg.run.out_dir)
    md = (out / "report.md").read_text()
    assert "| guard | student | 1 |" in md and "seeds 0" in md and "guard − sre2l" in md
    import csv

    rows = list(csv.DictReader((out / "report.csv").open()))  # one line per method x model x metric
    assert [(r["method"], r["model"], r["metric"]) for r in rows][:3] == \
        [("sre2l", "teacher", "clean"), ("sre2l", "teacher", "pgd@1/255"), ("sre2l", "student", "clean")]
    assert len(rows) == 8
    assert float(rows[-1]["accuracy"]) == pytest.approx(report["rows"][-1]["accuracy"]["pgd@1/255"], abs=1e-4)
    again = pipeline.run(cfg)  # everything done: stages skip, same numbers
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in report["rows"]]
    assert json.loads((out / "guard" / "squeeze" / "metrics.json").read_text())["steps"] == cfg.squeeze.max_steps


def test_cli_reports_config_errors_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "guardx", "squeeze", "squeeze.epoch=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "guardx: error: unknown config key 'squeeze.epoch' (did you mean 'squeeze.epochs'?)"


def test_recover_and_relabel_resume_where_they_stopped(tiny_cfg):
    cfg = tiny_cfg("recover.batch_size=10")  # 2 jobs of 10 images
    squeeze.run(cfg)
    recover.run(cfg)
    manifest = layout(cfg).manifest("recover")
    first_job = sorted(layout(cfg).recover_images.rglob("*_0000.png"))
    kept = {p: p.read_bytes() for p in first_job}
    manifest.unlink()  # as if killed after the first job: its PNGs exist, the second job's do not
    for p in layout(cfg).recover_images.rglob("*_0001.png"):
        p.unlink()
    recover.run(cfg)
    info = json.loads(manifest.read_text())
    assert info["synthesized_this_run"] == 10 and info["reused"] == 10
    assert all(p.read_bytes() == b for p, b in kept.items())  # finished work untouched

    relabel.run(cfg)
    layout(cfg).manifest("relabel").unlink()
    stamp = layout(cfg).relabel_epoch(0).stat().st_mtime_ns
    layout(cfg).relabel_epoch(1).unlink()
    relabel.run(cfg)
    assert layout(cfg).relabel_epoch(1).is_file() and layout(cfg).relabel_epoch(0).stat().st_mtime_ns == stamp
    assert not list(layout(cfg).stage("relabel").glob(".*.tmp"))  # no temp files left behind


def test_pipeline_shares_a_stage_two_methods_would_run_alike(tiny_cfg):
    """SRe2L and CDA train the same teacher (and ipc 1 and ipc 2 share it too): it is trained and evaluated
    once and linked into the other methods' folders; stages whose settings differ (recover) still run."""
    cfg = tiny_cfg("pipeline.methods=[{name: sre2l}, {name: cda, distiller: cda}, "
                   "{name: sre2l_ipc1, overrides: {recover: {ipc: 1}}}]")
    report = pipeline.run(cfg)
    out = pipeline.Path(cfg.run.out_dir)
    for method in ("cda", "sre2l_ipc1"):
        assert (out / method / "squeeze").is_symlink()
        assert (out / method / "squeeze").resolve() == (out / "sre2l" / "squeeze").resolve()
        assert not (out / method / "recover").is_symlink()  # CDA's crops / another ipc: their own recover
    assert (out / "sre2l_ipc1" / "relabel").is_dir() and not (out / "cda" / "evaluate" / "teacher.json").exists()
    teachers = [r for r in report["rows"] if r["model"] == "teacher"]
    assert [r["method"] for r in teachers] == ["sre2l", "cda", "sre2l_ipc1"]  # one evaluation, three rows
    assert teachers[0]["accuracy"] == teachers[1]["accuracy"] == teachers[2]["accuracy"]
    assert len(list((out / "sre2l_ipc1" / "recover" / "images").rglob("*.png"))) == 10
    again = pipeline.run(cfg)  # rerun: everything done, same rows
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in report["rows"]]
