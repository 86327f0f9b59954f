"""Process-group set-up from torchrun's environment, and rank-aware helpers."""
from __future__ import annotations

import datetime
import gc
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from guardx.errors import ConfigError, GuardxError, Terminated
from guardx.utils.misc import pick_device


class PeerLostError(GuardxError):
    """A collective failed: another rank died, was killed, or stalled past ``distributed.timeout_s``."""


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order (a list of one without a process group)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], object]):
        """Run ``fn()`` on rank 0 only and give every rank its result, or raise its :class:`GuardxError` on
        every rank, so that all ranks decide the same thing (take a lock, pick a checkpoint, skip a stage)
        and none waits in a collective for a rank that has already stopped. The result must pickle."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except GuardxError as e:
                error = (type(e), str(e))
        if self.distributed:
            result, error = self.broadcast_object((result, error))
        if error is not None:
            cls, message = error
            try:
                exc = cls(message)
            except TypeError:  # an error class with another constructor: keep the message
                exc = GuardxError(message)
            raise exc
        return result

    @contextmanager
    def on_peer_loss(self, where: Callable[[], str]) -> Iterator[None]:
        """Turn a failed collective into one clear :class:`PeerLostError` (``where()`` says what was running).

        A killed rank closes its sockets, so the survivors' next collective fails at once; a stalled one
        makes them fail after ``distributed.timeout_s``. Either way the run ends instead of hanging.
        """
        try:
            yield
        except Exception as e:
            if self.world_size > 1 and isinstance(e, Terminated):
                # torchrun stops the survivors of a failed rank with SIGTERM (the CLI turns it into Terminated)
                raise PeerLostError(
                    f"rank {self.rank} of {self.world_size} lost its peers during {where()}: another rank died, was "
                    "killed or failed, and torchrun stopped this one (SIGTERM); rerun the same command to resume "
                    "from the last checkpoint (any world size)") from e
            if isinstance(e, Terminated):
                raise Terminated(f"stopped by SIGTERM during {where()}; rerun the same command to resume from the "
                                 "last checkpoint") from e
            if not (self.world_size > 1 and is_collective_failure(e)):
                raise
            raise PeerLostError(
                f"rank {self.rank} of {self.world_size} lost its peers during {where()}: another rank died, "
                f"was killed or stalled past distributed.timeout_s ({_first_sentence(e)}); rerun the same "
                "command to resume from the last checkpoint (any world size)") from e


# gloo raises plain RuntimeErrors naming itself (peer gone: "Connection reset by peer"; stalled: "Timed out
# waiting ... for recv"); NCCL's watchdog raises DistBackendError
_COLLECTIVE_MARKERS = ("gloo", "nccl", "connection reset by peer", "connection closed by peer")


def _first_sentence(e: BaseException) -> str:
    """``[gloo/.../pair.cc:545] Read error [10.0.0.2]:4321: Connection reset by peer. This is ...`` →
    ``Read error [10.0.0.2]:4321: Connection reset by peer``."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0][:200]


def is_collective_failure(e: BaseException) -> bool:
    """True for the errors a dead or stalled peer causes."""
    if isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _COLLECTIVE_MARKERS)


_CONTEXT: DistContext | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg) -> DistContext:
    """Initialise once per process from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun).

    A single process (no torchrun) gets a world of one whatever the backend. Under torchrun with
    ``distributed.backend=none`` the ranks would silently duplicate work, so that is an error.
    DeepSpeed needs a process group even for one rank; without torchrun it gets a local one.
    """
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = cfg.distributed.backend
    if world > 1 and backend == "none":
        raise ConfigError(f"launched with WORLD_SIZE={world} but distributed.backend=none: "
                          "set distributed.backend=ddp (or deepspeed)")
    device = pick_device(cfg.run.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.run.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; set before the first CUDA matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if (world > 1 or backend == "deepspeed") and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # not under torchrun: describe a one-rank world (DeepSpeed reads it)
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                              WORLD_SIZE="1")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s))
    _CONTEXT = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)
    return _CONTEXT


def finalize() -> None:
    """End a distributed run cleanly: barrier → gc → sleep → destroy.

    The gc + short sleep let gloo's worker threads drop their last tensors before interpreter shutdown
    (otherwise they can abort the process after a successful run). After a failure the peers may be
    gone, so no barrier is attempted: the process group is torn down and the error goes through.
    """
    global _CONTEXT
    failing = sys.exc_info()[1] is not None  # called from a `finally` while an exception propagates
    if dist.is_available() and dist.is_initialized():
        try:
            if not failing:
                dist.barrier()
            gc.collect()
            time.sleep(0.2)
            dist.destroy_process_group()
        except Exception:
            if not failing:
                raise
    _CONTEXT = None
