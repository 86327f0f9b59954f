"""The GUARD objectives against direct, per-sample reference computations."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from guardx.models import Normalized, create_model
from guardx.objectives import build_objective
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


@pytest.mark.parametrize("name, params", [("guard", {"mode": "exact"}), ("guard", {"mode": "lossdiff"}),
                                          ("guard", {"mode": "cure"}), ("gradnorm", {}), ("adv", {"steps": 2})])
def test_regulariser_passes_leave_bn_running_stats_alone(name, params):
    """Train mode: one BatchNorm update per step, the one the CE forward makes (for guard/gradnorm exactly
    what a plain forward on the batch does). Eval mode: no change at all."""
    m = small_model().train()
    x, y = batch()
    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref(x)  # the one train-mode forward the CE term is allowed
    build_objective(name, **params)(m, x, y)
    for (key, b), rb in zip(m.named_buffers(), ref.buffers()):
        if key.endswith("num_batches_tracked"):
            assert int(b) == 1
        elif name != "adv":  # adv's CE forward sees the adversarial batch, not x
            assert torch.allclose(b.double(), rb.double())
    m.eval()
    before = [b.clone() for b in m.buffers()]
    build_objective(name, **params)(m, x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, m.buffers()))


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


def test_pixel_space_perturbs_the_model_input():
    m = small_model().eval()
    x, y = batch()
    _, st_norm = build_objective("guard", mode="lossdiff", beta=1.0, space="normalized")(m, x, y)
    _, st_pix = build_objective("guard", mode="lossdiff", beta=1.0, space="pixel")(m, x, y)
    assert st_norm["reg"] != pytest.approx(st_pix["reg"])


def test_unknown_objective():
    with pytest.raises(ValueError, match="did you mean 'guard'"):
        build_objective("gaurd")
    with pytest.raises(ValueError, match="mode"):
        build_objective("guard", mode="fast")
