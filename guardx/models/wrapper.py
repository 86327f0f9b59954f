"""The normalising wrapper: images in [0, 1] outside, normalised tensors inside.

Objectives that perturb "the tensor after normalisation" (``space: normalized``, the
official code's choice) call :func:`split_normalizer` to get the two halves.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn


class Normalized(nn.Module):
    """``forward(x) = net((x - mean) / std)``; mean/std are buffers so they move with the model.

    ``whiten`` (e.g. MTT's :class:`~guardx.data.zca.ZCA`, a module with ``forward`` and ``inverse``)
    replaces the mean/std normalisation; its buffers are part of the saved state."""

    def __init__(self, net: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 whiten: nn.Module | None = None):
        super().__init__()
        self.net = net
        self.whiten = whiten
        self.has_norm = mean is not None and std is not None and whiten is None
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(mean if self.has_norm else [0.0]).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std if self.has_norm else [1.0]).view(shape), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.whiten is not None:
            return self.whiten(x)
        return (x - self.mean) / self.std if self.has_norm else x

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.whiten is not None:
            return self.whiten.inverse(x)
        return x * self.std + self.mean if self.has_norm else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP/DeepSpeed-style ``.module`` wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def split_normalizer(model: nn.Module, space: str = "normalized") -> tuple[Callable, nn.Module]:
    """Return ``(to_input, net)`` with ``model(x) == net(to_input(x))``.

    ``space="normalized"``: ``to_input`` is the normaliser and ``net`` the inner network, so a
    perturbation of ``to_input(x)`` is measured in normalised units. ``space="pixel"``: identity and the
    whole model. A model without a :class:`Normalized` wrapper gives identity either way.
    """
    if space not in ("normalized", "pixel"):
        raise ValueError(f"space must be 'normalized' or 'pixel', got {space!r}")
    inner = unwrap(model)
    if space == "normalized" and isinstance(inner, Normalized):
        return inner.normalize, inner.net
    return (lambda x: x), model
