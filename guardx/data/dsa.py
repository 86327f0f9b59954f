"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021), as DC's ``DiffAugment`` / ``ParamDiffAug``.

    dsa = DSA()                                  # 'color_crop_cutout_flip_scale_rotate', DC's ratios
    xr = dsa(x_real, seed)                        # siamese: one transform for the whole batch ...
    xs = dsa(x_syn, seed)                         # ... and the very same one for any batch given that seed
    xt = dsa(x, seed, per_sample=True)            # one random draw per image (training a network)

The API is stable (DC, MTT and TESLA use it):

* ``DSA(strategy, *, single=True, prob_flip=0.5, ratio_scale=1.2, ratio_rotate=15.0, ratio_crop_pad=0.125,
  ratio_cutout=0.5, brightness=1.0, saturation=2.0, contrast=0.5)`` — the defaults are DC's ``ParamDiffAug``
  (VICO-UoE/DatasetCondensation ``utils.py`` l. 474-484; MTT's is the same).
* ``__call__(x, seed, *, per_sample=False) -> Tensor``: ``x`` is (B, C, H, W) float; the output has the same
  shape, device and dtype and is differentiable with respect to ``x`` (every family is a differentiable
  function of the pixels: affine colour maps, zero-filled shifts, masks, flips, bilinear resampling).
  All randomness comes from ``torch.Generator().manual_seed(seed)`` on the CPU (no global RNG is read or
  advanced), so the transform is a pure function of ``(seed, batch size if per_sample)``.
* ``single=True`` is DC's ``aug_mode='S'``: each call draws ONE family of the strategy string (``color`` =
  brightness, saturation, contrast in turn) and applies it; ``single=False`` (``'M'``) applies every family.
* siamese (default): one parameter draw is shared by every image of the batch, so two batches (real and
  synthetic, of any sizes) given the same seed get the same transform (DC's ``param.Siamese``);
  ``per_sample=True`` draws the family once per call and its parameters per image (DC's ``seed=-1``).

DC augments the *normalised* images its loaders produce (cutout, shifts and resampling fill with 0 =
the mean colour there); callers that want DC's behaviour pass normalised tensors.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


class DSA:
    def __init__(self, strategy: str = DEFAULT_STRATEGY, *, single: bool = True, prob_flip: float = 0.5,
                 ratio_scale: float = 1.2, ratio_rotate: float = 15.0, ratio_crop_pad: float = 0.125,
                 ratio_cutout: float = 0.5, brightness: float = 1.0, saturation: float = 2.0, contrast: float = 0.5):
        families = [f for f in strategy.split("_") if f] if strategy.lower() != "none" else []
        bad = [f for f in families if f not in FAMILIES]
        if bad:
            raise ValueError(f"unknown DSA augmentation(s) {bad} in {strategy!r}; known: {', '.join(FAMILIES)}")
        self.strategy, self.families, self.single = strategy, families, single
        self.prob_flip, self.ratio_scale, self.ratio_rotate = prob_flip, ratio_scale, ratio_rotate
        self.ratio_crop_pad, self.ratio_cutout = ratio_crop_pad, ratio_cutout
        self.brightness, self.saturation, self.contrast = brightness, saturation, contrast

    def __repr__(self) -> str:
        return f"DSA({self.strategy!r}, mode={'S' if self.single else 'M'})"

    def __call__(self, x: torch.Tensor, seed: int, *, per_sample: bool = False) -> torch.Tensor:
        if not self.families:
            return x
        gen = torch.Generator().manual_seed(int(seed))
        n = x.shape[0] if per_sample else 1  # parameter draws; 1 = siamese, broadcast over the batch
        if self.single:
            chosen = [self.families[int(torch.randint(len(self.families), (1,), generator=gen))]]
        else:
            chosen = self.families
        for family in chosen:
            x = getattr(self, f"_{family}")(x, gen, n)
        return x.contiguous()

    # ------------------------------------------------------------------ families (DC's rand_* functions)
    def _uniform(self, gen: torch.Generator, n: int, x: torch.Tensor) -> torch.Tensor:
        """U[0, 1) of shape (n,) on x's device and dtype (drawn on the CPU generator)."""
        return torch.rand(n, generator=gen, dtype=torch.float64).to(device=x.device, dtype=x.dtype)

    def _color(self, x, gen, n):
        b = self._uniform(gen, n, x).view(-1, 1, 1, 1)
        x = x + (b - 0.5) * self.brightness
        s = self._uniform(gen, n, x).view(-1, 1, 1, 1)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (s * self.saturation) + mean
        c = self._uniform(gen, n, x).view(-1, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (c + self.contrast) + mean

    def _crop(self, x, gen, n):
        """Shift by up to ratio·size pixels, zero fill (DC pads by one zero pixel and clamps into it)."""
        B, _, H, W = x.shape
        sh, sw = int(H * self.ratio_crop_pad + 0.5), int(W * self.ratio_crop_pad + 0.5)
        th = torch.randint(-sh, sh + 1, (n,), generator=gen).to(x.device)
        tw = torch.randint(-sw, sw + 1, (n,), generator=gen).to(x.device)
        rows = (torch.arange(H, device=x.device) + th.view(-1, 1) + 1).clamp(0, H + 1).expand(B, H)
        cols = (torch.arange(W, device=x.device) + tw.view(-1, 1) + 1).clamp(0, W + 1).expand(B, W)
        padded = F.pad(x, (1, 1, 1, 1))
        batch = torch.arange(B, device=x.device).view(B, 1, 1)
        return padded.permute(0, 2, 3, 1)[batch, rows.view(B, H, 1), cols.view(B, 1, W)].permute(0, 3, 1, 2)

    def _cutout(self, x, gen, n):
        """Zero a (ratio·H)×(ratio·W) rectangle centred at a random point (clipped at the borders)."""
        B, _, H, W = x.shape
        ch, cw = int(H * self.ratio_cutout + 0.5), int(W * self.ratio_cutout + 0.5)
        oh = torch.randint(0, H + (1 - ch % 2), (n,), generator=gen).to(x.device)
        ow = torch.randint(0, W + (1 - cw % 2), (n,), generator=gen).to(x.device)
        top, left = (oh - ch // 2).view(-1, 1), (ow - cw // 2).view(-1, 1)
        r, c = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
        in_rows = (r >= top) & (r < top + ch)  # (n, H)
        in_cols = (c >= left) & (c < left + cw)  # (n, W)
        keep = ~(in_rows.unsqueeze(2) & in_cols.unsqueeze(1))  # (n, H, W)
        return x * keep.unsqueeze(1).to(x.dtype)

    def _flip(self, x, gen, n):
        u = self._uniform(gen, n, x).view(-1, 1, 1, 1)
        return torch.where(u < self.prob_flip, x.flip(3), x)

    def _affine(self, x, theta: torch.Tensor) -> torch.Tensor:
        theta = theta.expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _scale(self, x, gen, n):
        r = self.ratio_scale
        sx = self._uniform(gen, n, x) * (r - 1.0 / r) + 1.0 / r
        sy = self._uniform(gen, n, x) * (r - 1.0 / r) + 1.0 / r
        zero = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
        return self._affine(x, theta)

    def _rotate(self, x, gen, n):
        a = (self._uniform(gen, n, x) - 0.5) * 2 * self.ratio_rotate / 180 * math.pi
        cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        return self._affine(x, theta)


__all__ = ["DSA", "DEFAULT_STRATEGY", "FAMILIES"]
