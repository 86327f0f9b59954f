"""The embedded dataset: scikit-learn's bundled ``load_digits`` (1,797 real 8×8 scans, 10 classes).

Images are upsampled to 32×32 (bilinear), replicated to RGB and kept in memory as uint8; the
train/test split is fixed (stratified, 20 % test, seed 0) so every run and test sees the same one.
Nothing is downloaded: the data ships inside scikit-learn.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

DIGITS_RESOLUTION = 32
DIGITS_CLASSES = [str(i) for i in range(10)]


@lru_cache(maxsize=1)
def _load_all() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(DIGITS_RESOLUTION, DIGITS_RESOLUTION), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return x, torch.tensor(d.target, dtype=torch.long)


@lru_cache(maxsize=1)
def _split_indices() -> tuple[torch.Tensor, torch.Tensor]:
    _, y = _load_all()
    g = torch.Generator().manual_seed(0)
    train, test = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(0.2 * len(idx))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def digits_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, 3, 32, 32), labels long (N,))`` of the fixed ``train`` or ``test`` split."""
    if split not in ("train", "test", "val"):
        raise ValueError(f"digits split must be train or test, got {split!r}")
    x, y = _load_all()
    train_idx, test_idx = _split_indices()
    idx = train_idx if split == "train" else test_idx
    return x[idx], y[idx]
