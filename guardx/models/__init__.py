"""Model registry (timm-style): ``@register_model`` on a factory, ``create_model(name, ...)`` to build.

Every model guardx builds takes images in [0, 1]; the normalisation lives in
:class:`~guardx.models.wrapper.Normalized`, so attacks and objectives see pixel space
while the network sees normalised tensors (as the official evaluation does).
"""
from guardx.models._registry import MODELS, create_model, is_model, list_models, register_model
from guardx.models.wrapper import Normalized, split_normalizer, unwrap
from guardx.models import convnet, resnet  # noqa: F401  (registration on import)

__all__ = ["MODELS", "create_model", "is_model", "list_models", "register_model", "Normalized", "split_normalizer", "unwrap"]
