"""The GUARD objectives against direct, per-sample reference computations."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from guardx.config import load_config
from guardx.distributed.deepspeed_engine import check_zero_stage
from guardx.errors import ConfigError
from guardx.models import Normalized, create_model
from guardx.objectives import OBJECTIVES, ObjectiveStep, build_objective
from guardx.objectives._common import unit_direction


def small_model(seed=0, width=4, bn=True):
    torch.manual_seed(seed)
    if bn:
        m = create_model("resnet18_small", num_classes=5, width=width, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    else:
        m = create_model("convnet", num_classes=5, width=8, depth=2, resolution=8, mean=[0.5] * 3, std=[0.25] * 3)
    return m.double()


def batch(n=5, res=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, res, res, generator=g, dtype=torch.double), torch.randint(0, 5, (n,), generator=g)


def _per_sample_unit(g):
    return torch.stack([gi / gi.norm() if gi.norm() > 0 else torch.zeros_like(gi) for gi in g])


def _finish_reference(model, xin, y, reg):
    """(ce, reg, grad): the regulariser's gradient is taken before the train-mode CE forward updates the
    BatchNorm running statistics its graph reads; then the CE gradient is added."""
    params = list(model.parameters())
    g_reg = torch.autograd.grad(reg, params, allow_unused=True)
    model.train()
    ce = F.cross_entropy(model.net(xin), y)
    g_ce = torch.autograd.grad(ce, params)
    grad = torch.cat([(gc + (torch.zeros_like(gc) if gr is None else gr)).flatten() for gr, gc in zip(g_reg, g_ce)])
    return ce.item(), reg.item(), grad


def reference_exact(model, x, y, h, lam):
    """Eq. 11 one sample at a time, in the normalised space, BN in eval mode; then CE in train mode."""
    net = model.net
    xin = model.normalize(x).detach()
    regs = []
    model.eval()
    for i in range(len(y)):
        xi = xin[i:i + 1].clone().requires_grad_(True)
        g0, = torch.autograd.grad(F.cross_entropy(net(xi), y[i:i + 1]), xi, create_graph=True)
        z = _per_sample_unit(g0.detach())
        xz = (xin[i:i + 1] + h * z).requires_grad_(True)
        gz, = torch.autograd.grad(F.cross_entropy(net(xz), y[i:i + 1]), xz, create_graph=True)
        regs.append((gz - g0).pow(2).sum())
    return _finish_reference(model, xin, y, lam * torch.stack(regs).mean())


def reference_lossdiff(model, x, y, h, beta):
    net = model.net
    xin = model.normalize(x).detach()
    model.eval()
    x0 = xin.clone().requires_grad_(True)
    clean = F.cross_entropy(net(x0), y)
    g, = torch.autograd.grad(F.cross_entropy(net(x0), y, reduction="sum"), x0)
    pert = F.cross_entropy(net(xin + h * _per_sample_unit(g)), y)
    return _finish_reference(model, xin, y, beta * (pert - clean).abs())


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("low_memory", [True, False])
def test_exact_matches_per_sample_reference(low_memory):
    m = small_model().train()
    x, y = batch()
    ref_model = copy.deepcopy(m)
    loss, stats = build_objective("guard", mode="exact", h=3.0, lam=100.0, low_memory=low_memory)(m, x, y)
    ref_ce, ref_reg, ref_grad = reference_exact(ref_model, x, y, 3.0, 100.0)
    assert stats["reg"] == pytest.approx(ref_reg, rel=1e-6)
    assert stats["ce"] == pytest.approx(ref_ce, rel=1e-6)
    assert loss.item() == pytest.approx(ref_ce + ref_reg, rel=1e-9)
    assert torch.allclose(grads_of(m, loss), ref_grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("low_memory", [True, False])
def test_lossdiff_matches_reference(low_memory):
    m = small_model().train()
    x, y = batch()
    ref_model = copy.deepcopy(m)
    loss, stats = build_objective("guard", mode="lossdiff", h=3.0, beta=0.5, low_memory=low_memory)(m, x, y)
    _, ref_reg, ref_grad = reference_lossdiff(ref_model, x, y, 3.0, 0.5)
    assert stats["reg"] == pytest.approx(ref_reg, rel=1e-6)
    assert torch.allclose(grads_of(m, loss), ref_grad, rtol=1e-6, atol=1e-9)


def test_cure_is_batch_mean_gradient_unsquared_norm():
    m = small_model().eval()
    x, y = batch()
    _, st_exact = build_objective("guard", mode="exact", lam=1.0)(copy.deepcopy(m), x, y)
    _, st_cure = build_objective("guard", mode="cure", lam=1.0)(copy.deepcopy(m), x, y)
    # recompute cure's definition directly: lam * mean_i || d/dx_i [L(x+hz) - L(x)] || with L the batch mean
    net, xin = m.net, m.normalize(x).detach()
    x0 = xin.clone().requires_grad_(True)
    g0, = torch.autograd.grad(F.cross_entropy(net(x0), y), x0)
    z = unit_direction(g0)
    xz = (xin + 3.0 * z).requires_grad_(True)
    gz, = torch.autograd.grad(F.cross_entropy(net(xz), y), xz)
    expected = (gz - g0).flatten(1).norm(dim=1).mean()
    assert st_cure["reg"] == pytest.approx(expected.item(), rel=1e-6)
    assert st_cure["reg"] < st_exact["reg"]


def test_zero_gradient_samples_are_safe():
    assert torch.equal(unit_direction(torch.zeros(3, 2, 2)), torch.zeros(3, 2, 2))

    class DeadForZero(nn.Module):  # relu(x) at x = 0 has zero gradient: sample 0 has no input gradient
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 3, bias=True)

        def forward(self, x):
            return self.fc(torch.relu(x).flatten(1))

    m = Normalized(DeadForZero()).double()
    x = torch.rand(3, 3, 2, 2, dtype=torch.double)
    x[0] = 0
    y = torch.tensor([0, 1, 2])
    for mode in ("exact", "cure", "lossdiff"):
        loss, stats = build_objective("guard", mode=mode)(m, x, y)
        loss.backward()
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
        assert all(torch.isfinite(p.grad).all() for p in m.parameters())
        m.zero_grad()


@pytest.mark.parametrize("low_memory", [True, False])
def test_double_backprop_reaches_the_weights(low_memory):
    """Second-order terms reach the weights: GUARD exact's weight gradient is not the CE gradient, and
    for gradnorm (no stop-gradient direction inside) the gradient equals a finite difference of the loss."""
    m = small_model(bn=False).eval()
    x, y = batch(4)
    params = list(m.parameters())
    loss, _ = build_objective("guard", mode="exact", lam=1.0, low_memory=low_memory)(m, x, y)
    grads = torch.autograd.grad(loss, params)
    ce_grads = torch.autograd.grad(F.cross_entropy(m(x), y), params)
    assert max((g - c).abs().max().item() for g, c in zip(grads, ce_grads)) > 1e-4

    obj = build_objective("gradnorm", lam_g=1.0, low_memory=low_memory)
    grads = torch.autograd.grad(obj(m, x, y)[0], params)
    k, w = next((i, p) for i, p in enumerate(params) if p.dim() == 4)
    d = torch.randn_like(w)
    step = 1e-5
    with torch.no_grad():
        w.add_(step * d)
    up = obj(m, x, y)[0].item()
    with torch.no_grad():
        w.sub_(2 * step * d)
    down = obj(m, x, y)[0].item()
    assert (up - down) / (2 * step) == pytest.approx((grads[k] * d).sum().item(), rel=1e-5)


def test_shared_clean_pass_without_batchnorm_gives_same_gradients():
    """ConvNet (instance norm) lets the CE term reuse the regulariser's clean pass; gradients equal the
    un-shared computation."""
    m = small_model(bn=False).train()
    x, y = batch()
    ref = copy.deepcopy(m)
    loss, _ = build_objective("guard", mode="exact")(m, x, y)
    _, _, ref_grad = reference_exact(ref, x, y, 3.0, 100.0)
    assert torch.allclose(grads_of(m, loss), ref_grad, rtol=1e-6, atol=1e-8)


def test_gradnorm_value():
    m = small_model().eval()
    x, y = batch()
    _, stats = build_objective("gradnorm", lam_g=0.1)(m, x, y)
    xin = m.normalize(x).detach().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(m.net(xin), y, reduction="sum"), xin)
    assert stats["reg"] == pytest.approx(0.1 * g.flatten(1).pow(2).sum(1).mean().item(), rel=1e-6)


class _Hidden(nn.Module):
    """Calls the model; hides its normalising wrapper from split_normalizer."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("name, params", [("guard", {"mode": "lossdiff", "beta": 1.0}), ("guard", {"mode": "exact"}),
                                          ("gradnorm", {})])
