"""What every benchmark shares: timers, peak memory, isolated workers, output.

Timing: CUDA events around the timed steps, then a synchronize (GPU); ``time.perf_counter`` (CPU).
Memory:
* GPU — ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only; nvidia-smi
  also counts the CUDA context and the caching allocator's reserve, ~0.5 GiB more);
* CPU — the process's peak resident set (``VmHWM``), reset to the current RSS after warm-up through
  ``/proc/self/clear_refs`` (Linux ≥ 4.0). RSS also counts Python, torch's libraries and freed-but-cached
  heap pages, and it is process-wide, so each method runs in its own fresh process (``isolate``).
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
from pathlib import Path
from typing import Callable

import torch

from guardx.errors import GuardxError
from guardx.utils.env import REPO_ROOT, cpu_name, device_name, device_tag, environment, git_revision  # noqa: F401
from guardx.utils.io import write_json, write_text


# ---------------------------------------------------------------- timing
class Timer:
    """Wall time of a region of device work: CUDA events + synchronize on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

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


def timed_repeats(step: Callable[[], None], device: torch.device, *, warmup: int, repeats: int,
                  iters: int) -> list[float]:
    """``warmup`` untimed calls, then ``repeats`` timed blocks of ``iters`` calls: seconds per call each."""
    for _ in range(warmup):
        step()
    synchronize(device)
    timer, times = Timer(device), []
    for _ in range(repeats):
        timer.start()
        for _ in range(iters):
            step()
        times.append(timer.stop() / iters)
    return times


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(values: list[float]) -> dict:
    """mean ± sample std (0 for one value) of ``values``."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


# ---------------------------------------------------------------- memory
def _proc_status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "peak RSS (VmHWM, reset after warm-up)" if _can_reset_rss() else "peak RSS of the process (ru_maxrss)"


def _can_reset_rss() -> bool:
    return os.access("/proc/self/clear_refs", os.W_OK) and _proc_status_kib("VmHWM") is not None


def current_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    kib = _proc_status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif _can_reset_rss():
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS
            f.write("5")


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = _proc_status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024


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
        cmd = [sys.executable, "-m", "guardx.bench._measure", target, str(spec_path), str(out_path)]
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


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
