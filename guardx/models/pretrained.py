"""Start a model from pretrained weights (``model.init``): torchvision, timm or guardx files, never downloaded.

Accepted files (read with ``torch.load(weights_only=True)``, so a file can never run code):

* a torchvision ``state_dict`` (``torch.save(resnet18(...).state_dict())``, or the file torchvision's
  weights download to its hub cache) — guardx's ResNet-18 uses torchvision's parameter names;
* a timm checkpoint: a bare state_dict, or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``,
  with ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefixes — timm's resnet18 uses the same names;
* a guardx model file (``{"model": state, "meta": ...}``, e.g. another run's ``squeeze/teacher.pt``).

``torchvision:<model>[.<WEIGHTS>]`` (e.g. ``torchvision:resnet18``) names the file torchvision's own
weights (the default ones: ``IMAGENET1K_V1`` for resnet18) would be cached as,
``<torch hub dir>/checkpoints/<file>``; if it is not there the error gives the URL to fetch and where.

Every mismatch is one line naming the key, the two shapes and the setting to change. The classifier
must fit the data (``model.init_head=keep``) unless ``model.init_head=reset`` asks for a fresh one.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from guardx.errors import ConfigError
from guardx.models.wrapper import Normalized, unwrap

WRAPPER_KEYS = ("state_dict", "model", "module", "net")
PREFIXES = ("module.", "_orig_mod.", "net.", "model.")


def torchvision_weights(spec: str):
    """``torchvision:resnet18[.IMAGENET1K_V1]`` → torchvision's weights enum entry (no download)."""
    name, _, variant = spec.split(":", 1)[1].partition(".")
    try:
        from torchvision.models import get_model_weights

        weights = get_model_weights(name)
    except (ImportError, ValueError, KeyError):
        raise ConfigError(f"model.init={spec}: torchvision has no model {name!r}") from None
    try:
        return weights[variant] if variant else weights.DEFAULT
    except KeyError:
        raise ConfigError(f"model.init={spec}: {name} has no weights {variant!r}; known: "
                          f"{', '.join(w.name for w in weights)}") from None


def resolve_init(spec: str) -> Path:
    """The local file ``model.init`` names; a missing file is an error saying what to fetch and where."""
    if spec.startswith("torchvision:"):
        weights = torchvision_weights(spec)
        path = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
        if not path.is_file():
            raise ConfigError(f"model.init={spec} needs {path}, which is missing; guardx never downloads weights at "
                              f"run time: fetch {weights.url} to {path} once (or set TORCH_HOME, or model.init=FILE)")
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.init file not found: {path} (guardx never downloads weights: put the checkpoint "
                          "there, or use model.init=torchvision:resnet18 for torchvision's cached ImageNet weights)")
    return path


def _is_state(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state(blob, path: Path) -> tuple[dict[str, torch.Tensor], str, dict | None]:
    """``(state_dict, format, guardx meta or None)`` of a loaded checkpoint, wrappers and prefixes removed."""
    meta = None
    if isinstance(blob, dict) and "meta" in blob and _is_state(blob.get("model")):
        state, fmt, meta = blob["model"], "guardx", blob["meta"]
    elif _is_state(blob):
        state, fmt = blob, "state_dict"
    else:
        inner = next((k for k in WRAPPER_KEYS if isinstance(blob, dict) and _is_state(blob.get(k))), None)
        if inner is None:
            keys = list(blob)[:6] if isinstance(blob, dict) else type(blob).__name__
            raise ConfigError(f"model.init {path} holds no state_dict (top-level keys: {keys}); expected a torchvision "
                              f"state_dict, a timm checkpoint ({'/'.join(WRAPPER_KEYS)}) or a guardx model file")
        state, fmt = blob[inner], f"checkpoint['{inner}']"
    changed = True
    while changed:  # strip wrapper prefixes every key shares (module., _orig_mod., net., model.)
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state, fmt, meta


def _classifier_prefix(net: nn.Module) -> str:
    last = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    return f"{last[-1]}." if last else "\0"


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def load_init(model: nn.Module, spec: str, *, head: str = "keep", classes: list[str] | None = None,
              model_name: str = "", width: int | None = None) -> dict:
    """Copy ``model.init`` weights into ``model`` (a :class:`Normalized` model or a bare network).

    ``classes``: the data's class ids, checked against a guardx file's when the classifier is kept.
    Returns a report (path, format, head, tensors loaded) for the stage's metadata."""
    path = resolve_init(spec)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated file, pickle with code, not a torch file)
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise ConfigError(f"cannot read model.init {path}: {type(e).__name__}: {first}") from None
    state, fmt, meta = extract_state(blob, path)
    inner = unwrap(model)
    net = inner.net if isinstance(inner, Normalized) else inner
    target = net.state_dict()
    what = f"model.name={model_name}" + (f" (width {width})" if width else "") if model_name else "the model"
    fc = _classifier_prefix(net)
    head_keys = {k for k in target if k.startswith(fc)}
    if head == "reset":
        state = {k: v for k, v in state.items() if not k.startswith(fc)}
    optional = {k for k in target if k.endswith("num_batches_tracked")}  # some exports drop these counters
    missing = set(target) - set(state) - optional - (head_keys if head == "reset" else set())
    unexpected = set(state) - set(target)
    if missing or unexpected:
        parts = ([f"{len(missing)} weights missing ({_few(missing)})"] if missing else []) + \
                ([f"{len(unexpected)} not in the model ({_few(unexpected)})"] if unexpected else [])
        raise ConfigError(f"model.init {path} does not fit {what}: {'; '.join(parts)}{_stem_hint(state, target)}")
    for key, value in state.items():
        want = target[key]
        if value.shape == want.shape:
            continue
        if key in head_keys and value.dim() >= 1 and value.shape[1:] == want.shape[1:]:
            raise ConfigError(f"model.init {path} has a {value.shape[0]}-class classifier ({key}) but the data has "
                              f"{want.shape[0]} classes: set model.init_head=reset to re-initialise the classifier, "
                              "or use the data it was trained on")
        raise ConfigError(f"model.init {path}: {key} is {tuple(value.shape)} in the file but {tuple(want.shape)} in "
                          f"{what}{_stem_hint(state, target)}")
    if head == "keep" and meta and classes and meta.get("classes") and list(meta["classes"]) != list(classes):
        raise ConfigError(f"model.init {path} was trained on other classes than this data (e.g. "
                          f"{_first_difference(meta['classes'], classes)}): set model.init_head=reset, or point "
                          "data.* at the data it was trained on")
    net.load_state_dict(state, strict=False)
    return {"path": str(path), "format": fmt, "head": head, "tensors": len(state),
            "reset": sorted(head_keys) if head == "reset" else []}


def _stem_hint(state: dict, target: dict) -> str:
    a, b = state.get("conv1.weight"), target.get("conv1.weight")
    if a is None or b is None or a.dim() != 4 or b.dim() != 4:
        return ""
    if a.shape[-1] != b.shape[-1]:
        name = "resnet18" if a.shape[-1] == 7 else "resnet18_small"
        return f" (the file has the {a.shape[-1]}x{a.shape[-1]} stem of {name}: set model.name={name})"
    if a.shape[0] != b.shape[0]:
        return f" (the file's width is {a.shape[0]}: set model.width={a.shape[0]})"
    return ""


def _first_difference(a: list, b: list) -> str:
    if len(a) != len(b):
        return f"{len(a)} classes vs {len(b)}"
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"class {i} is {a[i]} there, {b[i]} here"
