"""The distilled set (recover's ImageFolder of PNGs) and the per-epoch crop plans relabel stores.

An epoch plan is a pure function of (seed, epoch): the order of the images and one random-resized
crop + flip per position. Relabel stores the plan with the teacher's soft labels; train replays the
very same crops. Labels map through the *teacher's* class names, so a subset of classes keeps the
teacher's class indices.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from guardx.data.folder import scan_image_folder
from guardx.data.sampler import epoch_permutation
from guardx.data.transforms import apply_crop_params, sample_crop_params
from guardx.errors import DataError
from guardx.utils.misc import derive_seed

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
        if len(self.paths) * 3 * self.size[0] * self.size[1] <= CACHE_LIMIT_BYTES:
            self._cache = torch.stack([self._decode(i) for i in range(len(self.paths))])

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
        return arr.view(self.size[0], self.size[1], 3).permute(2, 0, 1).contiguous()

    def image(self, i: int) -> torch.Tensor:
        """float (3, H, W) in [0, 1]."""
        raw = self._cache[i] if self._cache is not None else self._decode(i)
        return raw.float().div_(255)


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
