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
    (GPU only) → ``ToTorchImage``; eval: a ``CenterCropRGBImageDecoder`` with torchvision's
    Resize(R/ratio) + CenterCrop(R) geometry (:func:`torchvision_center_crop`). A val .beton written with
    ``eval_resize`` (``guardx data convert`` does it for the val split) already holds the Resize output, so
    eval only crops and matches the folder backend exactly (raw) or to the JPEG re-encoding (jpg).
    The last step, uint8 → float in [0, 1], runs on the target device (normalisation itself lives in
    the model wrapper). Decoding runs in ``data.workers`` numba threads of this process: no worker
    processes, no IPC. (FFCV also sets torch's intra-op thread count to ``data.workers``, process-wide.)

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
import warnings
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

    def __init__(self, paths: list[str], labels: list[int], max_resolution: int, errors_path: str,
                 eval_resize: int = 0):
        self.paths, self.labels = paths, labels
        self.max_resolution, self.errors_path, self.eval_resize = max_resolution, errors_path, eval_resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                if self.eval_resize:  # exactly the folder backend's eval resize (PIL, full decode)
                    arr = np.asarray(eval_resize_pil(im.convert("RGB"), self.eval_resize))
                    return arr, self.labels[i]
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


def eval_resize_pil(img, size: int):
    """torchvision's ``Resize(size)`` on a PIL image (short side → size, bilinear, antialiased): the first
    half of the folder backend's eval transform."""
    from torchvision.transforms import functional as TF

    return TF.resize(img, size)


def eval_resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after ``Resize(size)``: the long side is ``floor(size * long / short)``."""
    short = min(width, height)
    return (size * width) // short, (size * height) // short


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
                         show_progress: bool = True, split=None, eval_resize: int = 0) -> dict:
    """ImageFolder ``src`` → FFCV ``dst`` (.beton) + ``dst.json``; returns the sidecar (also the report).

    ``split``: a resolved :class:`guardx.data.splits.Split` to convert instead of scanning ``src`` (a flat
    validation folder, or val labelled by the train classes). ``eval_resize`` = S > 0 (validation splits):
    store each image as torchvision's ``Resize(S)`` makes it (short side S, PIL) instead of capping the long
    side at ``max_resolution``; the eval loader then only crops, so with ``write_mode=raw`` its tensors are
    the folder backend's exactly (``jpg`` adds only the re-encoding error).
    """
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
    if eval_resize < 0:
        raise ConfigError(f"eval_resize must be >= 0, got {eval_resize}")
    if split is None:
        samples, classes = scan_image_folder(src)
        layout = {"layout": "imagefolder"}
    else:
        samples, classes = split.samples, split.classes
        layout = {"layout": split.layout, **({"labels_file": split.labels_file} if split.labels_file else {})}
    paths = [p for p, _ in samples]
    probes = probe_images(paths, workers=workers, show_progress=show_progress, desc=f"checking {src}")
    good = [i for i, r in enumerate(probes) if not isinstance(r, str)]
    skipped = [{"path": paths[i], "error": r} for i, r in enumerate(probes) if isinstance(r, str)]
    for s in skipped:
        print(f"guardx: skipping unreadable image {s['path']} ({s['error']})", file=sys.stderr)
    if not good:
        raise DataError(f"no readable image in {src} ({len(skipped)} unreadable)")
    counts, listed = [0] * len(classes), [0] * len(classes)
    for _, c in samples:
        listed[c] += 1
    for i in good:
        counts[samples[i][1]] += 1
    lost = [c for c in range(len(classes)) if listed[c] and not counts[c]]
    if lost:  # a class whose every file is unreadable would train (or be evaluated) as an empty class
        raise DataError(f"class {classes[lost[0]]!r} has no readable image: all its {listed[lost[0]]} files in {src} "
                        f"failed to decode (listed above); fix or remove the class, then convert again")
    meta = {
        "format": META_FORMAT, "source": str(Path(src).resolve()), "classes": classes, "num_samples": len(good),
        "class_counts": counts, "skipped": skipped,
        "settings": {"max_resolution": 0 if eval_resize else max_resolution, "jpeg_quality": jpeg_quality,
                     "write_mode": write_mode, "compress_probability": compress_probability,
                     "eval_resize": eval_resize},
        **layout,
    }
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        errors_path = f"{tmp}.errors"
        try:
            cap = 0 if eval_resize else max_resolution
            field = RGBImageField(write_mode=write_mode, max_resolution=cap or None,
                                  jpeg_quality=jpeg_quality, compress_probability=compress_probability)
            stored = [eval_resized_size(*probes[i], eval_resize) if eval_resize else probes[i] for i in good]
            writer = DatasetWriter(str(tmp), {"image": field, "label": IntField()},
                                   page_size=_page_size(stored, cap), num_workers=workers)
            source = _ConvertSource(paths, [label for _, label in samples], cap, errors_path, eval_resize)
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


def torchvision_center_crop(height, width, resize, crop):
    """FFCV crop generator (``(top, left, h, w)`` in the stored image) for torchvision's Resize(resize) +
    CenterCrop(crop): the resized size is ``floor(resize * side / short)``, the crop offset
    ``round((resized - crop) / 2)`` with halves to even; the window is that crop mapped back to stored pixels,
    rounded to whole pixels (FFCV crops whole pixels, then resizes with OpenCV's INTER_AREA). On an image
    stored by ``convert_image_folder(eval_resize=resize)`` the window is exactly crop x crop at
    torchvision's offset, so nothing is resampled. (FFCV's own CenterCropRGBImageDecoder crops
    ``int(ratio * short)`` at ``(side - c) // 2``: up to a pixel off.) Compiled by numba inside FFCV."""
    h, w, s, c = np.int64(height), np.int64(width), np.int64(resize), np.int64(crop)
    short = min(h, w)
    out_h, out_w = (s * h) // short, (s * w) // short
    extra_h, extra_w = out_h - c, out_w - c
    top = extra_h // 2 + (extra_h % 2) * ((extra_h // 2) % 2)
    left = extra_w // 2 + (extra_w % 2) * ((extra_w // 2) % 2)
    y0 = np.int64(np.round(top * h / out_h))
    x0 = np.int64(np.round(left * w / out_w))
    win_h = min(np.int64(np.round(c * h / out_h)), h - y0)
    win_w = min(np.int64(np.round(c * w / out_w)), w - x0)
    return y0, x0, max(win_h, np.int64(1)), max(win_w, np.int64(1))


@lru_cache(maxsize=1)
def _eval_decoder_class():
    from ffcv.fields.decoders import CenterCropRGBImageDecoder

    class TorchvisionCenterCrop(CenterCropRGBImageDecoder):
        """CenterCropRGBImageDecoder with torchvision's eval geometry (:func:`torchvision_center_crop`)."""

        def __init__(self, crop: int, resize: int):
            super().__init__((crop, crop), ratio=crop / resize)
            self.scale, self.ratio = resize, crop  # the two arguments FFCV passes to the crop generator

        @property
        def get_crop_generator(self):
            return torchvision_center_crop

    return TorchvisionCenterCrop


def _image_pipeline(cfg, augment: bool, device: torch.device | None) -> list:
    from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

    size = (cfg.resolution, cfg.resolution)
    if augment:
        ops = [RandomResizedCropRGBImageDecoder(size, scale=tuple(cfg.rrc_scale), ratio=RATIO)]
        if cfg.flip:
            ops.append(RandomHorizontalFlip())
    else:
        ops = [_eval_decoder_class()(cfg.resolution, eval_resize_size(cfg))]
    ops.append(ToTensor())
    if device is not None and device.type == "cuda":  # uint8 crosses PCIe; on CPU this would be a copy for nothing
        ops.append(ToDevice(device, non_blocking=True))
    ops.append(ToTorchImage())  # (B, 3, H, W) channels_last view: no copy
    return ops


def eval_resize_size(cfg) -> int:
    """S of the eval transform Resize(S) + CenterCrop(R): R / val_crop_ratio (256 for 224 px)."""
    return int(round(cfg.resolution / cfg.val_crop_ratio))


class FFCVLoader(ShardedLoaderBase):
    def __init__(self, beton: str | Path, cfg, *, train: bool, augment: bool, rank: int, world_size: int,
                 batch_size: int, seed: int, device: torch.device | None, max_samples: int = 0,
                 shard_block: int = 0, classes: list[str] | None = None):
        import_ffcv()
        from ffcv.fields.decoders import IntDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import ToTensor

        meta = read_meta(beton)
        if classes is not None and list(meta["classes"]) != list(classes):
            raise DataError(f"{beton} was converted with {len(meta['classes'])} classes in another order than the "
                            f"{len(classes)} expected (the train split's or the model's): convert it again with "
                            "data.train_dir set (guardx data convert --config ...)")
        stored = meta["settings"].get("eval_resize", 0)
        if not augment and stored and stored != eval_resize_size(cfg):
            warnings.warn(f"{beton} stores images resized for eval at {stored} px (short side), this eval needs "
                          f"{eval_resize_size(cfg)} (data.resolution / data.val_crop_ratio): resampling them again, "
                          "which differs from the folder backend; convert with --eval-resize "
                          f"{eval_resize_size(cfg)} to match", stacklevel=3)
        if train and 0 in meta.get("class_counts", []):  # a converter that did not refuse empty classes
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
                      shard_block: bool = False, classes: list[str] | None = None) -> FFCVLoader:
    train = split == "train"
    key = "ffcv_train" if train else "ffcv_val"
    beton = getattr(cfg, key)
    if not beton:
        src = cfg.train_dir if train else cfg.val_dir
        raise ConfigError(f"data.{key} is empty: convert the ImageFolder once with "
                          f"`guardx data convert {src or 'IMAGEFOLDER'} OUT.beton`, then set data.{key}=OUT.beton")
    return FFCVLoader(beton, cfg, train=train, augment=train if augment is None else augment, rank=rank,
                      world_size=world_size, batch_size=batch_size, seed=seed, device=device,
                      max_samples=max_samples, shard_block=batch_size if shard_block and not train else 0,
                      classes=_expected_classes(cfg, train, classes))


def _expected_classes(cfg, train: bool, classes: list[str] | None) -> list[str] | None:
    """The class order a val .beton must have: the caller's, else the train split's when the config names it."""
    if train:
        return None
    if classes:
        return list(classes)
    from guardx.data.splits import train_classes

    return train_classes(cfg)
