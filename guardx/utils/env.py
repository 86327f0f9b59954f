"""The environment record every result carries (benchmarks, evaluation, pipeline reports): what a reader
needs to interpret or repeat a number — device, library versions, threads, CPU, git revision, time."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_revision() -> str | None:
    rev = _git("rev-parse", "HEAD")
    if rev is None:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return rev + ("-dirty" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_name()}"


def device_tag(device: torch.device) -> str:
    """Short file-name-safe tag: ``cpu`` or the GPU's name, e.g. ``nvidia-h100-80gb-hbm3``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _optional_version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def environment(device: torch.device | str = "cpu") -> dict:
    """Everything a reader needs to interpret (or repeat) a number measured on ``device``."""
    from guardx.kernels import current_backend

    device = torch.device(device)
    env = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
           "cuda": torch.version.cuda, "triton": _optional_version("triton"),
           "torchattacks": _optional_version("torchattacks"), "python": platform.python_version(),
           "machine": platform.machine(), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "cpu": cpu_name(), "blas": _blas(), "git_revision": git_revision(), "kernels_backend": current_backend(),
           "deterministic": torch.are_deterministic_algorithms_enabled(),
           "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cudnn=torch.backends.cudnn.version(), gpu_memory_mib=props.total_memory // 2**20,
                   capability=f"{props.major}.{props.minor}", cudnn_benchmark=torch.backends.cudnn.benchmark,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                   driver=_nvidia_driver())
    return env


def _blas() -> str | None:
    """The BLAS/LAPACK torch was built with and the CPU capability it dispatches to (numbers change with both)."""
    try:
        config = torch.__config__.show()
    except Exception:  # pragma: no cover - very old builds
        return None
    blas = re.search(r"BLAS_INFO=([^,\s]+)", config)
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else None
    return ", ".join(filter(None, [blas.group(1) if blas else None, capability]))


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None
