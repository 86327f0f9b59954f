"""The model registry (timm-style): ``@register_model`` on a factory, ``create_model(name, ...)`` to build."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from guardx.registry import Registry

MODELS = Registry("model")


def register_model(fn: Callable[..., nn.Module] | None = None, **caps):
    """``@register_model`` or ``@register_model(torchvision="resnet18")``: registered under the function's
    name; ``caps`` are capabilities (e.g. which torchvision architecture's state_dict loads unchanged)."""
    if fn is None:
        return MODELS.register(**caps)
    return MODELS.register()(fn)


def list_models() -> list[str]:
    return MODELS.names()


def is_model(name: str) -> bool:
    return name in MODELS


def create_model(name: str, *, num_classes: int, mean=None, std=None, whiten: nn.Module | None = None,
                 **kwargs) -> nn.Module:
    """Build ``name`` wrapped in :class:`Normalized` (identity normalisation when mean/std are None; ``whiten``,
    e.g. a ZCA, replaces mean/std).

    ``None`` kwargs are dropped so a factory's defaults stay in effect (timm's convention).
    """
    from guardx.models.wrapper import Normalized

    return Normalized(MODELS.build(name, num_classes=num_classes, **kwargs), mean=mean, std=std, whiten=whiten)