def test_space_says_which_tensor_is_perturbed(name, params):
    """normalized: the tensor after the model's normaliser (= pixel space of the inner network fed normalised
    images); pixel: the images the model receives (= any space of a model whose normaliser is hidden)."""
    m = small_model().eval()
    x, y = batch()
    reg = {space: build_objective(name, space=space, **params)(m, x, y)[1]["reg"] for space in ("normalized", "pixel")}
    inner = build_objective(name, space="pixel", **params)(m.net, m.normalize(x), y)[1]["reg"]
    hidden = build_objective(name, space="normalized", **params)(_Hidden(m), x, y)[1]["reg"]
    assert reg["normalized"] == pytest.approx(inner, rel=1e-9)
    assert reg["pixel"] == pytest.approx(hidden, rel=1e-9)
    assert reg["pixel"] != pytest.approx(reg["normalized"], rel=1e-3)  # std != 1: the spaces differ


def test_unknown_objective():
    with pytest.raises(ValueError, match="did you mean 'guard'"):
        build_objective("gaurd")
    with pytest.raises(ValueError, match="mode"):
        build_objective("guard", mode="fast")


# --------------------------------------------------------------------------- every registered objective
# (parametrized over the registry, timm-style: a new objective is held to the DESIGN contract by registering it)

NAMES = OBJECTIVES.names()
# DESIGN: stats carry "reg" for the regularised objectives; a new objective must be classified here
REGULARISED = {"plain": False, "adv": False, "guard": True, "gradnorm": True}
DIFFERENTIATES_IN_FORWARD = {"plain": False, "adv": True, "guard": True, "gradnorm": True}


