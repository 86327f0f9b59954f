"""The convolution with a written-out double backward (guardx/objectives/_conv.py) against autograd's own
formula, in fp64: the output, the input gradient, and every parameter gradient of a loss built on the input
gradient (what GUARD exact/cure and gradnorm differentiate); dense gradient layouts; the contract."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from guardx.objectives import _conv

GEOMETRIES = [  # (in, out, kernel, stride, padding, dilation, groups, bias, input size)
    (3, 4, 7, 2, 3, 1, 1, False, 13),  # a ResNet stem: odd input, so the strided backward must keep its size
    (4, 6, 3, 1, 1, 1, 1, True, 6),
    (4, 6, 1, 2, 0, 1, 1, False, 7),  # a 1×1 strided shortcut
    (4, 4, 3, 1, 2, 2, 2, True, 6),  # dilated, grouped
]


def _setup(geometry, seed=0):
    cin, cout, k, s, p, d, g, bias, n = geometry
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=bias).double()
    x = torch.randn(3, cin, n, n, dtype=torch.double)
    head = torch.randn(cout, dtype=torch.double)
    return conv, x, head


def _input_gradient_loss(conv_fn, conv, x, head):
    """A loss with a non-trivial second derivative: ‖∇_x ℓ(x)‖² with ℓ = Σ softplus(y)·head."""
    x = x.clone().requires_grad_(True)
    y = conv_fn(conv, x, conv.weight, conv.bias)
    loss = (F.softplus(y) * head.view(1, -1, 1, 1)).sum()
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    return y, gx, gx.pow(2).sum() + 0.1 * loss


def _reference(conv, x, weight, bias):
    return conv._conv_forward(x, weight, bias)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_every_gradient_equals_autograds(geometry):
    conv, x, head = _setup(geometry)
    params = [p for p in conv.parameters()]
    y_ref, gx_ref, reg_ref = _input_gradient_loss(_reference, conv, x, head)
    grads_ref = torch.autograd.grad(reg_ref, params)
    y, gx, reg = _input_gradient_loss(_conv.conv2d, conv, x, head)
    grads = torch.autograd.grad(reg, params)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    for p, g, g_ref in zip(params, grads, grads_ref):
        assert g_ref.abs().max() > 0
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
        assert g.stride() == p.stride()  # dense, the parameter's layout


def test_autograds_own_double_backward_transposes_the_weight_gradient():
    """Why the module exists (if a torch release makes this dense, the copy in param_grads becomes a no-op)."""
    conv, x, head = _setup(GEOMETRIES[1])
    _, _, reg = _input_gradient_loss(_reference, conv, x, head)
    (gw,) = torch.autograd.grad(reg - 0.1 * reg.detach(), [conv.weight])  # only the double-backward part
    _, gx, _ = _input_gradient_loss(_reference, conv, x, head)
    (gw_double,) = torch.autograd.grad(gx.pow(2).sum(), [conv.weight])
    assert not gw_double.is_contiguous()
    assert gw.shape == conv.weight.shape


def test_first_order_gradients_and_no_wasted_input_gradient():
    conv, x, head = _setup(GEOMETRIES[0])
    x_leaf = x.clone().requires_grad_(True)
    loss = (_conv.conv2d(conv, x_leaf, conv.weight, conv.bias) * 0.5).pow(2).sum()
    loss.backward()
    assert x_leaf.grad is None  # the pass's leaf input: a plain backward never computes its gradient
    x_ref = x.clone().requires_grad_(True)
    w_ref = conv.weight.detach().clone().requires_grad_(True)
    F.conv2d(x_ref, w_ref, None, 2, 3).mul(0.5).pow(2).sum().backward()
    torch.testing.assert_close(conv.weight.grad, w_ref.grad, rtol=1e-12, atol=1e-12)


def test_activation_inputs_still_get_their_gradient():
    """Inside a network the convolution's input is an activation: its gradient carries the chain."""
    conv, x, head = _setup(GEOMETRIES[1])
    x_leaf = x.clone().requires_grad_(True)
    h = torch.tanh(x_leaf)
    _conv.conv2d(conv, h, conv.weight, conv.bias).pow(2).sum().backward()
    x_ref = x.clone().requires_grad_(True)
    conv._conv_forward(torch.tanh(x_ref), conv.weight, conv.bias).pow(2).sum().backward()
    torch.testing.assert_close(x_leaf.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


def test_a_weight_gradient_with_create_graph_fails_loudly():
    conv, x, head = _setup(GEOMETRIES[1])
    y = _conv.conv2d(conv, x.clone().requires_grad_(True), conv.weight, conv.bias)
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(y.pow(2).sum(), conv.weight, create_graph=True)


def test_unsupported_convolutions_run_their_own_forward():
    conv = nn.Conv2d(2, 2, 3, padding="same", padding_mode="reflect").double()
    assert not _conv.supported(conv)
    x = torch.randn(1, 2, 5, 5, dtype=torch.double)
    y = _conv.conv2d(conv, x, conv.weight, conv.bias)
    assert y.grad_fn is not None and "_Conv" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, conv(x))


def test_autocast_lowers_precision_as_it_does_for_conv2d():
    """Under autocast the convolution runs in the autocast dtype like ``F.conv2d`` (autocast does not reach aten
    calls inside an autograd Function on its own); gradients agree with autograd's to bf16 rounding."""
    conv, x, head = _setup(GEOMETRIES[1])
    conv, x, head = conv.float(), x.float(), head.float()
    params = list(conv.parameters())
    results = []
    for fn in (_reference, _conv.conv2d):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, gx, reg = _input_gradient_loss(fn, conv, x, head)
        results.append((y, gx, torch.autograd.grad(reg, params)))
    (y_ref, gx_ref, g_ref), (y, gx, g) = results
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx.float(), gx_ref.float(), rtol=2e-2, atol=2e-2 * gx_ref.abs().max().item())
    for a, b in zip(g, g_ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 stays float64, as autocast leaves it
        assert _conv.conv2d(conv.double(), x.double(), conv.weight, conv.bias).dtype == torch.float64
