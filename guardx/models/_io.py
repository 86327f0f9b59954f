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
    meta = {"name": name, "width": width, "num_classes": num_classes, "classes": list(classes),
            "resolution": cfg.data.resolution, "mean": list(cfg.data.mean), "std": list(cfg.data.std)}
    if getattr(cfg.data, "class_names", ""):  # display names (data.class_names) for reports and figures
        from guardx.data.splits import class_display_names

        meta["class_names"] = class_display_names(cfg.data, classes)
    return meta


def build_from_meta(meta: dict) -> nn.Module:
    whiten = None
    if meta.get("zca"):  # the buffers come with the weights
        from guardx.data.zca import ZCA

        shape = tuple(meta["zca"]["shape"])
        d = shape[0] * shape[1] * shape[2]
        whiten = ZCA(torch.zeros(d), torch.zeros(d, d), torch.zeros(d, d), shape, meta["zca"]["eps"])
    return create_model(meta["name"], num_classes=meta["num_classes"], width=meta["width"],
                        depth=meta.get("depth"), resolution=meta["resolution"], mean=meta["mean"], std=meta["std"],
                        whiten=whiten)


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
    # the random initialisation is overwritten at once; drawing it from a forked RNG keeps loading a file from
    # shifting what the caller draws next (train's student weights must not depend on relabel.mode)
    with torch.random.fork_rng(devices=[]):
        model = build_from_meta(blob["meta"])
    model.load_state_dict(blob["model"])
    return model.to(device).eval(), blob["meta"]
