"""Datasets and loaders behind one interface.

``build_loader(data_cfg, split, rank, world_size, batch_size=..., seed=...)`` returns an iterable of
``(images, labels)`` with images float in [0, 1], shape (B, 3, R, R) and labels long, plus:

* ``set_epoch(epoch, start=0)``: reseed the order; ``start`` = global samples already consumed,
* ``len(loader)``: batches this rank yields in an epoch, ``num_samples``: samples it sees,
* ``classes`` / ``num_classes``, ``class_names`` and ``skipped`` (files that failed to decode so far).

Backends: ``digits`` (embedded, in memory), ``folder`` (torchvision-style ImageFolder, PIL decode),
``ffcv`` and ``dali`` (see their modules). Which files a split holds, and their labels, comes from
``guardx.data.splits`` for all three (ImageFolder trees, or a flat val folder with a labels file).
Train splits get random-resized-crop + flip; eval splits resize + center-crop with torchvision's
geometry on every backend. Normalisation is not done here: it sits inside the model wrapper.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from guardx.data.digits import DIGITS_CLASSES, digits_tensors
from guardx.data.folder import ImageFolderDataset, TensorDataset, collate_skip, scan_image_folder
from guardx.data.sampler import ShardedSampler
from guardx.data.splits import class_display_names, resolve_split, split_root
from guardx.data.transforms import resized_crop, sample_rrc
from guardx.errors import ConfigError, DataError
from guardx.utils.misc import derive_seed

__all__ = ["build_loader", "build_dataset", "TorchLoader", "ShardedSampler", "scan_image_folder"]


def _split_dir(cfg, split: str) -> str:
    return split_root(cfg, split)


class _TensorTrainAug:
    """RRC + flip on a float (3, H, W) tensor, for in-memory datasets (digits)."""

    def __init__(self, size: int, scale, flip: bool):
        self.size, self.scale, self.flip = size, scale, flip

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        top, left, h, w = sample_rrc(x.shape[-2], x.shape[-1], self.scale, generator)
        x = resized_crop(x, top, left, h, w, self.size)
        return x.flip(-1) if self.flip and torch.rand(1, generator=generator) < 0.5 else x


class _TensorResize:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x if x.shape[-1] == self.size else resized_crop(x, 0, 0, x.shape[-2], x.shape[-1], self.size)


class _PILTrainAug:
    """torchvision's RandomResizedCrop + flip + ToTensor, with the randomness from ``generator``."""

    def __init__(self, size: int, scale, flip: bool):
        self.size, self.scale, self.flip = size, scale, flip

    def __call__(self, img, generator: torch.Generator | None = None) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        top, left, h, w = sample_rrc(img.height, img.width, self.scale, generator)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        if self.flip and torch.rand(1, generator=generator) < 0.5:
            img = TF.hflip(img)
        return TF.to_tensor(img)


