"""One GUARD step under 2-rank DDP (gloo, fp64), through guardx's DDPEngine: BatchNorm folded with the
written-out convolution double backward (guardx's default), and neither (autograd's own passes).

    torchrun --standalone --nproc-per-node 2 tests/fold_ddp_worker.py out.pt

Each rank takes its half of one global batch, runs the objective inside the DDP-wrapped ObjectiveStep and
the engine's backward (DDP averages the gradients); rank 0 saves every parameter's gradient, the running
statistics and its stats per (mode, fold). tests/test_distributed.py compares them with one process.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn as nn

MODES = ("exact", "lossdiff")


def model() -> nn.Module:
    """The same fp64 resnet18_small on every rank, running statistics and affine parameters away from 0/1."""
    from guardx.models import create_model

    torch.manual_seed(0)
    m = create_model("resnet18_small", num_classes=5, width=4, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3]).double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.3, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    return m.train()


def objective(mode: str):
    from guardx.objectives import build_objective

    return build_objective("guard", mode=mode, beta=0.5)


def global_batch(n: int = 8, res: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, res, res, generator=g, dtype=torch.double), torch.randint(0, 5, (n,), generator=g)


def main(out: str) -> int:
    from guardx.distributed.context import DistContext
    from guardx.distributed.ddp import DDPEngine
    from guardx.objectives import ObjectiveStep, _fold
    from guardx.objectives._fold import bn_folding, written_out_double_backward

    _fold.FOLD_OUTPUT_OVER_WEIGHT = 0.0  # fold every pair (the tiny model's deep weights outweigh its feature maps)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = global_batch()
    x, y = x.chunk(world)[rank], y.chunk(world)[rank]
    results = {}
    for mode in MODES:
        for fold in (True, False):
            m = model()
            engine = DDPEngine(ObjectiveStep(m, objective(mode)), torch.optim.SGD(m.parameters(), lr=0.1),
                               ctx=DistContext(rank=rank, world_size=world, backend="ddp"))
            with bn_folding(fold), written_out_double_backward(fold):  # False: autograd's own passes
                loss, stats = engine(x, y)
                engine.backward(loss)
            results[f"{mode}-{fold}"] = {"grads": {n: p.grad.clone() for n, p in m.named_parameters()},
                                         "buffers": {n: b.clone() for n, b in m.named_buffers()}, "stats": stats}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
