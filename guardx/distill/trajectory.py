"""What the expert buffers and the trajectory-matching distillers (MTT, TESLA) share.

* the real training split as one uint8 tensor (MTT holds the whole set in memory too);
* the **input space** experts are trained in and synthetic images are optimised in: MTT's, i.e. images
  normalised with the dataset mean/std, or ZCA-whitened pixels (``buffers.zca``; then no mean/std);
* the expert network (ConvNet of DC/MTT by default), built with an identity normaliser because its
  inputs are already in the input space;
* :class:`FlatModel`: the network as a function of one flat parameter vector (``torch.func.functional_call``),
  the form in which MTT stores trajectories and unrolls synthetic steps;
* expert files: ``expert_XXXX.pt`` = ``{"params": float32 (epochs + 1, P), "names", "shapes", ...}``,
  row k = the parameters after k epochs (row 0: the initialisation), in ``named_parameters`` order.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.func import functional_call

from guardx.data.zca import ZCA
from guardx.errors import ConfigError, DataError
from guardx.models import create_model
from guardx.utils.io import load_torch

DEFAULT_DSA = "color_crop_cutout_flip_scale_rotate"  # MTT's --dsa_strategy default (buffer.py and distill.py)


# ---------------------------------------------------------------- real data
def load_real(data_cfg, split: str = "train", *, resolution: int = 0,
              batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images uint8 (N, 3, R, R), labels long (N,), class names)`` of a split, un-augmented, at
    ``resolution`` (0 = ``data.resolution``).

    ImageFolder data is resized to R and centre-cropped to R (MTT's ``Resize(R), CenterCrop(R)``, i.e.
    ``val_crop_ratio = 1``). Decoded files are 8-bit, so the uint8 copy is exact; digits at a resolution
    other than 32 px are bilinearly resized and rounded to 8 bits.
    """
    from guardx.data import build_dataset
    from guardx.data.folder import collate_skip

    cfg = dataclasses.replace(data_cfg, val_crop_ratio=1.0, resolution=resolution or data_cfg.resolution)
    dataset = build_dataset(cfg, split, augment=False)
    workers = 0 if cfg.dataset == "digits" else cfg.workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate_skip)
    xs, ys, skipped = [], [], []
    for x, y, bad in loader:
        skipped += bad
        if len(y):
            xs.append(x.mul(255).round_().to(torch.uint8))
            ys.append(y)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable images, e.g. {skipped[0]}", stacklevel=2)
    if not xs:
        raise DataError(f"no readable images in the {split} split")
    return torch.cat(xs), torch.cat(ys), list(dataset.classes)


# ---------------------------------------------------------------- input space
class InputSpace:
    """Pixels in [0, 1] ↔ the tensors the experts see: ``(x - mean) / std``, or ZCA-whitened pixels."""

    def __init__(self, mean, std, zca: ZCA | None = None):
        self.zca = zca
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    @property
    def kind(self) -> str:
        return "zca" if self.zca is not None else "normalize"

    def to(self, device) -> "InputSpace":
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        if self.zca is not None:
            self.zca = self.zca.to(device)
        return self

    def to_input(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.zca is not None:
            return self.zca(pixels)
        return (pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        if self.zca is not None:
            return self.zca.inverse(x)
        return x * self.std.to(x.dtype) + self.mean.to(x.dtype)


def input_space(data_cfg, zca_file: Path | None) -> InputSpace:
    """MTT's choice: ZCA replaces the mean/std normalisation (``ToTensor()`` then whitening)."""
    if zca_file is not None:
        return InputSpace([0.0] * 3, [1.0] * 3, ZCA.from_state(load_torch(zca_file)))
    return InputSpace(data_cfg.mean, data_cfg.std)


# ---------------------------------------------------------------- models
def model_spec(bcfg, *, num_classes: int, resolution: int) -> dict:
    """What rebuilds an expert: stored in the buffers' manifest and read by the distillers."""
    return {"name": bcfg.model, "width": bcfg.width, "depth": bcfg.depth or None, "num_classes": num_classes,
            "resolution": resolution}


def build_model(spec: dict) -> nn.Module:
    """The expert architecture with an identity normaliser (inputs are already in the input space).
    ``depth: None`` keeps the model's own default (the ConvNet picks its depth from the resolution)."""
    return create_model(spec["name"], num_classes=spec["num_classes"], width=spec["width"],
                        depth=spec.get("depth"), resolution=spec["resolution"])


class FlatModel:
    """``f(flat, x)``: the model's forward with its parameters taken from one flat vector.

    Buffers (e.g. BatchNorm statistics) are the module's own; the ConvNet has none. The order of the flat
    vector is ``named_parameters()`` order, the order expert files are written in.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params = sum(self.numels)
        self.buffers = dict(model.named_buffers())

    def flatten(self, tensors) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    def flat_params(self) -> torch.Tensor:
        return self.flatten(p for _, p in self.model.named_parameters())

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: c.view(s) for n, c, s in zip(self.names, flat.split(self.numels), self.shapes)}

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (self.unflatten(flat), self.buffers), (x,))


# ---------------------------------------------------------------- expert files
def expert_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"expert_{index:04d}.pt"


def load_expert(path: Path) -> dict:
    """An expert file, memory-mapped: reading two rows of ``params`` touches only those pages."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def check_compatible(flat_model: FlatModel, expert: dict, path: Path) -> None:
    if list(expert["names"]) != flat_model.names or [tuple(s) for s in expert["shapes"]] != flat_model.shapes:
        raise ConfigError(f"{path} was trained with another architecture than the one built from the buffers' "
                          "manifest; rerun guardx buffers into a fresh run.out_dir")


def build_augment(strategy: str):
    """DSA (differentiable siamese augmentation) as ``aug(x, seed) -> x``; None for ``"none"`` or ``""``."""
    if not strategy or strategy == "none":
        return None
    try:
        from guardx.data.dsa import DSA
    except ImportError:
        raise ConfigError(f"DSA augmentation ({strategy!r}) needs guardx.data.dsa, which this checkout lacks; "
                          "set buffers.dsa_strategy=none / mtt.dsa_strategy=none to run without it") from None
    dsa = DSA(strategy=strategy)
    # MTT's DiffAugment with seed -1: an independent draw per image (seeded here, so it can be replayed)
    return lambda x, seed: dsa(x, seed, per_sample=True)


def num_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