def default_params(name, *overrides):
    """The parameters ``objective.name=<name>`` gives from the config (its defaults, plus ``overrides``)."""
    return load_config(None, [f"objective.name={name}", *overrides]).objective.params()


# every objective with its config defaults, plus GUARD's other modes and its keep-the-graphs path
CASES = [(name, default_params(name)) for name in NAMES] + [
    ("guard", default_params("guard", "objective.mode=lossdiff")),
    ("guard", default_params("guard", "objective.mode=cure")),
    ("guard", {**default_params("guard"), "low_memory": False}),
]
CASE_IDS = [f"{n}-{p.get('mode', '')}{'' if p.get('low_memory', True) else '-keepgraphs'}".rstrip("-")
            for n, p in CASES]


def test_every_objective_is_classified():
    assert set(NAMES) == set(REGULARISED) == set(DIFFERENTIATES_IN_FORWARD), \
        "a new objective: say whether it is regularised and whether it differentiates in its forward"


@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
def test_contract_scalar_differentiable_loss_and_stats(name, params):
    """loss: a differentiable 0-d tensor whose backward gives every parameter a finite gradient; stats: host
    floats with "ce" (and "reg" exactly for the regularised objectives), consistent with the loss."""
    m = small_model().train()
    x, y = batch()
    loss, stats = build_objective(name, **params)(m, x, y)
    assert loss.dim() == 0 and loss.requires_grad and loss.dtype == torch.double
    assert all(type(v) is float for v in stats.values()), stats
    assert "ce" in stats and ("reg" in stats) == REGULARISED[name], stats
    assert loss.item() == pytest.approx(stats["ce"] + stats.get("reg", 0.0), rel=1e-6)
    if "loss" in stats:
        assert stats["loss"] == pytest.approx(loss.item(), rel=1e-6)
    if REGULARISED[name]:
        assert stats["reg"] > 0
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
def test_batchnorm_statistics_move_only_with_the_ce_forward(name, params):
    """Train mode: exactly one train-mode forward per step, the CE term's, and the running statistics end
    where a copy of the model running only F.cross_entropy(model(x), y) in train mode puts them (for adv,
    on the adversarial batch, inside the eps-ball); the regulariser's passes leave them alone. Eval mode:
    nothing moves."""
    m = small_model().train()
    x, y = batch()
    ref = copy.deepcopy(m)
    train_inputs = []
    hook = m.net.register_forward_pre_hook(
        lambda module, args: train_inputs.append(args[0].detach().clone()) if module.training else None)
    build_objective(name, **params)(m, x, y)
    hook.remove()
    assert len(train_inputs) == 1, f"{len(train_inputs)} train-mode forwards"
    ce_input = m.denormalize(train_inputs[0])
    if name == "adv":
        assert (ce_input - x).abs().max() <= params["eps"] + 1e-9 and not torch.allclose(ce_input, x)
    else:
        torch.testing.assert_close(ce_input, x, rtol=0, atol=1e-12)
    F.cross_entropy(ref(ce_input), y)
    for (key, b), rb in zip(m.named_buffers(), ref.buffers()):
        if key.endswith("num_batches_tracked"):
            assert int(b) == int(rb) == 1, key
        else:
            torch.testing.assert_close(b, rb, rtol=0, atol=1e-12, msg=key)

    m.eval()
    before = [b.clone() for b in m.buffers()]
    build_objective(name, **params)(m, x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, m.buffers()))


