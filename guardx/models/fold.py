"""Which BatchNorms fold into the convolution before them, and a folded inference copy of a model.

With running statistics BatchNorm is an affine map per channel, so after a convolution it folds into that
convolution's weights (:func:`folded_weights`). Two users:

* the regulariser's running-statistics passes (:mod:`guardx.objectives._fold`) fold *inside autograd*, so
  every parameter still gets its gradient;
* evaluation (:func:`folded_for_inference`) folds once, with constants: the attacks take input gradients
  only, so BatchNorm's forward and backward are work no one needs (about 30 % of a small ResNet's
  forward + input-gradient step on CPU).
"""
from __future__ import annotations

import copy
import weakref

import torch
import torch.nn as nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PAIRS: "weakref.WeakKeyDictionary[nn.Module, list[tuple[nn.Module, nn.Module]]]" = weakref.WeakKeyDictionary()


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(conv, bn) pairs of ``model`` whose BatchNorm can fold into the convolution (cached per model):
    a BatchNorm (tracking running statistics) whose only input is the output of a convolution used nowhere
    else, found by tracing the model with ``torch.fx``. A model fx cannot trace has none."""
    if model not in _PAIRS:
        _PAIRS[model] = _find_pairs(model)
    return _PAIRS[model]


def _find_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    import torch.fx

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return []
    try:
        graph = torch.fx.Tracer().trace(model)
    except Exception:  # noqa: BLE001  (data-dependent control flow and the like: run unfolded)
        return []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn, src = model.get_submodule(node.target), node.args[0]
        if not (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats
                and isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv = model.get_submodule(src.target)
        if (isinstance(conv, _CONVS) and conv.out_channels == bn.num_features
                and calls[node.target] == 1 and calls[src.target] == 1):
            pairs.append((conv, bn))
    return pairs


def folded_weights(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` of ``conv`` followed by ``bn`` on its running statistics, computed from the real
    parameters (differentiable when grad mode is on): W' = W·s, b' = β − (μ − b)·s, s = γ/√(σ² + ε)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    weight = conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    shift = bn.running_mean if conv.bias is None else bn.running_mean - conv.bias
    bias = -shift * scale if bn.bias is None else bn.bias - shift * scale
    return weight, bias


@torch.no_grad()
def folded_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` whose foldable BatchNorms are folded into their convolutions (the
    BatchNorm becomes ``nn.Identity``) and whose parameters need no gradient: the same function to
    rounding (≈1e-7 relative in fp32), for evaluation only. ``model`` itself is not touched; a model with
    nothing to fold comes back as an unfolded copy."""
    folded = copy.deepcopy(model).eval()
    names = {m: name for name, m in folded.named_modules()}
    for conv, bn in conv_bn_pairs(folded):
        weight, bias = folded_weights(conv, bn)
        conv.weight.copy_(weight)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
        folded.set_submodule(names[bn], nn.Identity())
    _PAIRS.pop(folded, None)  # its BatchNorms are gone: never fold it again
    return folded.requires_grad_(False)
