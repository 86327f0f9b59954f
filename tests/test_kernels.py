"""The Triton kernels against their PyTorch references.

On CPU they run under the Triton interpreter (conftest sets TRITON_INTERPRET=1 before any kernel is
defined): about a thousand programs per second, so grids stay small. Irregular row lengths check the
masking; ``block=`` overrides reach the tiled (multi-program-per-row) paths on small rows. fp16/bf16
are compared with the reference evaluated in fp32 on the same (rounded) inputs, so the tolerance is
one rounding of the output.
"""
import copy

import pytest
import torch

from guardx.kernels import kernel_backend, perturb_along, perturb_along_reference, rowwise_sqdist, rowwise_sqdist_reference
from guardx.kernels._dispatch import HAS_TRITON, use_triton
from guardx.kernels.perturb import perturb_along_triton
from guardx.kernels.sqdist import rowwise_sqdist_backward_triton, rowwise_sqdist_forward_triton

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

SHAPES = [(5, 1000), (3, 3, 17, 19)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
DTYPES = list(TOL)


def pair(shape, dtype, seed=0, zero_row=None):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    if zero_row is not None:
        b[zero_row] = 0
    return a, b


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [None, 128])  # None: one program per row (fused); 128: tiled rows
def test_perturb_along_matches_reference(shape, dtype, block):
    x, g = pair(shape, dtype, zero_row=1)
    out = perturb_along_triton(x, g, 3.0, block=block)
    assert out.dtype == dtype and out.shape == x.shape
    close(out, perturb_along_reference(x.float(), g.float(), 3.0), dtype)
    assert torch.equal(out[1], x[1])  # a zero gradient does not move the sample
    # the step has length h in every row with a nonzero direction
    steps = (out.float() - x.float()).flatten(1).norm(dim=1)
    torch.testing.assert_close(steps[[0, 2]], torch.full((2,), 3.0), rtol=2 * TOL[dtype]["rtol"], atol=0.05)


def test_perturb_along_channels_last_and_strided_inputs():
    x, g = pair((2, 3, 5, 7), torch.float32)
    expected = perturb_along_reference(x, g, 0.5)
    xc, gc = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    out = perturb_along_triton(xc, gc, 0.5)
    assert out.is_contiguous(memory_format=torch.channels_last)  # used in place, not copied to NCHW
    close(out, expected, torch.float32)
    xt, gt = x.transpose(2, 3), g.transpose(2, 3)  # not dense in either format: copied
    close(perturb_along_triton(xt, gt, 0.5), perturb_along_reference(xt, gt, 0.5), torch.float32)


