"""BatchNorm folded into the preceding convolution in the running-statistics passes (guardx/objectives/_fold.py):
the same loss, the same direction z and the same gradient for every parameter as BatchNorm run as BatchNorm,
in fp64, and the running statistics untouched."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from guardx.models import Normalized, create_model
from guardx.objectives import build_objective
from guardx.objectives._common import running_stats_mode
from guardx.objectives import _fold
from guardx.objectives._fold import bn_folding, conv_bn_pairs, written_out_double_backward
from guardx.objectives.guard import input_gradient

OBJECTIVES = {"exact": ("guard", {"mode": "exact"}), "cure": ("guard", {"mode": "cure"}),
              "lossdiff": ("guard", {"mode": "lossdiff", "beta": 0.5}), "gradnorm": ("gradnorm", {"lam_g": 1.0})}


def model(name: str, seed: int = 0):
    """fp64, with running statistics and affine parameters far from their initial 0/1 (else folding is trivial)."""
    torch.manual_seed(seed)
    m = create_model(name, num_classes=5, width=4, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3]).double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.3, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    return m


def batch(res: int, n: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, res, res, generator=g, dtype=torch.double), torch.randint(0, 5, (n,), generator=g)


@pytest.fixture(autouse=True)
def fold_every_pair(monkeypatch, request):
    """Exactness is checked with every pair folded (in tiny test models the deep convolutions' weights
    outweigh their feature maps, which the size rule would leave unfolded)."""
    if "size_rule" not in request.node.name:
        monkeypatch.setattr(_fold, "FOLD_OUTPUT_OVER_WEIGHT", 0.0)


def run(objective, m, x, y, fold: bool):
    """``fold``: guardx's running-statistics passes (BatchNorm folded, convolutions' double backward written out,
    guardx/objectives/_conv.py); otherwise autograd's own, BatchNorm run as BatchNorm — the reference."""
    with bn_folding(fold), written_out_double_backward(fold):
        loss, stats = build_objective(objective[0], **objective[1])(m, x, y)
        grads = torch.autograd.grad(loss, list(m.parameters()))
    return loss, stats, dict(zip([n for n, _ in m.named_parameters()], grads))


CASES = [("resnet18_small", 8, "train"), ("resnet18", 32, "train"), ("resnet18_small", 8, "eval")]


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("name, res, mode", CASES)
def test_folded_objective_equals_unfolded(name, res, mode, objective):
    base = model(name).train(mode == "train")
    x, y = batch(res)
    folded, plain = copy.deepcopy(base), copy.deepcopy(base)
    loss_f, stats_f, grads_f = run(OBJECTIVES[objective], folded, x, y, fold=True)
    loss_p, stats_p, grads_p = run(OBJECTIVES[objective], plain, x, y, fold=False)
    assert stats_p["reg"] > 0
    assert loss_f.item() == pytest.approx(loss_p.item(), rel=1e-6)
    for key in stats_p:
        assert stats_f[key] == pytest.approx(stats_p[key], rel=1e-6, abs=1e-12), key
    for pname, g in grads_p.items():  # conv weights, BatchNorm γ and β, the classifier
        assert g.abs().max() > 0, pname
        torch.testing.assert_close(grads_f[pname], g, rtol=1e-6, atol=1e-6 * g.abs().max().item(), msg=pname)
    # running statistics: exactly what the unfolded objective leaves (train: the CE forward's one update)
    for (key, b), pb in zip(folded.named_buffers(), plain.buffers()):
        assert torch.equal(b, pb), key
    if mode == "eval":
        assert all(torch.equal(b, ob) for b, ob in zip(folded.buffers(), base.buffers()))


