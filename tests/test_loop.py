"""The pieces around the training loop: checkpoint rotation (guardx/utils/checkpoint.py) and precise-BN
recalibration (guardx/loop.py; its 2-rank form is in tests/test_distributed.py)."""
import copy
from types import SimpleNamespace

import torch
import torch.nn as nn

from guardx.distributed.context import DistContext
from guardx.loop import recalibrate_bn
from guardx.models import create_model
from guardx.utils.checkpoint import Checkpointer


def steps_on_disk(folder):
    return sorted(int(p.name[5:14]) for p in folder.glob("step_*.pt") if len(p.name) == len("step_000000000.pt"))


def test_checkpointer_keeps_exactly_the_newest_n_across_restarts(tmp_path):
    folder = tmp_path / "ckpt"
    ck = Checkpointer(folder, keep=2)
    assert ck.latest() is None and ck.load() is None and ck.last_saved is None
    for step in (1, 2, 9, 10):  # 9 -> 10: numeric order across a digit boundary
        ck.save({"step": step}, step)
        assert ck.latest() == ck.last_saved == folder / f"step_{step:09d}.pt"
    assert steps_on_disk(folder) == [9, 10]
    (folder / "notes.txt").write_text("mine")
    (folder / "step_7.pt").write_text("not a checkpoint name")

    ck = Checkpointer(folder, keep=2)  # a restart loads the newest and keeps rotating
    assert ck.load() == {"step": 10} and ck.last_saved == folder / "step_000000010.pt"
    for step in (11, 100):
        ck.save({"step": step}, step)
    assert steps_on_disk(folder) == [11, 100] and ck.load() == {"step": 100}
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "step_7.pt").exists()  # foreign files stay

    Checkpointer(folder, keep=3).save({"step": 101}, 101)  # a restart with another keep: applied at its save
    assert steps_on_disk(folder) == [11, 100, 101]
    Checkpointer(folder, keep=1).save({"step": 102}, 102)
    assert steps_on_disk(folder) == [102]
    Checkpointer(folder, keep=0).save({"step": 103}, 103)  # the newest always stays: resume needs it
    assert steps_on_disk(folder) == [103] and Checkpointer(folder).load() == {"step": 103}
    assert not list(folder.glob(".*"))  # no temporary files left behind


def test_saving_an_earlier_step_drops_the_later_ones_and_keeps_itself(tmp_path):
    folder = tmp_path / "ckpt"
    ck = Checkpointer(folder, keep=2)
    for step in (5, 10, 15):
        ck.save({"step": step}, step)
    assert steps_on_disk(folder) == [10, 15]
    ck.save({"step": 12}, 12)  # a run that went back to step 10 and goes on: 15 is not its future
    assert steps_on_disk(folder) == [10, 12] and Checkpointer(folder).load() == {"step": 12}
    Checkpointer(folder, keep=1).save({"step": 11}, 11)
    assert steps_on_disk(folder) == [11]


def test_only_rank_zero_writes_and_deletes_but_every_rank_waits(tmp_path):
    folder = tmp_path / "ckpt"
    Checkpointer(folder, keep=1).save({"step": 1}, 1)
    barriers = []
    other = SimpleNamespace(is_main=False, world_size=1, barrier=lambda: barriers.append(1))
    ck = Checkpointer(folder, keep=1, ctx=other)
    path = ck.save({"step": 2}, 2)
    assert barriers == [1] and ck.last_saved == path == folder / "step_000000002.pt"
    assert steps_on_disk(folder) == [1]  # rank 1 neither wrote step 2 nor removed step 1


class Batches:
    """A loader stand-in: fixed batches, records set_epoch."""

    def __init__(self, xs):
        self.xs, self.epochs = xs, []

    def set_epoch(self, epoch, start=0):
        self.epochs.append(epoch)

    def __iter__(self):
        return iter((x, torch.zeros(len(x), dtype=torch.long)) for x in self.xs)


def test_recalibrate_bn_is_the_plain_average_of_the_batch_statistics():
    """Precise BN: each layer's running mean/var become the mean over the batches of its input's batch
    mean / unbiased variance (with the final weights); nothing else about the model changes."""
    torch.manual_seed(0)
    model = create_model("resnet18_small", num_classes=10, width=4, mean=[0.5] * 3, std=[0.25] * 3).eval()
    xs = [torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    reference = copy.deepcopy(model).train()
    seen = {}
    for name, m in reference.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(args[0]))
    with torch.no_grad():
        for x in xs[:3]:
            reference(x)
    weights = {k: v.clone() for k, v in model.named_parameters()}
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    loader = Batches(xs)

    assert recalibrate_bn(model, loader, batches=3, ctx=DistContext(), device="cpu", seed=0) == 3
    assert len(loader.epochs) == 1 and not model.training
    assert momenta == [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())
    bns = dict(model.named_modules())
    for name, inputs in seen.items():
        assert len(inputs) == 3
        mean = torch.stack([i.mean((0, 2, 3)) for i in inputs]).mean(0)
        var = torch.stack([i.var((0, 2, 3), unbiased=True) for i in inputs]).mean(0)
        torch.testing.assert_close(bns[name].running_mean, mean, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(bns[name].running_var, var, rtol=1e-5, atol=1e-6, msg=name)
    assert recalibrate_bn(model, loader, batches=0, ctx=DistContext(), device="cpu", seed=0) == 0
