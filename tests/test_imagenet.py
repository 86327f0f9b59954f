"""ImageNet as it is on disk: label files, a flat val folder, `guardx data check`, the eval protocol on
every backend, and configs/imagenet1k.yaml end to end (squeeze → recover → relabel → train → evaluate)
once per loader backend on a generated ImageNet-shaped tree (tests/conftest.py: imagenet_tree)."""
from __future__ import annotations

import importlib.util
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from guardx.config import load_config
from guardx.data import build_loader
from guardx.data.labels import read_class_names, read_label_map, read_val_labels
from guardx.data.splits import resolve_split
from guardx.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
HAVE_ALL = all(importlib.util.find_spec(m) is not None for m in ("ffcv", "nvidia")) and \
    importlib.util.find_spec("nvidia.dali") is not None
needs_backends = pytest.mark.skipif(not HAVE_ALL, reason="needs the ffcv and dali extras")
BACKENDS = ("folder", "ffcv", "dali")


def data_cfg(tree, *extra: str):
    return load_config(None, ["data.dataset=imagefolder", "data.workers=1", f"data.train_dir={tree['train']}",
                              f"data.val_dir={tree['val']}", f"data.val_labels={tree['val_labels']}", *extra]).data


# ------------------------------------------------------------------------------------------ label files


def test_every_label_format_gives_the_same_labels(imagenet_tree):
    t, synsets = imagenet_tree, imagenet_tree["synsets"]
    expected = {f"ILSVRC2012_val_{i + 1:08d}.JPEG": synsets.index(s) for i, s in enumerate(t["val_synsets"])}
    assert read_val_labels(t["val_labels"], synsets) == expected
    assert read_val_labels(t["val_index"], synsets) == expected
    assert read_val_labels(t["devkit_truth"], synsets, label_map=t["devkit_map"]) == expected
    kaggle = read_val_labels(t["kaggle"], synsets)  # ImageIds without the extension
    assert {f"{k}.JPEG": v for k, v in kaggle.items()} == expected
    # the devkit's IDs are not the sorted order: the map is what makes them right
    ids = read_label_map(t["devkit_map"])
    assert sorted(ids) == list(range(1, 11)) and [ids[k] for k in sorted(ids)] != synsets
    assert read_class_names(t["class_names"])["n01440764"] == "tench, Tinca tinca"
    assert read_class_names(t["devkit_map"])["n01443537"] == "goldfish"  # map_clsloc.txt: ID skipped


def test_meta_mat_label_map(imagenet_tree, tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    ids = read_label_map(imagenet_tree["devkit_map"])
    # the devkit's meta.mat: a struct array of 1000 leaves (num_children 0) plus WordNet ancestors
    import numpy as np

    rows = [(i, s, "words", "gloss", 0) for i, s in ids.items()] + [(1001, "n00001740", "entity", "", 3)]
    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children")
    synsets = np.array(rows, dtype=[(f, object) for f in fields]).reshape(-1, 1)  # a MATLAB struct array
    mat = tmp_path / "meta.mat"
    scipy_io.savemat(mat, {"synsets": synsets})
    assert read_label_map(mat) == ids
    got = read_val_labels(imagenet_tree["devkit_truth"], imagenet_tree["synsets"], label_map=mat)
    assert got == read_val_labels(imagenet_tree["val_labels"], imagenet_tree["synsets"])


@pytest.mark.parametrize("content, extra, message", [
    ("3\n1\n", {}, "looks like the devkit's ground truth .* set data.val_label_map"),
    ("a.JPEG 1\nb.JPEG 10\n", {}, r"class index 10 is outside 0..9 .* values run 1..10: if they are the devkit's "
                                  r"1-based ILSVRC2012_IDs, set data.val_label_map"),
    ("a.JPEG -1\n", {}, "class index -1 is outside 0..9"),
    ("a.JPEG n01440764\nb.JPEG n09999999\n", {}, ":2: b.JPEG is labelled n09999999, which is not a class of the "
                                                 "train split"),
    ("a.JPEG n01440764\nb.JPEG 3\n", {}, ":2: mixes synsets and integer labels"),
    ("a.JPEG n01440764 extra\n", {}, ":1: expected 'FILENAME SYNSET' or 'FILENAME INDEX'"),
    ("a.JPEG n01440764\na.JPEG n01443537\n", {}, "a.JPEG is labelled twice"),
    ("a.JPEG 42\n", {"label_map": True}, ":1: ILSVRC2012_ID 42 is not in data.val_label_map"),
])
def test_bad_label_files_are_one_line_errors(imagenet_tree, tmp_path, content, extra, message):
    f = tmp_path / "labels.txt"
    f.write_text(content)
    kwargs = {"label_map": imagenet_tree["devkit_map"]} if extra else {}
    with pytest.raises(DataError, match=message) as err:
        read_val_labels(f, imagenet_tree["synsets"], **kwargs)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------- splits


def test_flat_val_split_follows_the_train_classes(imagenet_tree):
    t = imagenet_tree
    split = resolve_split(data_cfg(t), "val")
    assert split.layout == "flat" and split.classes == t["synsets"]
    assert [Path(p).name for p, _ in split.samples] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 51)]
    assert [split.classes[y] for _, y in split.samples] == t["val_synsets"]
    # a model's class list (evaluate passes it) wins over data.train_dir
    cfg = replace(data_cfg(t), train_dir="")
    with pytest.raises(ConfigError, match="set data.train_dir"):
        resolve_split(cfg, "val")
    assert resolve_split(cfg, "val", t["synsets"]).samples == split.samples


