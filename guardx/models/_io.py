"""Model artifacts: weights plus what is needed to rebuild the model (architecture, classes, normaliser)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from guardx.errors import GuardxError
from guardx.models._registry import create_model
from guardx.models.wrapper import Normalized, unwrap
from guardx.utils.io import load_torch, save_torch


def model_meta(cfg, *, name: str, width: int, num_classes: int, classes: list[str]) -> dict:
    return {"name": name, "width": width, "num_classes": num_classes, "classes": list(classes),
            "resolution": cfg.data.resolution, "mean": list(cfg.data.mean), "std": list(cfg.data.std)}


def build_from_meta(meta: dict) -> nn.Module:
    return create_model(meta["name"], num_classes=meta["num_classes"], width=meta["width"],
                        resolution=meta["resolution"], mean=meta["mean"], std=meta["std"])


def save_model(path: str | Path, model: nn.Module, meta: dict, **extra) -> None:
    inner = unwrap(model)
    state = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    save_torch({"model": state, "meta": meta, **extra}, path)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[Normalized, dict]:
    """Rebuild a saved model (eval mode) and return it with its metadata."""
    path = Path(path)
    if not path.is_file():
        raise GuardxError(f"checkpoint not found: {path}")
    try:
        blob = load_torch(path)  # a truncated or foreign file is a one-line ReadError
    except GuardxError as e:
        raise GuardxError(f"{e}; rerun the stage that wrote it (it sets a file that does not load aside and "
                          "writes it again)") from None
    if not isinstance(blob, dict) or "model" not in blob or "meta" not in blob:
        raise GuardxError(f"{path} is not a guardx model file (expected keys 'model' and 'meta')")
    model = build_from_meta(blob["meta"])
    model.load_state_dict(blob["model"])
    return model.to(device).eval(), blob["meta"]
