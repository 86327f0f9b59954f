"""The measuring module every ``guardx bench`` benchmark shares: the fixed-batch step, timing blocks
(round-robin over methods in one process), FLOP counts, peak memory in an isolated process, the machine's
load, and the result files.

The fixed-batch step (:func:`fixed_batch_step`) is the one definition of "one squeeze iteration" every
benchmark times: the model from the registry (seeded), SGD (momentum 0.9, weight decay 1e-4), the engine
(``Engine(ObjectiveStep(model, objective))`` or the caller's ``build_engine``), one fixed random batch
already on the device; then ``step()`` = the engine's forward (every pass of the objective), backward,
optimiser step. Excluded: data loading and checkpoints.

Timing: CUDA events around a block, then a synchronize (GPU); ``time.perf_counter`` (CPU). Methods that are
compared are timed round-robin in one process (:func:`round_robin`): many short blocks, one block of each
method per round, the order rotated every round, so a change of machine load hits every method alike.
Reported per method: median, min, max and spread of the blocks; ratios take the same statistic (the
median) for every method, and the per-round paired ratio is kept beside it.

Memory (each method in a fresh process, :func:`run_isolated`):
* GPU — ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only; nvidia-smi
  also counts the CUDA context and the caching allocator's reserve, ~0.5 GiB more);
* CPU — the process's peak resident set (``VmHWM``), reset to the current RSS after warm-up through
  ``/proc/self/clear_refs`` (Linux ≥ 4.0). RSS also counts Python, torch's libraries and freed-but-cached
  heap pages, and it is process-wide: hence one fresh process per method.

FLOPs (:func:`step_flops`): ``torch.utils.flop_counter`` over one whole step — forward, backward, double
backward, optimiser — counting what it counts: convolutions and matrix multiplies (elementwise work such
as BatchNorm, ReLU and the optimiser is free in this count).
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from guardx.errors import GuardxError
from guardx.utils.env import REPO_ROOT, device_tag, environment, git_revision  # noqa: F401  (re-exported)
from guardx.utils.io import write_json, write_text
from guardx.utils.misc import derive_seed

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- the fixed-batch step
@dataclass
class FixedBatchStep:
    """One squeeze step on one fixed batch; call it to run one. ``last`` holds the latest stats."""

    model: torch.nn.Module
    engine: object
    x: torch.Tensor
    y: torch.Tensor
    last: dict = field(default_factory=dict)

    def __call__(self) -> None:
        loss, stats = self.engine(self.x, self.y)  # stats: one host sync per step, as in the real loop
        self.engine.backward(loss)
        self.engine.step()
        self.last = stats

    @property
    def loss_finite(self) -> bool:
        loss = self.last.get("loss")
        return loss is not None and math.isfinite(loss)


def fixed_batch_step(objective, *, model: str = "resnet18", num_classes: int = 1000, width: int | None = None,
                     batch_size: int = 32, resolution: int = 64, device: torch.device | str = "cpu",
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                     precision: str = "fp32", channels_last: bool = False, seed: int = 0, rank: int = 0,
                     momentum: float = 0.9, weight_decay: float = 1e-4,
                     build_engine: Callable | None = None) -> FixedBatchStep:
    """The one fixed-batch squeeze step (see the module docstring).

    ``build_engine(step_module, optimizer) -> engine`` replaces the single-process ``Engine`` (the squeeze
    stage's ``guardx.distributed.build_engine`` for DDP/DeepSpeed). The weights depend on ``seed`` only
    (every rank starts identical); the batch on ``seed`` and ``rank`` (each rank its own, as with a
    sharded loader).
    """
    from guardx.distributed.engine import Engine
    from guardx.models import create_model
    from guardx.objectives import ObjectiveStep

    device = torch.device(device)
    torch.manual_seed(derive_seed("bench-weights", seed))
    net = create_model(model, num_classes=num_classes, width=width or None, resolution=resolution,
                       mean=list(mean), std=list(std)).to(device).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    # lr only has to keep the weights finite over the timed steps; the step's cost does not depend on it
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=momentum, weight_decay=weight_decay)
    step_module = ObjectiveStep(net, objective)
    engine = (build_engine(step_module, optimizer) if build_engine is not None
              else Engine(step_module, optimizer, precision=precision, device=device))
    g = torch.Generator().manual_seed(derive_seed("bench-batch", seed, rank))
    x = torch.rand(batch_size, 3, resolution, resolution, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return FixedBatchStep(net, engine, x, y)


# ---------------------------------------------------------------- timing
class Timer:
    """Wall time of a region of device work: CUDA events + synchronize on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        """Seconds since :meth:`start`, after all queued work finished."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self.begin.elapsed_time(end) / 1e3
        return time.perf_counter() - self.t0


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_blocks(step: Callable[[], None], device: torch.device, *, warmup: int, repeats: int,
                 iters: int) -> list[float]:
    """One closure: ``warmup`` untimed calls, then ``repeats`` timed blocks of ``iters`` calls; seconds
    per call of each block."""
    return round_robin({"step": step}, device, rounds=repeats, iters=iters, warmup=warmup)["step"]


def round_robin(steps: dict[str, Callable[[], None]], device: torch.device, *, rounds: int, iters: int = 1,
                warmup: int = 1, progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each closure, timed in interleaved blocks: ``warmup`` untimed calls of each,
    then ``rounds`` rounds of one block (``iters`` calls) per closure, the order rotated by one every
    round. ``result[name][r]`` is round r's block, so rounds pair up across closures."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    synchronize(device)
    timer, times = Timer(device), {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            timer.start()
            for _ in range(iters):
                steps[name]()
            times[name].append(timer.stop() / iters)
        if progress is not None:
            progress(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.3g}s" for n in names))
    return times


def block_stats(values: Sequence[float]) -> dict:
    """median, min, max, quartiles and the spread (max − min)/median of timing blocks (plus mean ± std)."""
    v = sorted(values)
    med = statistics.median(v)
    q1, q3 = (statistics.quantiles(v, n=4, method="inclusive")[i] for i in (0, 2)) if len(v) > 1 else (med, med)
    return {"n": len(v), "median": med, "min": v[0], "max": v[-1], "q1": q1, "q3": q3,
            "spread": (v[-1] - v[0]) / med if med > 0 else float("nan"),
            "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}


def paired_ratios(times: Sequence[float], ref: Sequence[float]) -> dict:
    """Round-by-round ratio of two closures timed by :func:`round_robin`: median, min, max."""
    r = sorted(a / b for a, b in zip(times, ref))
    return {"median": statistics.median(r), "min": r[0], "max": r[-1]}


def summary(values: Sequence[float]) -> dict:
    """mean ± sample std (0 for one value) of ``values``."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


# ---------------------------------------------------------------- FLOPs
def step_flops(step: Callable[[], None]) -> dict:
    """FLOPs of one call of ``step`` by ``torch.utils.flop_counter``'s formulas (convolutions and matrix
    multiplies, in forward, backward and double backward alike; 2 FLOPs per multiply-add): total and per
    op. (``FlopCounterMode`` itself cannot be used: its module tracker rejects ``torch.autograd.grad`` with
    leaf inputs, which every GUARD step calls.)"""
    counter = _FlopCount()
    with counter:
        step()
    return {"total": sum(counter.counts.values()), "per_op": {str(k): v for k, v in counter.counts.items()}}


class _FlopCount(TorchDispatchMode):
    """Every aten op that reaches the dispatcher, counted with ``flop_registry`` where it has a formula."""

    def __init__(self):
        super().__init__()
        self.counts: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            key = func._overloadpacket
            self.counts[key] = self.counts.get(key, 0) + formula(*args, **kwargs, out_val=out)
        return out


# ---------------------------------------------------------------- machine load
def cores_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def load_warning(before: list[float] | None, after: list[float] | None, cores: int) -> str | None:
    """A warning when the 1-minute load average before or after the run exceeded the cores: other work
    shared the machine, and CPU timings measure contention as much as the code."""
    worst = max((v[0] for v in (before, after) if v), default=None)
    if worst is None or worst <= cores:
        return None
    return (f"load average {worst:.2f} exceeded the {cores} available cores during this run: other processes "
            "shared the CPU, so times (and less so their ratios) are not trustworthy; rerun on an idle machine")


# ---------------------------------------------------------------- memory
def _proc_status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def memory_kind(device: torch.device) -> str:
    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "peak RSS (VmHWM, reset after warm-up)" if _can_reset_rss() else "peak RSS of the process (ru_maxrss)"


def _can_reset_rss() -> bool:
    return os.access("/proc/self/clear_refs", os.W_OK) and _proc_status_kib("VmHWM") is not None


def current_memory_mib(device: torch.device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    kib = _proc_status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


def reset_peak_memory(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif _can_reset_rss():
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS
            f.write("5")


def peak_memory_mib(device: torch.device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = _proc_status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024


def step_memory(step: Callable[[], None], device: torch.device, *, warmup: int, steps: int) -> dict:
    """Peak memory over ``steps`` calls after ``warmup``: peak, static (resident before the measured calls:
    weights, optimiser state, the batch; on CPU also cached heap) and their difference."""
    for _ in range(warmup):
        step()
    synchronize(device)
    static = current_memory_mib(device)
    reset_peak_memory(device)
    for _ in range(steps):
        step()
    synchronize(device)
    peak = peak_memory_mib(device)
    return {"peak_mem_mib": peak, "static_mem_mib": static, "step_mem_mib": peak - static}


# ---------------------------------------------------------------- isolated workers
def run_isolated(target: str, spec: dict, *, timeout: float | None = None) -> dict:
    """Run ``target`` (``"module:function"``, called with ``spec``, returning a JSON-able dict) in a
    fresh Python process: its own allocator, its own peak RSS, no state left by a previous method."""
    with tempfile.TemporaryDirectory(prefix="guardx-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        # the worker must import this very checkout
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "guardx.bench.measure", target, str(spec_path), str(out_path)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise GuardxError(f"benchmark worker {target} ({spec.get('method', '')}) failed with exit code "
                              f"{proc.returncode}: {tail}")
        return json.loads(out_path.read_text())


def call_target(target: str, spec: dict) -> dict:
    import importlib

    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)(spec)


def _worker_main(argv: list[str]) -> int:
    target, spec_path, out_path = argv
    result = call_target(target, json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------- output
def strict_json(obj):
    """``obj`` with every NaN/inf replaced by None, so the file is valid JSON (json.dumps writes NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def save_result(out_dir: str | Path, stem: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """``<out_dir>/<stem>.json`` (strict JSON) and ``.md``, each written atomically."""
    out = Path(out_dir)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    write_json(strict_json(data), json_path)
    write_text(markdown, md_path)
    return json_path, md_path


def resolve_device(name: str) -> torch.device:
    from guardx.utils.misc import pick_device

    try:
        return pick_device(name)
    except RuntimeError as e:
        raise GuardxError(str(e).replace("run.device", "--device")) from None


def parse_ints(text: str, what: str) -> list[int]:
    """``"8,16,32"`` → [8, 16, 32]; a one-line error naming ``what`` otherwise."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise GuardxError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise GuardxError(f"{what} must be positive integers, got {text!r}")
    return values


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
