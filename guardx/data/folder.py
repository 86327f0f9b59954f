"""Map-style datasets for the torch loader: ImageFolder trees (PIL decode) and in-memory tensors.

A file that fails to decode is not fatal; the loader counts it and warns once per file with its path.
For evaluation the dataset returns ``(None, path)`` and the collate function drops it. For training
(``replace_unreadable``) it returns the next readable file in folder order instead (usually the same
class), so every batch keeps its size and every rank takes the same number of steps: a rank whose batch
shrank to nothing would otherwise skip a step and leave its peers waiting in the gradient all-reduce.
The replacement is a function of the index only, so a resumed or re-sharded run sees the same samples.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError

from guardx.errors import DataError
from guardx.utils.misc import derive_seed

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def scan_image_folder(root: str | Path, classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """``[(path, label)]`` and the sorted class names of an ImageFolder tree, with one-line errors."""
    root = Path(root)
    if not str(root) or not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    found = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not found:
        raise DataError(f"no class sub-folders in {root} (expected ImageFolder layout root/<class>/<image>)")
    classes = classes or found
    missing = sorted(set(classes) - set(found))
    if missing:
        raise DataError(f"{root} lacks class folders {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    samples = []
    for label, name in enumerate(classes):
        files = sorted(e.path for e in os.scandir(root / name)
                       if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        if not files:
            raise DataError(f"class folder has no images: {root / name}")
        samples += [(f, label) for f in files]
    return samples, classes


def probe_image(path: str) -> tuple[int, int] | str:
    """``(width, height)`` of a decodable image, else the decode error as one line of text.

    JPEGs are decoded at 1/8 scale (libjpeg DCT scaling via ``draft``): that still reads every byte
    of the entropy-coded data, so truncated or corrupt files fail, at a fraction of a full decode.
    """
    try:
        with Image.open(path) as im:
            size = im.size
            im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
        return size
    except _DECODE_ERRORS as e:
        return f"{type(e).__name__}: {e}"


def probe_images(paths: list[str], *, workers: int = 1, show_progress: bool = True,
                 desc: str = "checking images") -> list[tuple[int, int] | str]:
    """:func:`probe_image` over ``paths`` in ``workers`` processes, in order, with a progress bar."""
    from guardx.utils.misc import progress

    if workers <= 1 or len(paths) < 256:
        return [probe_image(p) for p in progress(paths, enabled=show_progress, desc=desc, unit="img")]
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as pool:
        it = pool.imap(probe_image, paths, chunksize=64)
        return list(progress(it, enabled=show_progress, total=len(paths), desc=desc, unit="img"))


class SeededAugmentation:
    """Random augmentation that is a function of (seed, epoch, sample index) only.

    Each item gets its own ``torch.Generator`` seeded from those three numbers and the transform draws
    from it, so crops do not depend on worker count, prefetching, world size or where a resumed run
    restarted. (A private generator, not ``torch.manual_seed``: that one also queues CUDA seeding and
    costs ~0.3 ms per call on a CUDA build.)
    """

    seed: int | None = None  # None: eval (no randomness) or unseeded
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def item_generator(self, i: int) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(derive_seed("augment", self.seed, self.epoch, i))


class ImageFolderDataset(SeededAugmentation, torch.utils.data.Dataset):
    """``transform(pil_image, generator) -> float tensor`` (see ``guardx.data.transforms``)."""

    def __init__(self, root: str | Path, transform: Callable, classes: list[str] | None = None,
                 samples: list[tuple[str, int]] | None = None):
        """``samples`` (with ``classes``): an already resolved split (see ``guardx.data.splits``),
        e.g. a flat validation folder; otherwise ``root`` is scanned as an ImageFolder."""
        self.root = Path(root)
        if samples is not None:
            self.samples, self.classes = list(samples), list(classes or [])
        else:
            self.samples, self.classes = scan_image_folder(root, classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    replace_unreadable = False  # training: substitute the next readable file (see the module docstring)
    MAX_REPLACEMENT_TRIES = 64

    def _open(self, path: str):
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except _DECODE_ERRORS:
            return None

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = self._open(path)
        if img is not None:
            return self.transform(img, self.item_generator(i)), label
        if not self.replace_unreadable:
            return None, path
        bad = [path]
        for k in range(1, min(len(self.samples), self.MAX_REPLACEMENT_TRIES + 1)):
            other, other_label = self.samples[(i + k) % len(self.samples)]
            img = self._open(other)
            if img is not None:
                return self.transform(img, self.item_generator(i)), other_label, bad
            bad.append(other)
        return None, path, bad


class TensorDataset(SeededAugmentation, torch.utils.data.Dataset):
    """Images held in memory as uint8 (N, 3, H, W); ``transform(x, generator)`` maps a float (3, H, W)
    image in [0, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], transform: Callable | None = None):
        self.images, self.labels, self.classes, self.transform = images, labels, classes, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i].float().div_(255)
        if self.transform is not None:
            x = self.transform(x, self.item_generator(i))
        return x, int(self.labels[i])


def collate_skip(batch):
    """Stack good samples; return the paths of the files that failed to decode as a third element (items
    are ``(x, y)``, ``(None, path)`` or, when a replacement was read, ``(x, y, [unreadable paths])``)."""
    good = [(item[0], item[1]) for item in batch if item[0] is not None]
    bad = [p for item in batch for p in (item[2] if len(item) > 2 else [item[1]] if item[0] is None else [])]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    xs, ys = zip(*good)
    targets = torch.stack(ys) if isinstance(ys[0], torch.Tensor) else torch.tensor(ys, dtype=torch.long)
    return torch.stack(xs), targets, bad