@pytest.mark.parametrize("name", NAMES)
def test_backward_in_forward_is_declared_exactly_when_the_forward_differentiates(name, monkeypatch):
    """The capability engines read (ZeRO-3 refusal) matches what the objective's forward really does."""
    calls = []
    real_grad, real_backward = torch.autograd.grad, torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append("grad") or real_grad(*a, **k))
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: calls.append("backward") or real_backward(*a, **k))
    m = small_model(bn=False).train()
    x, y = batch()
    step = ObjectiveStep(m, build_objective(name, **default_params(name)))
    step(x, y)
    monkeypatch.undo()
    assert bool(calls) == DIFFERENTIATES_IN_FORWARD[name]
    if calls:
        assert isinstance(step.backward_in_forward, str) and step.backward_in_forward
    else:
        assert step.backward_in_forward is None


class _Declares:
    def __init__(self, why):
        self.backward_in_forward = why

    def __repr__(self):
        return "Stub()"

    def __call__(self, model, x, y):
        raise AssertionError("not run")


def test_zero3_refusal_reads_the_declared_capability():
    """check_zero_stage names the objective's own reason (no class names involved); an objective that does
    not differentiate in its forward gets the checkpoint reason; ZeRO 0-2 pass."""
    stage = {s: load_config(None, ["distributed.backend=deepspeed", f"distributed.zero_stage={s}"]).distributed
             for s in (2, 3)}
    declaring = ObjectiveStep(nn.Linear(2, 2), _Declares("it consults an oracle inside the forward"))
    with pytest.raises(ConfigError, match=r"cannot train Stub\(\): it consults an oracle inside the forward"):
        check_zero_stage(stage[3], declaring)
    silent = ObjectiveStep(nn.Linear(2, 2), _Declares(None))
    with pytest.raises(ConfigError, match="checkpoints cover ZeRO stages 0-2") as err:
        check_zero_stage(stage[3], silent)
    assert "cannot train" not in str(err.value)
    for step in (declaring, silent):
        check_zero_stage(stage[2], step)
    for name in NAMES:  # the registered objectives: their own reason, when they declare one
        step = ObjectiveStep(nn.Linear(2, 2), build_objective(name, **default_params(name)))
        with pytest.raises(ConfigError) as err:
            check_zero_stage(stage[3], step)
        assert (step.backward_in_forward or "checkpoints cover ZeRO stages 0-2") in str(err.value)


def test_parameter_gradients_come_back_in_their_parameters_layout():
    """param_grads hands dense gradients over even where autograd's own convolution double backward returns a
    transposed one (else the engine's sum with the cross-entropy gradient runs a slow strided kernel)."""
    from guardx.objectives._common import inject, param_grads

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.double, requires_grad=True)
    (gx,) = torch.autograd.grad(torch.tanh(conv(x)).pow(2).sum(), x, create_graph=True)
    reg = gx.pow(2).sum()
    (raw,) = torch.autograd.grad(reg, conv.weight, retain_graph=True)
    assert raw.stride() != conv.weight.stride()  # what autograd hands back (the case this guards)
    grads = param_grads(reg, [conv.weight, conv.bias])
    assert grads[0].stride() == conv.weight.stride() and torch.equal(grads[0], raw)
    # _Inject scales them in place by the incoming factor and hands them to .grad
    (0.5 * inject([conv.weight, conv.bias], grads)).backward()
    torch.testing.assert_close(conv.weight.grad, 0.5 * raw)
    assert conv.weight.grad.stride() == conv.weight.stride()
