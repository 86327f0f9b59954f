"""Run several jobs in one torchrun launch (one process-group start for all of them).

    torchrun --standalone --nproc-per-node 2 tests/dist_worker.py runs.json

``runs.json`` is a list of jobs: an override list is a full ``guardx squeeze`` configuration (every run goes
through the same ``guardx.squeeze.run`` the CLI calls); ``{"overrides": [...], "error_file": PATH}`` is a run
expected to fail, whose GuardxError (raised on every rank alike) is written to ``PATH.<rank>`` before the next
run starts; ``{"recalibrate_bn": {...}}`` runs :func:`guardx.loop.recalibrate_bn` on this rank's shard (see
:func:`recalibrate_job`). Used by tests/test_distributed.py and tests/test_faults.py.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from guardx import squeeze
from guardx.config import load_config
from guardx.data import build_loader
from guardx.distributed import finalize, init_distributed
from guardx.errors import GuardxError
from guardx.loop import recalibrate_bn
from guardx.models import create_model


def bn_model() -> torch.nn.Module:
    """The model the recalibration job uses (same seed, same weights on every rank and in the test)."""
    torch.manual_seed(0)
    return create_model("resnet18_small", num_classes=10, width=4, mean=[0.5] * 3, std=[0.5] * 3)


def recalibrate_job(job: dict) -> None:
    """``recalibrate_bn`` over ``batches`` batches of this rank's loader; rank 0 saves the model's state to
    ``out``. ``overrides`` configure the data and ``distributed.backend``; ``batch_size`` is per rank."""
    cfg = load_config(None, job["overrides"])
    ctx = init_distributed(cfg)
    loader = build_loader(cfg.data, "train", ctx.rank, ctx.world_size, batch_size=job["batch_size"],
                          seed=cfg.run.seed)
    model = bn_model()
    used = recalibrate_bn(model, loader, batches=job["batches"], ctx=ctx, device=ctx.device, seed=cfg.run.seed)
    assert used == job["batches"], used
    if ctx.is_main:
        torch.save(model.state_dict(), job["out"])
    ctx.barrier()


def main(spec: str) -> int:
    try:
        for job in json.loads(Path(spec).read_text()):
            if isinstance(job, list):
                squeeze.run(load_config(None, job))
            elif "recalibrate_bn" in job:
                recalibrate_job(job["recalibrate_bn"])
            else:
                try:
                    squeeze.run(load_config(None, job["overrides"]))
                except GuardxError as e:
                    Path(f"{job['error_file']}.{os.environ.get('RANK', '0')}").write_text(str(e))
    finally:
        finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
