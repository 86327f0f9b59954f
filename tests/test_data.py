"""Embedded digits data, the sharded resumable sampler, and the crop helpers."""
import torch
from hypothesis import given, settings, strategies as st

from guardx.data import build_loader
from guardx.data.digits import digits_tensors
from guardx.data.sampler import ShardedSampler
from guardx.data.transforms import apply_crop_params, sample_crop_params, sample_rrc


def test_digits_split_is_fixed_and_real():
    xtr, ytr = digits_tensors("train")
    xte, yte = digits_tensors("test")
    assert xtr.shape == (1438, 3, 32, 32) and xte.shape == (359, 3, 32, 32)
    assert xtr.dtype == torch.uint8 and torch.bincount(yte).min() >= 35  # stratified
    assert torch.equal(digits_tensors("test")[0], xte)
    # train and test are disjoint images (no duplicated scan across the split)
    tr = {bytes(x.numpy()) for x in xtr}
    assert sum(bytes(x.numpy()) in tr for x in xte) < 5  # the raw digits data has a few exact duplicates


def test_digits_loader_contract(tiny_cfg):
    cfg = tiny_cfg()
    loader = build_loader(cfg.data, "train", batch_size=100, seed=0)
    x, y = next(iter(loader))
    assert x.shape == (100, 3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.long and loader.num_classes == 10 and len(loader) == 15
    test = build_loader(cfg.data, "test", batch_size=100, seed=0, max_samples=250)
    assert sum(len(y) for _, y in test) == 250


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), world=st.integers(1, 5), seed=st.integers(0, 3), epoch=st.integers(0, 3))
def test_eval_shards_are_disjoint_and_cover(n, world, seed, epoch):
    shards = []
    for r in range(world):
        s = ShardedSampler(n, rank=r, world_size=world, seed=seed, shuffle=False, pad=False)
        s.set_epoch(epoch)
        shards.append(list(s))
    flat = [i for sh in shards for i in sh]
    assert sorted(flat) == list(range(n))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), world=st.integers(1, 5), seed=st.integers(0, 3))
def test_train_shards_are_equal_length_and_cover(n, world, seed):
    shards = [list(ShardedSampler(n, rank=r, world_size=world, seed=seed)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert set(i for s in shards for i in s) == set(range(n))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(8, 80), per_rank=st.integers(1, 4), steps=st.integers(0, 6), new_world=st.integers(1, 4))
def test_resume_position_is_world_size_independent(n, per_rank, steps, new_world):
    """After `steps` global batches on 2 ranks, resuming on any world size continues the same global order."""
    world, seed, epoch = 2, 5, 3
    order = ShardedSampler(n, rank=0, world_size=1, seed=seed)
    order.set_epoch(epoch)
    global_order = list(order)
    consumed = min(steps * per_rank * world, n)
    resumed = []
    for r in range(new_world):
        s = ShardedSampler(n, rank=r, world_size=new_world, seed=seed)
        s.set_epoch(epoch, start=consumed)
        resumed.append(list(s))
    # interleave the ranks' shards back into one sequence: it is the rest of the global order
    merged = [resumed[k % new_world][k // new_world] for k in range(sum(len(s) for s in resumed))]
    assert merged[: n - consumed] == global_order[consumed:]


def test_same_seed_same_order_other_seed_other_order():
    a, b, c = (ShardedSampler(50, seed=s) for s in (1, 1, 2))
    assert list(a) == list(b) != list(c)
    a.set_epoch(1)
    assert list(a) != list(b)


@settings(max_examples=50, deadline=None)
@given(h=st.integers(4, 64), w=st.integers(4, 64), seed=st.integers(0, 10**6))
def test_crop_params_are_valid_and_replayable(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    top, left, ch, cw = sample_rrc(h, w, (0.08, 1.0), g)
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
    params = torch.tensor(sample_crop_params(h, w, (0.08, 1.0), True, torch.Generator().manual_seed(seed)))
    img = torch.rand(3, h, w)
    out = apply_crop_params(img, params, 8)
    assert out.shape == (3, 8, 8) and torch.equal(out, apply_crop_params(img, params, 8))


def test_holdout_is_a_fixed_stratified_part_of_train_that_training_never_sees():
    from guardx.config import load_config
    from guardx.data import build_dataset
    from guardx.data.digits import digits_tensors

    cfg = load_config(None, ["data.dataset=digits", "data.resolution=32", "data.holdout=0.2"])
    train, held = build_dataset(cfg.data, "train", augment=False), build_dataset(cfg.data, "holdout")
    full_x, full_y = digits_tensors("train")
    assert len(train) + len(held) == len(full_y)
    key = lambda x: x.flatten().tolist()  # noqa: E731  (images identify the samples)
    seen = {tuple(key(x)) for x in train.images}
    assert not any(tuple(key(x)) in seen for x in held.images)  # disjoint
    for c in range(10):  # stratified: 20 % of every class
        assert int((held.labels == c).sum()) == round(0.2 * int((full_y == c).sum()))
    again = build_dataset(cfg.data, "holdout")
    assert torch.equal(again.images, held.images)  # fixed, whatever the run
    assert build_dataset(load_config(None, ["data.dataset=digits"]).data, "test").images.shape[0] == 359