def test_perturb_along_autograd_passes_gradient_to_x_only():
    x, g = pair((3, 40), torch.float32)
    x.requires_grad_(True)
    g.requires_grad_(True)
    w = torch.randn(3, 40)
    with kernel_backend("triton"):
        out = perturb_along(x, g, 2.0)
    (gx,) = torch.autograd.grad((out * w).sum(), x)
    assert torch.equal(gx, w)
    assert out.grad_fn is not None and (out * w).sum().grad_fn is not None
    ref = perturb_along_reference(x, g, 2.0)
    rx, rg = torch.autograd.grad((ref * w).sum(), [x, g], allow_unused=True)
    assert torch.equal(rx, w) and rg is None  # the reference treats the direction as a stop-gradient too


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [None, 64])
def test_rowwise_sqdist_forward_matches_reference(shape, dtype, block):
    a, b = pair(shape, dtype, zero_row=0)
    out = rowwise_sqdist_forward_triton(a, b, block=block)
    assert out.dtype == dtype and out.shape == (shape[0],)
    close(out, rowwise_sqdist_reference(a.float(), b.float()), dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rowwise_sqdist_backward_matches_reference(shape, dtype):
    a, b = pair(shape, dtype)
    a.requires_grad_(True)
    b.requires_grad_(True)
    w = torch.randn(shape[0])
    with kernel_backend("triton"):
        out = rowwise_sqdist(a, b)
    ga, gb = torch.autograd.grad((out.float() * w).sum(), [a, b])
    a32, b32 = a.detach().float().requires_grad_(True), b.detach().float().requires_grad_(True)
    ra, rb = torch.autograd.grad((rowwise_sqdist_reference(a32, b32) * w).sum(), [a32, b32])
    assert ga.dtype == dtype and gb.dtype == dtype
    close(ga, ra, dtype)
    close(gb, rb, dtype)


def test_rowwise_sqdist_backward_tiled_one_sided_and_expanded_upstream():
    a, b = pair((4, 300), torch.float32)
    go = torch.tensor(0.25).expand(4)  # what .mean() sends back: stride 0
    ga, gb = rowwise_sqdist_backward_triton(a, b, go, True, False, block=64)
    assert gb is None
    close(ga, 0.5 * (a - b), torch.float32)
    a.requires_grad_(True)
    with kernel_backend("triton"):
        (only_a,) = torch.autograd.grad(rowwise_sqdist(a, b).mean(), a)  # b needs no gradient
    close(only_a, 0.5 * (a - b), torch.float32)


def test_rowwise_sqdist_is_deterministic_and_refuses_double_backward():
    a, b = pair((3, 500), torch.float32)
    first = rowwise_sqdist_forward_triton(a, b, block=32)
    assert torch.equal(first, rowwise_sqdist_forward_triton(a, b, block=32))
    a.requires_grad_(True)
    with kernel_backend("triton"):
        s = rowwise_sqdist(a, b).sum()
    (ga,) = torch.autograd.grad(s, a, create_graph=True)
    with pytest.raises(RuntimeError):  # once_differentiable: a silent zero Hessian would be wrong
        torch.autograd.grad(ga.sum(), a)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="same shape"):
        rowwise_sqdist_forward_triton(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="supports"):
        perturb_along_triton(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="kernel backend"):
        with kernel_backend("cuda"):
            pass


def test_dispatch(monkeypatch):
    cpu = torch.zeros(2, 3)
    assert not use_triton(cpu)  # auto: the reference on CPU tensors
    monkeypatch.setenv("GUARDX_KERNELS", "triton")
    assert use_triton(cpu)  # the interpreter is on in tests
    with kernel_backend("reference"):
        assert not use_triton(cpu)  # the context wins over the environment
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        use_triton(cpu)
    monkeypatch.setenv("GUARDX_KERNELS", "fast")
    with pytest.raises(ValueError, match="GUARDX_KERNELS"):
        use_triton(cpu)


@pytest.mark.parametrize("mode", ["exact", "lossdiff"])
def test_guard_objective_with_triton_kernels_matches_reference(mode):
    """End to end: the regulariser's gradient flows through the kernels' backward into gz and g0 and on
    through their double-backprop graphs to the weights, exactly as with the PyTorch reference."""
    from guardx.models import create_model
    from guardx.objectives import build_objective

    torch.manual_seed(0)
    model = create_model("resnet18_small", num_classes=4, width=4, mean=[0.5] * 3, std=[0.25] * 3).train()
    x, y = torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 3])
    results = []
    for backend, weight in (("reference", 1.0), ("triton", 1.0), ("reference", 0.0)):
        m = copy.deepcopy(model)
        with kernel_backend(backend):
            loss, stats = build_objective("guard", mode=mode, h=3.0, lam=weight, beta=0.5 * weight)(m, x, y)
        grads = torch.autograd.grad(loss, list(m.parameters()))
        results.append((loss.detach(), stats, torch.cat([g.flatten() for g in grads])))
    (l_ref, st_ref, g_ref), (l_tri, st_tri, g_tri), (_, _, g_no_reg) = results
    assert st_tri["reg"] == pytest.approx(st_ref["reg"], rel=1e-4)
    torch.testing.assert_close(l_tri, l_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_tri, g_ref, rtol=1e-3, atol=1e-5)
    assert (g_tri - g_no_reg).abs().max() > 1e-3  # the regulariser's gradient is really in there


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_on_gpu_at_imagenet_size(dtype):
    a, b = (t.cuda() for t in pair((32, 3, 224, 224), dtype))
    close(perturb_along_triton(a, b, 3.0), perturb_along_reference(a.float(), b.float(), 3.0), dtype)
    close(rowwise_sqdist_forward_triton(a, b), rowwise_sqdist_reference(a.float(), b.float()), dtype)