def test_flat_val_problems_name_the_files(imagenet_tree, tmp_path):
    t = imagenet_tree
    val = tmp_path / "val"
    shutil.copytree(t["val"], val)
    (val / "ILSVRC2012_val_00000007.JPEG").unlink()
    shutil.copy(val / "ILSVRC2012_val_00000008.JPEG", val / "stray.JPEG")
    cfg = replace(data_cfg(t), val_dir=str(val))
    with pytest.raises(DataError) as err:
        resolve_split(cfg, "val")
    msg = str(err.value)
    assert "1 images in" in msg and "have no label" in msg and "stray.JPEG" in msg
    assert "ILSVRC2012_val_00000007.JPEG" in msg and "\n" not in msg
    loose = resolve_split(cfg, "val", strict=False)
    assert len(loose.samples) == 49 and len(loose.problems) == 2
    with pytest.raises(DataError, match="holds images but no class folders: .*data.val_labels"):
        resolve_split(replace(cfg, val_labels=""), "val")
    with pytest.raises(DataError, match="has 10 sub-folders: an ImageFolder val split needs no data.val_labels"):
        resolve_split(replace(cfg, val_dir=str(t["train"])), "val")


def test_imagefolder_val_uses_train_indices(imagenet_tree, tmp_path):
    t = imagenet_tree
    val = tmp_path / "val_tree"
    for s in t["synsets"][3:5]:  # a val tree with 2 of the 10 classes: labels are still 3 and 4
        shutil.copytree(t["train"] / s, val / s)
    cfg = replace(data_cfg(t), val_dir=str(val), val_labels="")
    split = resolve_split(cfg, "val")
    assert split.classes == t["synsets"] and {y for _, y in split.samples} == {3, 4}
    (val / "n77777777").mkdir()
    shutil.copy(t["train"] / t["synsets"][0] / f"{t['synsets'][0]}_1.JPEG", val / "n77777777" / "x.JPEG")
    with pytest.raises(DataError, match="class folders the train split lacks: n77777777"):
        resolve_split(cfg, "val")


