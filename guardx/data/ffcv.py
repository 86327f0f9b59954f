"""FFCV backend: ``guardx data convert`` (ImageFolder → ``.beton``) and a loader behind the common interface.

Conversion (:func:`convert_image_folder`)
    1. scan the ImageFolder (labels = sorted class folder names, as everywhere in guardx);
    2. probe every file in parallel (a 1/8-scale decode that reads all its bytes): unreadable files are
       skipped, listed and summarised, never fatal;
    3. FFCV's multi-process writer stores each image resized to ``max_resolution`` on its longest side,
       as JPEG (``jpg``), raw pixels (``raw``), or a random mix (``proportion``), with a progress bar;
    4. the class names, settings and skipped files go to a sidecar ``<out>.beton.json``; the .beton is
       written under a temporary name and renamed, so a crash never leaves a half-written file.

Loader (:class:`FFCVLoader`)
    train: ``RandomResizedCropRGBImageDecoder`` → ``RandomHorizontalFlip`` → ``ToTensor`` → ``ToDevice``
    (GPU only) → ``ToTorchImage``; eval: ``CenterCropRGBImageDecoder`` (crop ``val_crop_ratio`` of the
    short side = torchvision's Resize(R/ratio) + CenterCrop(R)). The last step, uint8 → float in [0, 1],
    runs on the target device (normalisation itself lives in the model wrapper). Decoding runs in
    ``data.workers`` numba threads of this process: no worker processes, no IPC. (FFCV also sets
    torch's intra-op thread count to ``data.workers``, process-wide.)

    Order: a custom FFCV ``TraversalOrder`` that reads the same :class:`ShardedSampler` as the folder
    backend (``distributed=True`` sharding with DistributedSampler-style wrap padding, seeded by
    (seed, epoch)), so both backends visit the samples in the same order and a resumed epoch restarts
    exactly at ``start``. ``drop_last=False`` keeps the last partial batch. ``data.ffcv_order=quasi_random``
    switches to FFCV's page-aware order for a single rank reading a .beton larger than RAM.

    Batches of FFCV are views into a ring of reusable buffers; the float conversion makes a new tensor,
    so a yielded batch stays valid however long it is kept.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from guardx.data.folder import probe_images, scan_image_folder
from guardx.data.sharded import ShardedLoaderBase, to_unit_float
from guardx.data.transforms import RATIO
from guardx.errors import ConfigError, DataError, MissingDependencyError
from guardx.utils.io import atomic_path, write_json

META_FORMAT = "guardx-ffcv/1"
_COMPILED_PIPELINES: list = []
MIN_PAGE_SIZE = 8 << 20  # FFCV's default page: 4 x 2 MiB


def import_ffcv():
    """Import ffcv with a one-line error naming the fix (the extra, or the system libraries it links to)."""
    try:
        import ffcv  # noqa: F401
        from ffcv import fields, loader, transforms, writer  # noqa: F401
    except ImportError as e:
        if importlib.util.find_spec("ffcv") is None:
            raise MissingDependencyError("ffcv", "ffcv", "data.backend=ffcv") from None
        # the C extension links to OpenCV and libjpeg-turbo from the system
        raise DataError(f"ffcv is installed but cannot load ({e}): run scripts/install_system_deps.sh") from None
    return ffcv


def meta_path(beton: str | Path) -> Path:
    return Path(f"{beton}.json")


def read_meta(beton: str | Path) -> dict:
    """The sidecar of a .beton written by :func:`convert_image_folder`, checked against the file."""
    beton = Path(beton)
    if not beton.is_file():
        raise DataError(f"FFCV file not found: {beton} (create it with `guardx data convert IMAGEFOLDER {beton}`)")
    meta_file = meta_path(beton)
    if not meta_file.is_file():
        raise DataError(f"{meta_file} is missing (class names of {beton}); "
                        f"recreate the file with `guardx data convert IMAGEFOLDER {beton}`")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != META_FORMAT:
        raise DataError(f"{meta_file} is not a guardx FFCV sidecar ({META_FORMAT})")
    return meta


# ---------------------------------------------------------------------------------------------- convert


class _ConvertSource:
    """The indexable dataset FFCV's writer processes read: ``(HxWx3 uint8, label)``.

    A file that fails here although it passed the probe (it changed meanwhile) must not kill the
    writer process (FFCV would then wait forever): it is logged to ``errors_path`` and a placeholder
    is written, and the conversion fails at the end naming the file.
    """

    def __init__(self, paths: list[str], labels: list[int], max_resolution: int, errors_path: str):
        self.paths, self.labels = paths, labels
        self.max_resolution, self.errors_path = max_resolution, errors_path

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                if self.max_resolution:
                    # let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the target size;
                    # FFCV's writer then resizes to the exact size (INTER_AREA)
                    scale = self.max_resolution / max(im.size)
                    if scale < 0.5:
                        im.draft("RGB", (max(1, int(im.size[0] * scale)), max(1, int(im.size[1] * scale))))
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001  (anything: see the class docstring)
            with open(self.errors_path, "a") as f:
                f.write(f"{path}\t{type(e).__name__}: {e}\n")
            arr = np.zeros((8, 8, 3), dtype=np.uint8)
        return arr, self.labels[i]


def _page_size(sizes: list[tuple[int, int]], max_resolution: int) -> int:
    """Smallest power of two ≥ 8 MiB that holds the largest stored image raw (FFCV fails on larger ones)."""
    largest = 0
    for w, h in sizes:
        s = min(1.0, max_resolution / max(w, h)) if max_resolution else 1.0
        largest = max(largest, int(w * s + 1) * int(h * s + 1) * 3)
    page = MIN_PAGE_SIZE
    while page < 2 * largest:
        page *= 2
    return page


def convert_image_folder(src: str | Path, dst: str | Path, *, max_resolution: int = 256, jpeg_quality: int = 90,
                         write_mode: str = "jpg", compress_probability: float = 0.5, workers: int = 0,
                         show_progress: bool = True) -> dict:
    """ImageFolder ``src`` → FFCV ``dst`` (.beton) + ``dst.json``; returns the sidecar (also the report)."""
    if write_mode not in ("jpg", "raw", "proportion"):
        raise ConfigError(f"write_mode={write_mode!r} is not one of jpg, raw, proportion")
    if not 1 <= jpeg_quality <= 100 or not 0 <= compress_probability <= 1 or max_resolution < 0:
        raise ConfigError(f"need 1 <= jpeg_quality <= 100, 0 <= compress_probability <= 1, max_resolution >= 0; got "
                          f"{jpeg_quality}, {compress_probability}, {max_resolution}")
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    t0 = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    samples, classes = scan_image_folder(src)
    paths = [p for p, _ in samples]
    probes = probe_images(paths, workers=workers, show_progress=show_progress, desc=f"checking {src}")
    good = [i for i, r in enumerate(probes) if not isinstance(r, str)]
    skipped = [{"path": paths[i], "error": r} for i, r in enumerate(probes) if isinstance(r, str)]
    for s in skipped:
        print(f"guardx: skipping unreadable image {s['path']} ({s['error']})", file=sys.stderr)
    if not good:
        raise DataError(f"no readable image in {src} ({len(skipped)} unreadable)")
    counts = [0] * len(classes)
    for i in good:
        counts[samples[i][1]] += 1
    if 0 in counts:  # a .beton with a class and no image of it would train a model with that class empty
        empty = classes[counts.index(0)]
        raise DataError(f"class {empty!r} has no readable image: all files in {Path(src) / empty} failed to decode "
                        f"(listed above); fix or remove the class, then convert again")
    meta = {
        "format": META_FORMAT, "source": str(Path(src).resolve()), "classes": classes, "num_samples": len(good),
        "class_counts": counts, "skipped": skipped,
        "settings": {"max_resolution": max_resolution, "jpeg_quality": jpeg_quality, "write_mode": write_mode,
                     "compress_probability": compress_probability},
    }
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        errors_path = f"{tmp}.errors"
        try:
            field = RGBImageField(write_mode=write_mode, max_resolution=max_resolution or None,
                                  jpeg_quality=jpeg_quality, compress_probability=compress_probability)
            writer = DatasetWriter(str(tmp), {"image": field, "label": IntField()},
                                   page_size=_page_size([probes[i] for i in good], max_resolution),
                                   num_workers=workers)
            source = _ConvertSource(paths, [label for _, label in samples], max_resolution, errors_path)
            writer.from_indexed_dataset(source, indices=good, chunksize=max(1, min(100, len(good) // workers)))
            late = Path(errors_path).read_text().splitlines() if Path(errors_path).exists() else []
        finally:
            Path(errors_path).unlink(missing_ok=True)
        if late:
            path, err = late[0].split("\t", 1)
            raise DataError(f"{path} became unreadable during conversion ({err}; {len(late)} such files); "
                            f"nothing was written to {dst}")
        meta["seconds"] = round(time.perf_counter() - t0, 2)
        meta["bytes"] = tmp.stat().st_size
        write_json(meta, meta_path(dst))  # before the rename: a .beton on disk always has its sidecar
    return meta


# ----------------------------------------------------------------------------------------------- loader


@lru_cache(maxsize=1)
def _order_class():
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.traversal_order.quasi_random import QuasiRandom

    class ShardedOrder(TraversalOrder):
        """FFCV traversal order = the owner's ShardedSampler (rank's shard, seeded by (seed, epoch), from
        ``start``), or FFCV's QuasiRandom order for one rank, also cut at ``start``.

        FFCV builds a custom order by calling the instance with the Loader (``order(loader)``)."""

        def __init__(self, owner, quasi_random: bool):
            self.owner, self.quasi_random, self.quasi = owner, quasi_random, None

        def __call__(self, loader):
            TraversalOrder.__init__(self, loader)
            if self.quasi_random:
                self.quasi = QuasiRandom(loader)
                self.pages = self.quasi.page_to_samples_array.copy()
            return self

        def sample_order(self, epoch: int):
            sampler = self.owner.sampler
            if self.quasi is None:
                return sampler.indices().numpy()
            # QuasiRandom shuffles its page table in place: start from the same table every time so the
            # order is a function of (seed, epoch) only, and a resumed epoch repeats it
            self.quasi.page_to_samples_array = self.pages.copy()
            return self.quasi.sample_order(sampler.epoch)[sampler.start:]

    return ShardedOrder


def _image_pipeline(cfg, augment: bool, device: torch.device | None) -> list:
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

    size = (cfg.resolution, cfg.resolution)
    if augment:
        ops = [RandomResizedCropRGBImageDecoder(size, scale=tuple(cfg.rrc_scale), ratio=RATIO)]
        if cfg.flip:
            ops.append(RandomHorizontalFlip())
    else:
        ops = [CenterCropRGBImageDecoder(size, ratio=cfg.val_crop_ratio)]
    ops.append(ToTensor())
    if device is not None and device.type == "cuda":  # uint8 crosses PCIe; on CPU this would be a copy for nothing
        ops.append(ToDevice(device, non_blocking=True))
    ops.append(ToTorchImage())  # (B, 3, H, W) channels_last view: no copy
    return ops


class FFCVLoader(ShardedLoaderBase):
    def __init__(self, beton: str | Path, cfg, *, train: bool, augment: bool, rank: int, world_size: int,
                 batch_size: int, seed: int, device: torch.device | None, max_samples: int = 0,
                 shard_block: int = 0):
        import_ffcv()
        from ffcv.fields.decoders import IntDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import ToTensor

        meta = read_meta(beton)
        if 0 in meta.get("class_counts", []):  # written by a converter that did not refuse empty classes
            empty = meta["classes"][meta["class_counts"].index(0)]
            raise DataError(f"class {empty!r} has no image in {beton} (all its files were unreadable at conversion); "
                            "fix or remove the class, then convert again")
        n = meta["num_samples"] if train or not max_samples else min(meta["num_samples"], max_samples)
        super().__init__(n, meta["classes"], batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                         train=train, shard_block=shard_block)
        self.skipped = {s["path"] for s in meta["skipped"]}  # left out at conversion time
        quasi = cfg.ffcv_order == "quasi_random" and train
        if quasi and world_size > 1:
            raise ConfigError("data.ffcv_order=quasi_random works on one rank only (FFCV has no distributed "
                              "quasi-random order); use data.ffcv_order=sharded")
        self.loader = Loader(
            str(beton), batch_size=batch_size, num_workers=max(1, cfg.workers), os_cache=cfg.ffcv_os_cache,
            order=_order_class()(self, quasi), distributed=world_size > 1, seed=seed, indices=np.arange(n),
            pipelines={"image": _image_pipeline(cfg, augment, device), "label": [IntDecoder(), ToTensor()]},
            drop_last=False, batches_ahead=cfg.ffcv_batches_ahead)
        # numba's finalizers for FFCV's compiled pipelines raise (and print a traceback) when collected
        # before interpreter shutdown; the code is small, so keep it until exit, when they stay quiet
        _COMPILED_PIPELINES.append(self.loader.code)
        if self.loader.reader.num_samples != meta["num_samples"]:
            raise DataError(f"{beton} holds {self.loader.reader.num_samples} images but {meta_path(beton)} says "
                            f"{meta['num_samples']}: the two come from different conversions; convert again")

    def __iter__(self):
        if len(self.sampler) == 0:
            return
        self.loader.next_epoch = self.epoch
        batches = iter(self.loader)
        try:
            for x, y in batches:
                # copies: FFCV reuses its output buffers a few batches later
                yield to_unit_float(x), y.view(-1).to(torch.long, copy=True)
        finally:
            batches.close()  # stop FFCV's prefetch thread when the consumer leaves early


def build_ffcv_loader(cfg, split: str, rank: int = 0, world_size: int = 1, *, batch_size: int, seed: int = 0,
                      augment: bool | None = None, device: torch.device | None = None, max_samples: int = 0,
                      shard_block: bool = False) -> FFCVLoader:
    train = split == "train"
    key = "ffcv_train" if train else "ffcv_val"
    beton = getattr(cfg, key)
    if not beton:
        src = cfg.train_dir if train else cfg.val_dir
        raise ConfigError(f"data.{key} is empty: convert the ImageFolder once with "
                          f"`guardx data convert {src or 'IMAGEFOLDER'} OUT.beton`, then set data.{key}=OUT.beton")
    return FFCVLoader(beton, cfg, train=train, augment=train if augment is None else augment, rank=rank,
                      world_size=world_size, batch_size=batch_size, seed=seed, device=device,
                      max_samples=max_samples, shard_block=batch_size if shard_block and not train else 0)
