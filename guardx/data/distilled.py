"""Distilled sets: how every distiller writes one, how train reads one, and the per-epoch crop plans
relabel stores.

A distilled set is ``images/<class>/<class>_<k:04d>.png`` (8-bit RGB, each written atomically) plus a
``manifest.json`` written last (:func:`distilled_manifest`: distiller, how the labels are used, classes,
resolution, normaliser, ipc).

An epoch plan is a pure function of (seed, epoch): the order of the images and one random-resized
crop + flip per position. Relabel stores the plan with the teacher's soft labels; train replays the
very same crops. Labels map through the *teacher's* class names, so a subset of classes keeps the
teacher's class indices.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from guardx.data.folder import SeededAugmentation, scan_image_folder
from guardx.data.sampler import epoch_permutation
from guardx.data.transforms import apply_crop_params, resized_crop, sample_crop_params, sample_rrc
from guardx.errors import DataError
from guardx.utils.io import atomic_path
from guardx.utils.misc import derive_seed


def image_path(root: Path, class_name: str, index: int) -> Path:
    """Where image ``index`` of class ``class_name`` of a distilled set lives."""
    return Path(root) / class_name / f"{class_name}_{index:04d}.png"


def save_png(img: torch.Tensor, path: Path) -> None:
    """float (3, H, W) in [0, 1] → 8-bit PNG, written atomically."""
    arr = (img.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def distilled_manifest(distiller: str, labels: str, meta: dict, *, ipc: int, images: int, **extra) -> dict:
    """The fields every distilled set's ``manifest.json`` carries; ``meta`` gives classes, resolution and the
    normaliser (a teacher's model metadata, or the same keys built from the config)."""
    return {"distiller": distiller, "labels": labels, "classes": list(meta["classes"]),
            "num_classes": int(meta["num_classes"]), "resolution": int(meta["resolution"]),
            "mean": list(meta["mean"]), "std": list(meta["std"]), "ipc": int(ipc), "images": int(images), **extra}

CACHE_LIMIT_BYTES = 2 << 30  # hold the decoded set in memory below 2 GiB (ImageNet ipc 10 at 224 px is 1.5 GB)


class DistilledSet:
    """Synthetic images with labels in the teacher's class indexing."""

    def __init__(self, root: str | Path, teacher_classes: list[str]):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"distilled images not found: {root} (run the recover stage first)")
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        unknown = [c for c in found if c not in teacher_classes]
        if unknown:
            raise DataError(f"{root} has class folders the teacher does not know: {unknown[:5]}")
        samples, folder_classes = scan_image_folder(root, found)
        self.paths = [p for p, _ in samples]
        self.labels = torch.tensor([teacher_classes.index(folder_classes[i]) for _, i in samples])
        self.classes = list(teacher_classes)
        with Image.open(self.paths[0]) as im:
            self.size = im.size[1], im.size[0]
        self._cache: torch.Tensor | None = None
        self._exact: torch.Tensor | None = None
        if len(self.paths) * 3 * self.size[0] * self.size[1] <= CACHE_LIMIT_BYTES:
            self._cache = torch.stack([self._decode(i) for i in range(len(self.paths))])

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def cached(self) -> bool:
        """True when the decoded set is held in memory (crops are then cheap in-process)."""
        return self._cache is not None or self._exact is not None

    def _decode(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
        return arr.view(self.size[0], self.size[1], 3).permute(2, 0, 1).contiguous()

    def image(self, i: int) -> torch.Tensor:
        """float (3, H, W): the PNG's pixels in [0, 1], or the exact tensor (see :meth:`use_exact`)."""
        if self._exact is not None:
            return self._exact[i].clone()
        raw = self._cache[i] if self._cache is not None else self._decode(i)
        return raw.float().div_(255)

    def use_exact(self, images: torch.Tensor, rel_paths: list[str], base: Path) -> None:
        """Serve the distiller's exact float pixels (e.g. MTT's, which leave [0, 1] and lose bits in an
        8-bit PNG) instead of the PNGs; ``rel_paths[k]`` (relative to ``base``) names image ``k``."""
        index = {p: k for k, p in enumerate(rel_paths)}
        order = [index.get(Path(p).relative_to(base).as_posix()) for p in self.paths]
        if None in order:
            missing = self.paths[order.index(None)]
            raise DataError(f"the exact tensors in {base} lack the image {missing}")
        self._exact = images[torch.tensor(order)].float()


def crop_plan(cfg, distilled: "DistilledSet"):
    """The epoch → (order, crops) function relabel and train agree on (``run.seed``, ``relabel.*`` crops)."""
    h, w = distilled.size
    return lambda epoch: epoch_plan(len(distilled), h, w, seed=cfg.run.seed, epoch=epoch,
                                    scale=cfg.relabel.rrc_scale, flip=cfg.relabel.flip)


def compress_logits(logits: torch.Tensor, topk: int) -> dict:
    """Relabel's storage of one epoch's logits: fp16, all classes or the top-k with int16/int32 indices."""
    if topk <= 0 or topk >= logits.shape[1]:
        return {"logits": logits.half()}
    values, index = logits.topk(topk, dim=1)
    index_dtype = torch.int16 if logits.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
    return {"topk_values": values.half(), "topk_index": index.to(index_dtype), "num_classes": logits.shape[1]}


def expand_logits(blob: dict) -> torch.Tensor:
    """Dense float logits; classes outside the stored top-k get -inf (probability 0 at any temperature)."""
    if "logits" in blob:
        return blob["logits"].float()
    values, index = blob["topk_values"].float(), blob["topk_index"].long()
    dense = torch.full((values.shape[0], int(blob["num_classes"])), float("-inf"))
    return dense.scatter_(1, index, values)


def epoch_plan(n: int, height: int, width: int, *, seed: int, epoch: int, scale, flip: bool):
    """``(order int64 (n,), crops int16 (n, 5))``: position k shows image ``order[k]`` cropped by ``crops[k]``."""
    gen = torch.Generator().manual_seed(derive_seed("crop-plan", seed, epoch))
    order = epoch_permutation(n, derive_seed("distilled-order", seed), epoch)
    crops = torch.tensor([sample_crop_params(height, width, scale, flip, gen) for _ in range(n)],
                         dtype=torch.int16)
    return order, crops


class ReplayDataset(torch.utils.data.Dataset):
    """Item k of epoch e: (crop k of the epoch plan, its target). Targets are the stored teacher logits
    (store mode) or the hard label (online mode: the teacher labels the batch during training)."""

    def __init__(self, distilled: DistilledSet, *, resolution: int, plan_fn, targets_fn=None):
        self.distilled, self.resolution = distilled, resolution
        self.plan_fn, self.targets_fn = plan_fn, targets_fn
        self.classes = distilled.classes
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.order, self.crops = self.plan_fn(epoch)
        self.targets = self.targets_fn(epoch) if self.targets_fn is not None else None

    def __len__(self) -> int:
        return len(self.distilled)

    def __getitem__(self, k: int):
        i = int(self.order[k])
        x = apply_crop_params(self.distilled.image(i), self.crops[k], self.resolution)
        target = self.targets[k] if self.targets is not None else int(self.distilled.labels[i])
        return x, target


class LabelledSet(SeededAugmentation, torch.utils.data.Dataset):
    """A distilled set with one target per image: its class (hard labels) or a stored logit vector (soft).

    With ``augment`` each item gets a random-resized crop + flip drawn from its own generator, seeded by
    (seed, epoch, index) like every loader in guardx, so a resumed run sees the same crops."""

    def __init__(self, distilled: DistilledSet, targets: torch.Tensor, *, resolution: int, augment: bool,
                 scale=(0.08, 1.0), flip: bool = True):
        if len(targets) != len(distilled):
            raise DataError(f"{len(targets)} targets for {len(distilled)} distilled images")
        self.distilled, self.targets, self.resolution = distilled, targets, resolution
        self.augment, self.scale, self.flip = augment, scale, flip
        self.classes = distilled.classes

    def __len__(self) -> int:
        return len(self.distilled)

    def __getitem__(self, i: int):
        x = self.distilled.image(i)
        if self.augment:
            gen = self.item_generator(i)
            top, left, h, w = sample_rrc(x.shape[-2], x.shape[-1], self.scale, gen)
            x = resized_crop(x, top, left, h, w, self.resolution)
            if self.flip and bool(torch.rand(1, generator=gen) < 0.5):
                x = x.flip(-1)
        elif x.shape[-1] != self.resolution:
            x = resized_crop(x, 0, 0, x.shape[-2], x.shape[-1], self.resolution)
        target = self.targets[i]
        return x, (int(target) if target.dim() == 0 else target)