class BatchNormOps(TorchDispatchMode):
    """Counts the aten BatchNorm kernels (forward and backward) that run inside."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += "batch_norm" in func.__name__
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name, res, pairs", [("resnet18_small", 8, 20), ("resnet18", 32, 20)])
def test_direction_is_the_same_and_batchnorm_does_not_run(name, res, pairs):
    """z = g/‖g‖ comes from the input gradient of the clean running-statistics pass: equal folded and
    unfolded. Inside the folded block no BatchNorm forward runs at all (every BN of ResNet-18, downsample
    included, follows a convolution)."""
    m = model(name).train()
    x, y = batch(res)
    xin = m.normalize(x)
    assert len(conv_bn_pairs(m.net)) == pairs
    with BatchNormOps() as plain_ops, running_stats_mode(m.net, fold=False):
        _, g_plain = input_gradient(m.net, xin, y, create_graph=False)
    with BatchNormOps() as fold_ops, running_stats_mode(m.net, fold=True):
        _, g_fold = input_gradient(m.net, xin, y, create_graph=False)
    assert plain_ops.count >= 2 * pairs and fold_ops.count == 0  # forward and backward; none when folded
    torch.testing.assert_close(g_fold, g_plain, rtol=1e-9, atol=1e-12 * g_plain.abs().max().item())
    assert m.training and all(mod.training for mod in m.modules())  # modes restored, forwards unpatched
    assert not any("forward" in vars(mod) for mod in m.modules())
    m.net.eval()
    with _fold.folded_batchnorm(m.net, double_backprop=True) as folded:  # every conv patched, pairs counted
        assert folded == pairs and all("forward" in vars(c) for c in m.net.modules() if isinstance(c, nn.Conv2d))
    assert not any("forward" in vars(mod) for mod in m.modules())


def test_size_rule_keeps_batchnorm_where_the_weight_outweighs_the_feature_map():
    """Fold iff batch × output pixels ≥ the weight per output channel. resnet18_small, width 4, batch 4 at 8 px."""
    m = model("resnet18_small").train()
    x, y = batch(8)
    names = {c: n for n, c in m.net.named_modules()}
    with BatchNormOps() as ops, running_stats_mode(m.net):
        input_gradient(m.net, m.normalize(x), y, create_graph=False)
        folded = {names[c]: c.forward.fold for c, _ in conv_bn_pairs(m.net)}
    assert folded["conv1"] and folded["layer1.0.conv1"]  # 4·8·8 = 256 pixels ≥ 3·9, 4·9
    assert folded["layer2.0.conv1"] and not folded["layer2.0.conv2"]  # 4·4·4 = 64 ≥ 4·9, < 8·9
    assert folded["layer3.0.downsample.0"] and not folded["layer3.0.conv1"]  # 4·2·2 = 16 ≥ 8·1, < 8·9
    assert not folded["layer4.0.downsample.0"]  # 4·1·1 = 4 < 16·1
    assert ops.count == 2 * sum(not f for f in folded.values())  # the kept BatchNorms' forward and backward only


class Odd(nn.Module):
    """What folds and what must not: a conv with a bias before BN (folds), a conv whose output is also
    used elsewhere (must not), a BN after a non-conv (must not), a BN without affine parameters (folds)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.b3 = nn.BatchNorm2d(4)
        self.c4, self.b4 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4, affine=False)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        y = self.c2(x)
        x = torch.relu(self.b2(y)) + y  # c2's output is read twice: no folding
        x = self.b3(x * 2)  # no conv before it
        x = torch.relu(self.b4(self.c4(x)))
        return self.fc(x.mean((2, 3)))


def test_which_pairs_fold_and_that_odd_ones_stay_exact():
    torch.manual_seed(0)
    m = Odd().double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.3, 2.0)
    assert conv_bn_pairs(m) == [(m.c1, m.b1), (m.c4, m.b4)]
    net = Normalized(m).train()
    x, y = batch(6)
    for objective in ("exact", "lossdiff"):
        _, stats_f, grads_f = run(OBJECTIVES[objective], copy.deepcopy(net), x, y, fold=True)
        _, stats_p, grads_p = run(OBJECTIVES[objective], copy.deepcopy(net), x, y, fold=False)
        assert stats_f["reg"] == pytest.approx(stats_p["reg"], rel=1e-9)
        for pname, g in grads_p.items():
            torch.testing.assert_close(grads_f[pname], g, rtol=1e-9, atol=1e-12, msg=pname)


def test_models_without_batchnorm_or_untraceable_run_unfolded():
    torch.manual_seed(0)
    convnet = create_model("convnet", num_classes=5, width=8, depth=2, resolution=8)
    assert conv_bn_pairs(convnet) == []

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.b(self.c(x)) if x.sum() > 0 else x  # fx cannot trace this

    assert conv_bn_pairs(DataDependent()) == []


# --------------------------------------------------------------------------- evaluation's constant folding

@pytest.mark.parametrize("name, res", [("resnet18_small", 8), ("resnet18", 32)])
def test_inference_copy_computes_the_same_function_and_input_gradient(name, res):
    from guardx.models.fold import folded_for_inference

    m = model(name).train()  # the copy is in eval mode whatever the original's mode
    before = copy.deepcopy(m.state_dict())
    folded = folded_for_inference(m)
    assert m.training and not folded.training
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters())
    for key, value in m.state_dict().items():  # the original is untouched, running statistics included
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    x, y = batch(res)
    reference = m.eval()
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss_r = nn.functional.cross_entropy(reference(xr), y)
    loss_f = nn.functional.cross_entropy(folded(xf), y)
    assert loss_f.item() == pytest.approx(loss_r.item(), rel=1e-10)
    (g_r,), (g_f,) = torch.autograd.grad(loss_r, xr), torch.autograd.grad(loss_f, xf)
    torch.testing.assert_close(g_f, g_r, rtol=1e-9, atol=1e-12)


def test_inference_copy_of_a_model_without_batchnorm_is_a_plain_copy():
    from guardx.models.fold import folded_for_inference

    torch.manual_seed(0)
    convnet = create_model("convnet", num_classes=5, width=8, depth=2, resolution=8)
    folded = folded_for_inference(convnet)
    x = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(folded(x), convnet.eval()(x), rtol=0, atol=0)
    assert folded is not convnet