def test_data_check_reports_counts_unreadable_and_one_split_classes(imagenet_tree, tmp_path, capsys):
    from guardx.cli import main

    t = imagenet_tree
    labels = tmp_path / "labels.txt"  # val without the last class, plus an unreadable file
    lines = [ln for ln in Path(t["val_labels"]).read_text().splitlines() if not ln.endswith(t["synsets"][-1])]
    val = tmp_path / "val"
    val.mkdir()
    for ln in lines:
        shutil.copy(t["val"] / ln.split()[0], val / ln.split()[0])
    (val / "broken.JPEG").write_bytes(b"not a jpeg")
    labels.write_text("\n".join(lines + [f"broken.JPEG {t['synsets'][0]}"]) + "\n")
    rc = main(["data", "check", "--workers", "1", f"data.train_dir={t['train']}", f"data.val_dir={val}",
               f"data.val_labels={labels}", f"data.class_names={t['class_names']}"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert f"{val / 'broken.JPEG'}\t" in out
    table = [ln.split("\t") for ln in out.splitlines() if ln.startswith("n0")]
    assert table[0][:2] == ["n01440764", "24"] and table[0][-1] == "tench, Tinca tinca"
    expected = [t["val_synsets"].count(s) + (s == t["synsets"][0]) for s in t["synsets"][:9]] + [0]
    assert [int(r[2]) for r in table] == expected  # the unreadable file still counts (it is labelled)
    assert "val (" in err and ", flat): 46 images in 9 classes" in err and "1 unreadable" in err
    assert f"1 classes have images in train only: {t['synsets'][-1]}" in err
    # a clean pair passes
    assert main(["data", "check", "--workers", "1", f"data.train_dir={t['train']}", f"data.val_dir={t['val']}",
                 f"data.val_labels={t['val_labels']}"]) == 0


# --------------------------------------------------------------------------------- eval protocol


@needs_backends
def test_eval_protocol_is_the_same_on_every_backend(imagenet_tree, tmp_path, capsys):
    """Resize 256 + center crop 224 (data.val_crop_ratio=0.875) at 224 px on ImageNet-sized images, CMYK,
    grayscale and PNG-in-.JPEG included: DALI resamples the exact window torchvision reads (within the
    decoder's rounding); FFCV on a val .beton stored as Resize(256) makes it is the folder backend exactly
    (raw) or up to the JPEG re-encoding (jpg). Another ratio is followed by all three (FFCV resampling the
    stored images a second time, with a warning)."""
    from guardx.cli import main
    from guardx.data.ffcv import convert_image_folder, read_meta

    t, n = imagenet_tree, 12  # the first val files hold the CMYK, grayscale and PNG ones
    raw, jpg = tmp_path / "val-raw.beton", tmp_path / "val-jpg.beton"
    # the flat folder from the command line (classes from data.train_dir), and a subset through the API
    assert main(["data", "convert", str(t["val"]), str(raw), f"data.train_dir={t['train']}", "--labels",
                 str(t["kaggle"]), "--eval-resize", "256", "--write-mode", "raw", "--workers", "1"]) == 0
    assert "50 images in 10 classes" in capsys.readouterr().out
    meta = read_meta(raw)
    assert meta["classes"] == t["synsets"] and meta["layout"] == "flat" and meta["settings"]["eval_resize"] == 256
    split = resolve_split(data_cfg(t, "data.resolution=224"), "val")
    split.samples = split.samples[:n]
    convert_image_folder(t["val"], jpg, split=split, write_mode="jpg", workers=1, show_progress=False, eval_resize=256)
    for ratio in (0.875, 0.6):
        base = ["data.resolution=224", f"data.val_crop_ratio={ratio}"]
        out = {b: _eval_batch(data_cfg(t, *base, f"data.backend={b}"), n) for b in ("folder", "dali")}
        if ratio == 0.875:
            for name, beton in (("ffcv-raw", raw), ("ffcv-jpg", jpg)):
                out[name] = _eval_batch(data_cfg(t, *base, "data.backend=ffcv", f"data.ffcv_val={beton}"), n)
        else:
            with pytest.warns(UserWarning, match="resampling them again"):
                out["ffcv-twice"] = _eval_batch(data_cfg(t, *base, "data.backend=ffcv", f"data.ffcv_val={raw}"), n)
        ref_x, ref_y = out.pop("folder")
        assert ref_x.shape == (n, 3, 224, 224)
        for name, (x, y) in out.items():
            assert torch.equal(y, ref_y), name
        d = (out["dali"][0] - ref_x).abs()
        assert d.max() <= 2 / 255 + 1e-6 and d.mean() < 0.5 / 255, ratio  # decoder/resampler rounding only
        if ratio == 0.875:
            assert torch.equal(out["ffcv-raw"][0], ref_x)
            assert (out["ffcv-jpg"][0] - ref_x).abs().mean() < 0.02  # JPEG re-encoding at quality 90
        else:
            assert (out["ffcv-twice"][0] - ref_x).abs().mean() < 0.02
    cfg = data_cfg(t, "data.backend=ffcv", f"data.ffcv_val={raw}")
    with pytest.raises(DataError, match="classes in another order"):  # checked before FFCV compiles anything
        build_loader(cfg, "val", 0, 1, batch_size=10, augment=False, classes=t["synsets"][::-1])


def _eval_batch(cfg, n):
    loader = build_loader(cfg, "val", 0, 1, batch_size=n, augment=False, max_samples=n)
    x, y = next(iter(loader))
    return x, y


# ------------------------------------------------------------------------------ end to end, per backend

SIZE = [  # configs/imagenet1k.yaml with only sizes changed: 64 px, a narrow net, a step or two per stage
    "data.resolution=64", "data.workers=1", "model.width=8",
    "squeeze.epochs=1", "squeeze.max_steps=2", "recover.iterations=2", "recover.ipc=1", "recover.batch_size=10",
    "recover.jitter=4", "relabel.epochs=1", "relabel.batch_size=10", "train.epochs=1", "train.batch_size=10",
    "evaluate.pgd_steps=2", "evaluate.max_samples=10", "evaluate.batch_size=10", "run.progress=false",
]
_RUNS: dict = {}


def e2e_overrides(tree, backend: str, out: Path) -> list[str]:
    return [*SIZE, f"run.out_dir={out / backend}", f"data.backend={backend}",
            f"data.train_dir={tree['train']}", f"data.val_dir={tree['val']}", f"data.val_labels={tree['val_labels']}",
            f"data.class_names={tree['class_names']}",
            f"data.ffcv_train={out / 'train.beton'}", f"data.ffcv_val={out / 'val.beton'}"]


@pytest.fixture(scope="module")
def e2e(imagenet_tree, tmp_path_factory):
    """``run(backend)`` → (report, overrides, seconds): the pipeline through the CLI, run once per backend."""
    from guardx.cli import main

    out = tmp_path_factory.mktemp("e2e")
    config = str(ROOT / "configs" / "imagenet1k.yaml")

    def run(backend: str):
        if backend not in _RUNS:
            overrides = e2e_overrides(imagenet_tree, backend, out)
            t0 = time.perf_counter()
            if backend == "ffcv":  # both splits from the config: train as is, val flat + resized for eval
                assert main(["data", "convert", "--config", config, "--workers", "1", *overrides]) == 0
            assert main(["pipeline", "--config", config, *overrides]) == 0
            report = json.loads((out / backend / "report.json").read_text())
            _RUNS[backend] = (report, overrides, time.perf_counter() - t0)
        return _RUNS[backend]

    return run


@needs_backends
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_imagenet1k_config_end_to_end(e2e, imagenet_tree, backend):
    report, overrides, seconds = e2e(backend)
    print(f"\n{backend}: imagenet1k pipeline {seconds:.1f} s")
    rows = {(r["method"], r["model"]): r["accuracy"] for r in report["rows"]}
    assert set(rows) == {(m, k) for m in ("sre2l", "guard") for k in ("teacher", "student")}
    assert all(acc["n"] == 10 and 0 <= acc["clean"] <= 100 for acc in rows.values())
    run = Path(report["config"]["run"]["out_dir"])
    from guardx.models._io import load_model

    for method in ("sre2l", "guard"):
        _, meta = load_model(run / method / "squeeze" / "teacher.pt")
        assert meta["classes"] == imagenet_tree["synsets"] and meta["num_classes"] == 10
        assert meta["class_names"][0] == "tench, Tinca tinca"
        metrics = json.loads((run / method / "squeeze" / "metrics.json").read_text())
        assert metrics["skipped_files"] == [] and metrics["steps"] == 2
        assert len(list((run / method / "recover" / "images").rglob("*.png"))) == 10


@needs_backends
@pytest.mark.slow
def test_backends_read_the_same_images_and_labels(e2e, imagenet_tree):
    """The three runs' configs read the same samples in the same order with the same labels, train and val:
    compared with the deterministic eval transform, every image's nearest folder-backend image is the one at
    its own position, and the labels are identical (and the tree's)."""
    t = imagenet_tree
    seen = {}
    for backend in BACKENDS:
        report, overrides, _ = e2e(backend)
        cfg = load_config(ROOT / "configs" / "imagenet1k.yaml", overrides)
        train = build_loader(cfg.data, "train", 0, 1, batch_size=48, seed=cfg.run.seed, augment=False)
        val = build_loader(cfg.data, "val", 0, 1, batch_size=25, augment=False, classes=t["synsets"])
        assert train.classes == val.classes == t["synsets"] and val.class_names[1].startswith("goldfish")
        seen[backend] = {split: [torch.cat(v) for v in zip(*loader)] for split, loader in (("train", train),
                                                                                           ("val", val))}
        assert [t["synsets"][y] for y in seen[backend]["val"][1].tolist()] == t["val_synsets"]
        assert len(seen[backend]["train"][1]) == 240 and torch.bincount(seen[backend]["train"][1]).tolist() == [24] * 10
        assert {r["accuracy"]["n"] for r in report["rows"]} == {10}
    for split in ("train", "val"):
        ref_x, ref_y = seen["folder"][split]
        for backend in ("ffcv", "dali"):
            x, y = seen[backend][split]
            assert torch.equal(y, ref_y), (backend, split)
            dist = torch.cdist(x.flatten(1), ref_x.flatten(1))
            assert torch.equal(dist.argmin(1), torch.arange(len(x))), (backend, split)


def test_tiny_imagenet_val_annotations_are_read(tmp_path):
    from guardx.data.labels import read_val_labels

    f = tmp_path / "val_annotations.txt"
    f.write_text("val_0.JPEG\tn01443537\t0\t10\t62\t42\nval_1.JPEG\tn01629819\t2\t3\t60\t60\n")
    assert read_val_labels(f, ["n01443537", "n01629819"]) == {"val_0.JPEG": 0, "val_1.JPEG": 1}