class _PILEval:
    """Resize(R / val_crop_ratio) + CenterCrop(R) + ToTensor."""

    def __init__(self, size: int, ratio: float):
        from torchvision import transforms as T

        self.ops = T.Compose([T.Resize(int(round(size / ratio))), T.CenterCrop(size), T.ToTensor()])

    def __call__(self, img, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.ops(img)


def holdout_mask(labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """True for the held-out items: ``round(fraction · n_c)`` of each class, chosen by a fixed permutation
    (the same split in every run, whatever the seed)."""
    mask = torch.zeros(len(labels), dtype=torch.bool)
    if fraction <= 0:
        return mask
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(derive_seed("holdout", c)))
        mask[idx[perm[:round(fraction * len(idx))]]] = True
    return mask


def build_dataset(cfg, split: str, augment: bool | None = None, classes: list[str] | None = None):
    """The map-style dataset of ``split`` for the digits/folder backends (items: float image, label).
    ``split="holdout"`` is ``data.holdout`` of the training split (eval transforms), which ``"train"`` then lacks.
    ``classes``: the class order val labels refer to (default: the train split's; see ``guardx.data.splits``)."""
    augment = (split == "train") if augment is None else augment
    source = "train" if split == "holdout" else split
    if split == "holdout" and cfg.holdout <= 0:
        raise ConfigError("evaluate.split=holdout needs data.holdout > 0 (e.g. data.holdout=0.2)")
    if cfg.dataset == "digits":
        images, labels = digits_tensors(source)
        tf = _TensorTrainAug(cfg.resolution, cfg.rrc_scale, cfg.flip) if augment else _TensorResize(cfg.resolution)
        if source == "train" and cfg.holdout > 0:
            keep = holdout_mask(labels, cfg.holdout) == (split == "holdout")
            images, labels = images[keep], labels[keep]
        return TensorDataset(images, labels, DIGITS_CLASSES, tf)
    tf = _PILTrainAug(cfg.resolution, cfg.rrc_scale, cfg.flip) if augment else _PILEval(cfg.resolution, cfg.val_crop_ratio)
    found = resolve_split(cfg, source, classes)
    dataset = ImageFolderDataset(found.root, tf, classes=found.classes, samples=found.samples)
    if source == "train" and cfg.holdout > 0:
        keep = holdout_mask(torch.tensor([y for _, y in dataset.samples]), cfg.holdout) == (split == "holdout")
        dataset.samples = [s for s, k in zip(dataset.samples, keep.tolist()) if k]
    return dataset


class TorchLoader:
    """digits/folder backend: a map-style dataset + :class:`ShardedSampler` + ``DataLoader``.

    ``train``: shuffled and padded so all ranks take the same number of steps; otherwise disjoint,
    in-order shards that cover the (first ``limit``) samples exactly once. A dataset with a
    ``set_epoch`` method is told the epoch too (its workers are then rebuilt each epoch).
    """

    def __init__(self, dataset, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 train: bool = True, shuffle: bool | None = None, workers: int = 0, pin_memory: bool = False,
                 limit: int = 0, shard_block: int = 0):
        self.dataset = dataset
        self.classes = list(dataset.classes)
        self.num_classes = len(self.classes)
        self.batch_size = batch_size
        n = min(len(dataset), limit) if limit else len(dataset)
        if train and hasattr(dataset, "item_generator"):
            dataset.seed = seed  # augmentation = f(seed, epoch, index): see SeededAugmentation
        if train and hasattr(dataset, "replace_unreadable"):
            dataset.replace_unreadable = True  # equal batches on every rank (see guardx.data.folder)
        self.train = train
        self.sampler = ShardedSampler(n, rank=rank, world_size=world_size, seed=seed,
                                      shuffle=train if shuffle is None else shuffle, pad=train,
                                      block=max(shard_block, 1))
        # shard_block = B >= 1 (eval): with batch_size == B, the k-th batch of rank r is global block r + k*W
        self.shard_block = shard_block
        per_epoch_state = hasattr(dataset, "set_epoch")
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=collate_skip, pin_memory=pin_memory,
            persistent_workers=workers > 0 and not per_epoch_state, drop_last=False)
        self.skipped: set[str] = set()

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        for x, y, bad in self.loader:
            fresh = [p for p in bad if p not in self.skipped]
            for path in fresh:
                self.skipped.add(path)
                what = "training reads the next readable file instead" if self.train else "left out"
                warnings.warn(f"unreadable image {path} ({len(self.skipped)} so far): {what}", stacklevel=2)
            if fresh and self.train and self.sampler.world_size == 1:
                self.check_classes()  # one process has seen all of a class fail (ranks pool theirs at epoch ends)
            if len(y) or self.shard_block:  # block mode keeps empty batches so batch k stays block k
                yield x, y

    def check_classes(self) -> None:
        """DataError naming the first class whose every file is in ``skipped`` (a model would train with
        that class empty). The training loop calls it after each epoch with the ranks' skipped files pooled."""
        samples = getattr(self.dataset, "samples", None)
        if not self.skipped or samples is None:
            return
        total: dict[int, int] = {}
        bad: dict[int, int] = {}
        for path, label in samples:
            total[label] = total.get(label, 0) + 1
            if path in self.skipped:
                bad[label] = bad.get(label, 0) + 1
        for label, n in sorted(bad.items()):
            if n == total[label]:
                root = getattr(self.dataset, "root", "")
                raise DataError(f"class {self.classes[label]!r} has no readable image: all {n} files in "
                                f"{Path(root) / self.classes[label]} failed to decode (list them with "
                                f"`guardx data check {root}`; fix or remove the class)")


def build_loader(cfg, split: str, rank: int = 0, world_size: int = 1, *, batch_size: int, seed: int = 0,
                 augment: bool | None = None, device: torch.device | None = None, max_samples: int = 0,
                 shard_block: bool = False, classes: list[str] | None = None):
    """One builder for every backend (see the module docstring). ``batch_size`` is per rank;
    ``max_samples`` limits an eval split to its first N samples (the same N whatever the world size).
    ``shard_block`` (eval splits, every backend): rank r gets the consecutive blocks of
    ``batch_size`` samples r, r+W, ... and ``loader.shard_block == batch_size``, so every batch is a fixed
    global block (evaluate uses it to make results independent of the world size); otherwise
    ``loader.shard_block == 0``. ``classes`` (val splits): the class order the labels must follow, e.g. a
    model's; default the train split's (``guardx.data.splits``). ``loader.class_names`` holds display
    names (``data.class_names``, else the class ids)."""
    train = split == "train"
    augment = train if augment is None else augment
    if cfg.dataset == "digits" or cfg.backend == "folder":
        workers = 0 if cfg.dataset == "digits" else cfg.workers  # digits live in memory: workers only add IPC
        pin = device is not None and device.type == "cuda"
        loader = TorchLoader(build_dataset(cfg, split, augment, classes), batch_size=batch_size, rank=rank,
                             world_size=world_size, seed=seed, train=train, workers=workers, pin_memory=pin,
                             limit=0 if train else max_samples,
                             shard_block=batch_size if shard_block and not train else 0)
    elif cfg.backend == "ffcv":
        from guardx.data.ffcv import build_ffcv_loader

        loader = build_ffcv_loader(cfg, split, rank, world_size, batch_size=batch_size, seed=seed, augment=augment,
                                   device=device, max_samples=max_samples, shard_block=shard_block, classes=classes)
    elif cfg.backend == "dali":
        from guardx.data.dali import build_dali_loader

        loader = build_dali_loader(cfg, split, rank, world_size, batch_size=batch_size, seed=seed, augment=augment,
                                   device=device, max_samples=max_samples, shard_block=shard_block, classes=classes)
    else:
        raise ConfigError(f"data.backend={cfg.backend!r} is not one of folder, ffcv, dali")
    loader.class_names = class_display_names(cfg, loader.classes) if cfg.dataset != "digits" else list(loader.classes)
    return loader
