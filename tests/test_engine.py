"""The single-process engine (guardx/distributed/engine.py) against hand-written optimiser steps: the fp16
gradient scaler, gradient clipping and gradient accumulation. DDP and DeepSpeed build on this engine
(tests/test_distributed.py compares them with it)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from guardx.distributed.engine import Engine
from guardx.models import create_model
from guardx.objectives import ObjectiveStep, build_objective

LR = 0.1


def linear(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 5))


def convnet(seed=0):
    """No BatchNorm (instance norm): a sample's gradient does not depend on its batch-mates."""
    torch.manual_seed(seed)
    return create_model("convnet", num_classes=5, width=4, depth=2, resolution=8, mean=[0.5] * 3, std=[0.25] * 3)


def batch(n=8, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.rand(n, 3, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)


def engine(model, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    return Engine(ObjectiveStep(model, build_objective("plain")), opt, **kw)


def one_step(eng, x, y) -> bool:
    loss, _ = eng(x, y)
    eng.backward(loss)
    return eng.step()


def params(model):
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------- fp16: autocast + GradScaler

def test_fp16_step_is_sgd_on_the_unscaled_autocast_gradient():
    """The scaler multiplies the loss by 2^16 and divides the gradient again before the step: the update is
    SGD on the gradient of the fp16-autocast loss."""
    model = linear()
    ref = copy.deepcopy(model)
    x, y = batch(scale=0.1)
    eng = engine(model, precision="fp16")
    loss, _ = eng(x, y)
    assert loss.dtype == torch.float32 and eng.scaler is not None and eng.scaler.get_scale() == 2.0 ** 16
    eng.backward(loss)
    grads = [p.grad.clone() for p in model.parameters()]
    assert eng.step()
    with torch.autocast("cpu", dtype=torch.float16):
        ref_loss = F.cross_entropy(ref(x), y)
    ref_grads = torch.autograd.grad(ref_loss, list(ref.parameters()))
    for g, rg in zip(grads, ref_grads):  # .grad holds the scaled gradient until the step unscales it (scaling
        # keeps small fp16 gradients out of the subnormal range, so it is a little more precise than rg)
        torch.testing.assert_close(g / 2.0 ** 16, rg, rtol=1e-2, atol=1e-7)
    for p, rp, rg in zip(model.parameters(), ref.parameters(), ref_grads):
        torch.testing.assert_close(p.detach(), rp.detach() - LR * rg, rtol=0, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step
    assert eng.state_dict()["scaler"]["scale"] == 2.0 ** 16


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    model = linear()
    before = params(model)
    eng = engine(model, precision="fp16")
    x, y = batch(scale=1e4)  # the scaled fp16 gradient overflows
    assert one_step(eng, x, y)  # an optimiser step was due, and skipped by the scaler
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # no inf/NaN reached the weights
    assert eng.scaler.get_scale() == 2.0 ** 15
    x, y = batch(scale=0.1)
    one_step(eng, x, y)  # the next ordinary step goes through
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_fp16_clips_the_unscaled_gradient():
    """Unscale before clip: the clip acts on the true gradient norm, not on 2^16 times it."""
    model = linear()
    ref = copy.deepcopy(model)
    x, y = batch(scale=0.1)
    with torch.autocast("cpu", dtype=torch.float16):
        ref_loss = F.cross_entropy(ref(x), y)
    ref_grads = torch.autograd.grad(ref_loss, list(ref.parameters()))
    norm = torch.cat([g.flatten() for g in ref_grads]).norm()
    clip = 0.5 * norm.item()
    one_step(engine(model, precision="fp16", grad_clip=clip), x, y)
    for p, rp, rg in zip(model.parameters(), ref.parameters(), ref_grads):
        torch.testing.assert_close(p.detach(), rp.detach() - LR * rg * clip / (norm + 1e-6), rtol=0, atol=1e-7)


# --------------------------------------------------------------------------- clipping

@pytest.mark.parametrize("factor", [0.3, 3.0])
def test_clipping_is_sgd_on_the_gradient_clipped_by_its_total_norm(factor):
    """clip = factor x the gradient's total norm (over all parameters together): below 1 the step is SGD on
    g * clip / ||g||, above 1 plain SGD."""
    model = convnet()
    ref = copy.deepcopy(model)
    x, y = batch()
    x = F.interpolate(x, size=8)
    ref_grads = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    norm = torch.cat([g.flatten() for g in ref_grads]).norm()
    one_step(engine(model, grad_clip=factor * norm.item()), x, y)
    shrink = min(1.0, (factor * norm / (norm + 1e-6)).item())
    for p, rp, rg in zip(model.parameters(), ref.parameters(), ref_grads):
        torch.testing.assert_close(p.detach(), rp.detach() - LR * shrink * rg, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------- accumulation

def _sgd_engine(model, grad_accum):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return Engine(ObjectiveStep(model, build_objective("plain")), opt, sched, grad_accum=grad_accum)


def test_two_micro_batches_of_half_equal_one_step_of_the_whole_batch():
    """Three optimiser steps (momentum, weight decay, a per-step schedule): accumulating 2 micro-batches of
    B/2 gives the weights and optimiser state of one step on B each time, to 1e-6; a short group at an
    epoch's end (1 micro-batch) is one step on that micro-batch alone."""
    whole_model, accum_model = convnet(), convnet()
    whole, accum = _sgd_engine(whole_model, 1), _sgd_engine(accum_model, 2)
    for step in range(3):
        x, y = batch(n=8, seed=10 + step)
        x = F.interpolate(x, size=8)
        one_step(whole, x, y)
        accum.start_step(2)
        assert [one_step(accum, xh, yh) for xh, yh in zip(x.chunk(2), y.chunk(2))] == [False, True]
        for p, q in zip(accum_model.parameters(), whole_model.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    ref_state, state = whole.optimizer.state_dict(), accum.optimizer.state_dict()
    assert state["param_groups"] == ref_state["param_groups"]  # the schedule advanced once per step
    for k, entry in ref_state["state"].items():
        torch.testing.assert_close(state["state"][k]["momentum_buffer"], entry["momentum_buffer"], rtol=0, atol=1e-6)

    x, y = batch(n=4, seed=20)
    x = F.interpolate(x, size=8)
    accum.start_step(1)
    assert one_step(accum, x, y)
    one_step(whole, x, y)
    for p, q in zip(accum_model.parameters(), whole_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="1..2 micro-batches"):
        accum.start_step(3)
