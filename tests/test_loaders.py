"""The folder, FFCV and DALI loaders behave the same to the stages (CPU, generated JPEG trees).

The main tree holds solid-colour images (image k of the ImageFolder order has colour k), so every
yielded sample can be identified after any crop, flip or resize: the tests check *which* samples each
rank yields, in which order, not only shapes and labels. FFCV runs with one decoding thread here:
its numba pipelines then compile in seconds instead of ~20 s (the benchmark runs the threaded path).
"""
from __future__ import annotations

import importlib.util
import sys
import warnings

import pytest
import torch

from guardx.config import load_config
from guardx.data import build_loader
from guardx.data.synthetic import identify_solid, write_jpeg_tree
from guardx.errors import ConfigError, DataError, MissingDependencyError

# find_spec, not importorskip: importing ffcv costs ~10 s, paid only when these tests run
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None or importlib.util.find_spec("nvidia") is None
                                or importlib.util.find_spec("nvidia.dali") is None,
                                reason="needs the ffcv and dali extras")

BACKENDS = ("folder", "ffcv", "dali")
RES, BATCH, SEED = 24, 4, 3
CLASSES, PER_CLASS = 3, 7  # 21 images: odd, so 2 ranks need padding (train) and get unequal shards (eval)
BAD = {"class_000/img_00002.jpg": "truncated", "class_001/zz_garbage.jpg": "garbage"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from guardx.data.ffcv import convert_image_folder

    root = tmp_path_factory.mktemp("loaders")
    solid, smooth, bad = root / "solid", root / "smooth", root / "bad"
    write_jpeg_tree(solid, classes=CLASSES, per_class=PER_CLASS, solid=True)
    write_jpeg_tree(smooth, classes=2, per_class=4, size=(56, 44), seed=1)
    write_jpeg_tree(bad, classes=2, per_class=4, solid=True, corrupt=BAD)
    betons = {}
    for name, tree, mode in (("solid", solid, "jpg"), ("smooth", smooth, "raw"), ("bad", bad, "jpg")):
        betons[name] = root / f"{name}.beton"
        convert_image_folder(tree, betons[name], max_resolution=0 if mode == "raw" else 48, write_mode=mode,
                             workers=1, show_progress=False)
    return {"solid": solid, "smooth": smooth, "bad": bad, "beton": betons, "root": root}


def data_cfg(data, backend: str, tree: str = "solid", *extra: str):
    return load_config(None, [
        "data.dataset=imagefolder", f"data.backend={backend}", f"data.resolution={RES}", "data.workers=1",
        f"data.train_dir={data[tree]}", f"data.val_dir={data[tree]}",
        f"data.ffcv_train={data['beton'][tree]}", f"data.ffcv_val={data['beton'][tree]}", *extra]).data


def run_epoch(loader):
    """(sample ids, labels, batch sizes) of one epoch, checking the batch contract on the way."""
    ids, labels, sizes = [], [], []
    for x, y in loader:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, RES, RES) and x.is_contiguous()
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert y.dtype == torch.long and y.shape == (x.shape[0],)
        ids += identify_solid(x)
        labels += y.tolist()
        sizes.append(len(y))
    return ids, labels, sizes


