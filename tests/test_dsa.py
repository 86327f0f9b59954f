"""Differentiable Siamese Augmentation: differentiable, siamese (same seed → same transform), shapes kept."""
from __future__ import annotations

import pytest
import torch

from guardx.data.dsa import DSA, FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_every_family_is_differentiable(family, per_sample):
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    dsa = DSA(family)
    assert torch.autograd.gradcheck(lambda t: dsa(t, 7, per_sample=per_sample), (x,), eps=1e-6, atol=1e-5,
                                    fast_mode=True)


def test_same_seed_same_transform_on_two_batches():
    """The real and the synthetic batch (different sizes) get one transform: an image shared by both
    batches comes out the same, whichever family the seed draws."""
    dsa = DSA()
    real, syn = torch.rand(7, 3, 12, 12), torch.rand(2, 3, 12, 12)
    real[3] = syn[1]
    drawn = set()
    for seed in range(40):
        out_real, out_syn = dsa(real, seed), dsa(syn, seed)
        assert out_real.shape == real.shape and out_syn.shape == syn.shape
        assert torch.allclose(out_real[3], out_syn[1], atol=1e-6), seed
        assert torch.equal(dsa(syn, seed), out_syn)  # a pure function of the seed
        drawn.add(int(torch.randint(len(FAMILIES), (1,), generator=torch.Generator().manual_seed(seed))))
    assert drawn == set(range(len(FAMILIES)))  # the seeds above exercised every family


def test_seeds_differ_and_per_sample_draws_per_image():
    dsa = DSA("rotate")
    x = torch.rand(1, 3, 10, 10).expand(6, 3, 10, 10).contiguous()
    assert not torch.allclose(dsa(x, 0), dsa(x, 1))
    siamese, per_image = dsa(x, 3), dsa(x, 3, per_sample=True)
    assert all(torch.equal(siamese[0], s) for s in siamese)  # one rotation for the batch
    assert not torch.allclose(per_image[0], per_image[1])  # one rotation per image


def test_identity_settings_and_no_global_rng():
    x = torch.rand(3, 3, 8, 8)
    state = torch.random.get_rng_state()
    assert torch.allclose(DSA("crop", ratio_crop_pad=0.0)(x, 5), x)
    assert torch.allclose(DSA("scale", ratio_scale=1.0)(x, 5), x, atol=1e-6)
    assert torch.allclose(DSA("rotate", ratio_rotate=0.0)(x, 5), x, atol=1e-6)
    assert torch.equal(DSA("flip", prob_flip=1.0)(x, 5), x.flip(3))
    assert torch.equal(DSA("none")(x, 5), x)
    cut = DSA("cutout")(x, 5)
    assert ((cut == 0).all(1).float().mean() - 0.25).abs() < 0.2  # a rectangle of ~half × half is zeroed
    assert torch.equal(torch.random.get_rng_state(), state)  # only the explicit generator was used


def test_crop_shifts_with_zero_fill():
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 3, 4, 4).contiguous()
    out = DSA("crop", ratio_crop_pad=0.5)(x, 11)  # shifts of up to 2 px
    rows, cols = (out[0, 0] != 0).nonzero(as_tuple=True)
    # what survives is a shifted copy of x: out[i, j] = x[i + a, j + b] for one (a, b)
    a = int(out[0, 0][rows[0], cols[0]] // 4 - rows[0])
    b = int(out[0, 0][rows[0], cols[0]] % 4 - cols[0])
    for i in range(4):
        for j in range(4):
            expect = x[0, 0, i + a, j + b] if 0 <= i + a < 4 and 0 <= j + b < 4 else 0.0
            assert out[0, 0, i, j] == expect


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="unknown DSA augmentation"):
        DSA("color_zoom")
