"""Name → factory registry for models."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from guardx.errors import did_you_mean

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def is_model(name: str) -> bool:
    return name in _MODELS


def create_model(name: str, *, num_classes: int, mean=None, std=None, **kwargs) -> nn.Module:
    """Build ``name`` wrapped in :class:`Normalized` (identity normalisation when mean/std are None).

    ``None`` kwargs are dropped so a factory's defaults stay in effect (timm's convention).
    """
    from guardx.models.wrapper import Normalized

    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}{did_you_mean(name, _MODELS)}; known: {', '.join(list_models())}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    net = _MODELS[name](num_classes=num_classes, **kwargs)
    return Normalized(net, mean=mean, std=std)