@pytest.fixture(scope="module")
def train_loaders(data):
    """Two ranks of a train loader per backend (built once: FFCV compiles each pipeline)."""
    return {b: [build_loader(data_cfg(data, b), "train", r, 2, batch_size=BATCH, seed=SEED) for r in range(2)]
            for b in BACKENDS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_epoch_order_shards_and_resume(train_loaders, backend):
    loaders = train_loaders[backend]
    n = CLASSES * PER_CLASS
    epoch = {}
    for rank, loader in enumerate(loaders):
        assert loader.classes == [f"class_{k:03d}" for k in range(CLASSES)] and loader.num_classes == CLASSES
        loader.set_epoch(1)
        ids, labels, sizes = run_epoch(loader)
        # the seeded order of the shared ShardedSampler, the ImageFolder label of each image, the epoch size
        assert ids == loader.sampler.indices().tolist()
        assert labels == [i // PER_CLASS for i in ids]
        assert len(sizes) == len(loader) == 3 and sum(sizes) == loader.num_samples == 11 and sizes[-1] == 3
        epoch[rank] = ids
    # 2 ranks: equal length (one wrap-around pad), together every image, disjoint apart from the pad
    assert sorted(set(epoch[0]) | set(epoch[1])) == list(range(n))
    assert len(epoch[0]) + len(epoch[1]) == n + 1
    # same (seed, epoch) → same order; another epoch → another order
    loaders[0].set_epoch(1)
    assert run_epoch(loaders[0])[0] == epoch[0]
    loaders[0].set_epoch(2)
    assert run_epoch(loaders[0])[0] != epoch[0]
    # resume mid-epoch: 8 global samples consumed → each rank continues with the rest of its shard
    loaders[0].set_epoch(1, start=8)
    ids, _, sizes = run_epoch(loaders[0])
    assert ids == epoch[0][4:] and loaders[0].num_samples == 7 and len(sizes) == len(loaders[0]) == 2


def test_backends_agree_on_order(train_loaders):
    orders = {}
    for b in BACKENDS:
        train_loaders[b][1].set_epoch(5)
        orders[b] = run_epoch(train_loaders[b][1])[0]
    assert orders["folder"] == orders["ffcv"] == orders["dali"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_shards_cover_the_set_once(data, backend):
    n = CLASSES * PER_CLASS
    cfg = data_cfg(data, backend)
    shards = []
    for rank in range(2):
        loader = build_loader(cfg, "val", rank, 2, batch_size=BATCH, augment=False)
        ids, labels, sizes = run_epoch(loader)
        assert ids == list(range(rank, n, 2)) and labels == [i // PER_CLASS for i in ids]
        assert sum(sizes) == loader.num_samples and len(sizes) == len(loader)
        shards.append(ids)
    assert sorted(shards[0] + shards[1]) == list(range(n))
    # max_samples and block sharding (evaluate's world-size-independent batches): batch k = block r + kW
    loader = build_loader(cfg, "val", 1, 2, batch_size=BATCH, augment=False, max_samples=17, shard_block=True)
    assert loader.shard_block == BATCH
    batches = [identify_solid(x) for x, _ in loader]
    assert batches == [[4, 5, 6, 7], [12, 13, 14, 15]]


def test_eval_geometry_matches_torchvision(data):
    """Resize(R/ratio) + CenterCrop(R): DALI and FFCV (raw .beton, no re-encoding) stay within sub-pixel
    differences of torchvision; a wrong crop ratio or a flip would be 3-10x further away."""
    out = {}
    for b in BACKENDS:
        loader = build_loader(data_cfg(data, b, "smooth"), "val", 0, 1, batch_size=BATCH, augment=False)
        out[b] = torch.cat([x for x, _ in loader])
    cfg = data_cfg(data, "folder", "smooth", "data.val_crop_ratio=0.6")
    wrong_ratio = torch.cat([x for x, _ in build_loader(cfg, "val", 0, 1, batch_size=BATCH, augment=False)])
    assert (wrong_ratio - out["folder"]).abs().mean() > 0.09
    assert (out["folder"].flip(-1) - out["folder"]).abs().mean() > 0.09
    for b in ("ffcv", "dali"):
        assert (out[b] - out["folder"]).abs().mean() < 0.07, b


def test_folder_skips_and_counts_unreadable_files(data):
    loader = build_loader(data_cfg(data, "folder", "bad"), "val", 0, 1, batch_size=BATCH, augment=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, labels, _ = run_epoch(loader)
    bad_paths = {str(data["bad"] / rel) for rel in BAD}
    assert loader.skipped == bad_paths
    assert len(ids) == 8 - 1  # 8 generated, 1 truncated, the garbage file is extra
    assert sum(any(p in str(w.message) for p in bad_paths) for w in caught) == 2


def test_ffcv_converter_reports_unreadable_files(data):
    from guardx.data.ffcv import read_meta

    meta = read_meta(data["beton"]["bad"])
    assert {s["path"] for s in meta["skipped"]} == {str(data["bad"] / rel) for rel in BAD}
    assert all(s["error"] for s in meta["skipped"]) and meta["num_samples"] == 7
    loader = build_loader(data_cfg(data, "ffcv", "bad"), "val", 0, 1, batch_size=1, augment=False)
    assert loader.skipped == {s["path"] for s in meta["skipped"]}
    held = list(loader)  # 7 batches outlive FFCV's 5 reusable output buffers (batches_ahead + 2): still intact
    labels = torch.cat([y for _, y in held]).tolist()
    ids = [i for x, _ in held for i in identify_solid(x)]
    assert labels == [0, 0, 0, 1, 1, 1, 1] and ids == [0, 1, 3, 4, 5, 6, 7]


def test_dali_names_the_unreadable_file(data):
    loader = build_loader(data_cfg(data, "dali", "bad"), "val", 0, 1, batch_size=BATCH, augment=False)
    with pytest.raises(DataError, match="guardx data check") as err:
        run_epoch(loader)
    assert any(str(data["bad"] / rel) in str(err.value) for rel in BAD)
    assert "\n" not in str(err.value)


def test_ffcv_quasi_random_order(data):
    cfg = data_cfg(data, "ffcv", "solid", "data.ffcv_order=quasi_random", "data.ffcv_os_cache=false")
    loader = build_loader(cfg, "train", 0, 1, batch_size=BATCH, seed=SEED)
    loader.set_epoch(0)
    ids = run_epoch(loader)[0]
    assert sorted(ids) == list(range(CLASSES * PER_CLASS))
    loader.set_epoch(0, start=10)
    assert run_epoch(loader)[0] == ids[10:]
    with pytest.raises(ConfigError, match="one rank"):
        build_loader(cfg, "train", 0, 2, batch_size=BATCH)


def test_missing_optional_dependency_is_one_line(data, monkeypatch):
    for module, backend, extra in (("ffcv", "ffcv", "guardx[ffcv]"), ("nvidia.dali", "dali", "guardx[dali]")):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
            with pytest.raises(MissingDependencyError, match=extra.replace("[", r"\[").replace("]", r"\]")) as err:
                build_loader(data_cfg(data, backend), "train", 0, 1, batch_size=BATCH)
            assert "\n" not in str(err.value)


def test_ffcv_needs_a_converted_file(data):
    cfg = data_cfg(data, "ffcv", "solid", "data.ffcv_train=")
    with pytest.raises(ConfigError, match="guardx data convert"):
        build_loader(cfg, "train", 0, 1, batch_size=BATCH)
    cfg = data_cfg(data, "ffcv", "solid", f"data.ffcv_train={data['root'] / 'missing.beton'}")
    with pytest.raises(DataError, match="not found"):
        build_loader(cfg, "train", 0, 1, batch_size=BATCH)


def test_data_cli_convert_and_check(data, capsys):
    from guardx.cli import main
    from guardx.data.ffcv import read_meta

    out = data["root"] / "cli" / "bad.beton"
    assert main(["data", "convert", str(data["bad"]), str(out), "--max-side", "32", "--workers", "1"]) == 0
    assert read_meta(out)["num_samples"] == 7 and read_meta(out)["settings"]["max_resolution"] == 32
    assert "2 unreadable skipped" in capsys.readouterr().out
    assert main(["data", "check", str(data["bad"]), "--workers", "1"]) == 1
    listed = capsys.readouterr().out
    assert all(str(data["bad"] / rel) in listed for rel in BAD)
    assert main(["data", "check", str(data["solid"]), "--workers", "1"]) == 0


def test_gpu_paths_are_wired(data):
    """No GPU here: check the GPU branches' logic (decode placement, the op lists, the DALI graph)."""
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

    from guardx.data.dali import DALILoader, decode_mode
    from guardx.data.ffcv import _image_pipeline

    cuda, cpu = torch.device("cuda", 1), torch.device("cpu")
    assert decode_mode("auto", cuda) == "mixed" and decode_mode("cpu", cuda) == "cpu"
    assert decode_mode("auto", cpu) == "cpu" and decode_mode("auto", None) == "cpu"
    with pytest.raises(ConfigError, match="dali_decode=cpu"):
        decode_mode("mixed", cpu)
    cfg = data_cfg(data, "ffcv")
    on_gpu = [type(op) for op in _image_pipeline(cfg, True, cuda)]
    assert on_gpu[-3:] == [ToTensor, ToDevice, ToTorchImage]  # uint8 crosses to the GPU, converted there
    assert ToDevice not in [type(op) for op in _image_pipeline(cfg, False, cpu)]
    # the mixed (nvJPEG) pipeline is defined with valid operator arguments (building it needs a GPU): the image
    # path is reader -> decoder on "mixed" -> resize and crop/normalise on the GPU; the flip only in training
    loader = DALILoader(str(data["solid"]), data_cfg(data, "dali"), train=True, augment=True, rank=0, world_size=1,
                        batch_size=BATCH, seed=0, device=cpu)
    loader.decode, loader.device_id = "mixed", 0
    for augment, decoder in ((True, "ImageRandomCrop"), (False, "Image")):
        loader.augment = augment
        pipe = loader._pipeline(*loader.epoch_file_list()[:2])
        images, labels = pipe._graph_out
        assert (images.device, labels.device) == ("gpu", "cpu")
        path, op = [], images.source
        while op is not None:  # follow the image through its first inputs back to the reader
            path.append((type(op._op).__name__, op._op.device))
            op = op._inputs[0].source if op._inputs else None
        assert path == [("CropMirrorNormalize", "gpu"), ("Resize", "gpu"), (decoder, "mixed"), ("File", "cpu")]
        mirror = [i.source for i in images.source._inputs[1:]]
        assert [type(m._op).__name__ for m in mirror] == (["CoinFlip"] if augment else [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ("ffcv", "dali"))
def test_gpu_batches_arrive_on_the_device(data, backend):
    device = torch.device("cuda", 0)
    loader = build_loader(data_cfg(data, backend), "train", 0, 1, batch_size=BATCH, seed=SEED, device=device)
    ids, labels, sizes = [], [], []
    for x, y in loader:
        assert x.device == device and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
        ids += identify_solid(x.cpu())
        labels += y.tolist()
    assert ids == loader.sampler.indices().tolist() and labels == [i // PER_CLASS for i in ids]
