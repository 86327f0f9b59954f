"""Tensor transforms shared by the loaders, recover and relabel.

Random-resized-crop parameters are drawn from an explicit ``torch.Generator`` so that relabel can
store them and train can replay exactly the same crops (no monkey-patching of torchvision).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RATIO = (3.0 / 4.0, 4.0 / 3.0)


def sample_rrc(height: int, width: int, scale, generator: torch.Generator | None = None,
               ratio=RATIO) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, driven by ``generator``: returns (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    # fallback: central crop with the closest allowed aspect ratio
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: torch.Tensor, top: int, left: int, h: int, w: int, size: int) -> torch.Tensor:
    """Crop (…, C, H, W) float images and resize to ``size``×``size`` (bilinear, antialiased like PIL)."""
    crop = img[..., top:top + h, left:left + w]
    squeeze = crop.dim() == 3
    if squeeze:
        crop = crop.unsqueeze(0)
    if crop.shape[-2:] != (size, size):
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                             antialias=h > size or w > size)
    return crop.squeeze(0) if squeeze else crop


def apply_crop_params(img: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """Replay stored crop parameters ``(top, left, h, w, flip)`` on one (C, H, W) float image."""
    top, left, h, w, flip = (int(v) for v in params.tolist())
    out = resized_crop(img, top, left, h, w, size)
    return out.flip(-1) if flip else out


def sample_crop_params(height: int, width: int, scale, flip: bool, generator: torch.Generator) -> list[int]:
    top, left, h, w = sample_rrc(height, width, scale, generator)
    do_flip = int(flip and bool(torch.rand(1, generator=generator) < 0.5))
    return [top, left, h, w, do_flip]


def random_resized_crop_batch(x: torch.Tensor, size: int, scale, flip: bool,
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """One RRC (+flip) shared by the whole batch, as SRe2L's recover applies torchvision transforms to a batch."""
    top, left, h, w = sample_rrc(x.shape[-2], x.shape[-1], scale, generator)
    out = resized_crop(x, top, left, h, w, size)
    if flip and bool(torch.rand(1, generator=generator) < 0.5):
        out = out.flip(-1)
    return out
