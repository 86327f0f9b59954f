"""Which implementation a kernel call uses, and the (B, N) row views the kernels work on.

Selection (first match wins):

* inside ``with kernel_backend("triton" | "reference" | "auto")``: that choice;
* else the ``GUARDX_KERNELS`` environment variable (same values; benchmarks use it to compare);
* ``auto``: Triton for CUDA tensors of dtype fp32/fp16/bf16 when Triton imports, the PyTorch reference
  otherwise (CPU, fp64, no Triton) — so the package imports and every CPU test runs without a GPU.

``triton`` forces the Triton path (tests do this on CPU tensors under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

try:  # Triton is optional: without it every op runs its PyTorch reference
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_forced: list[str] = []


@contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """Force ``name`` for every kernel call in the block (nests; the innermost wins)."""
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def current_backend() -> str:
    if _forced:
        return _forced[-1]
    name = os.environ.get("GUARDX_KERNELS", "auto")
    if name not in BACKENDS:
        raise ValueError(f"GUARDX_KERNELS must be one of {BACKENDS}, got {name!r}")
    return name


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when this call should launch the Triton kernel."""
    backend = current_backend()
    if backend == "reference":
        return False
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("kernel backend 'triton' was forced but triton is not installed")
        if not all(t.is_cuda for t in tensors) and not interpreter_on():
            raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        return True
    return HAS_TRITON and all(t.is_cuda and t.dtype in TRITON_DTYPES for t in tensors)


def check_pair(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """The row ops take two tensors of one shape, dtype and device, with a leading batch dimension."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"{name}: both inputs need the same shape, dtype and device; got "
                         f"{tuple(a.shape)}/{a.dtype}/{a.device} and {tuple(b.shape)}/{b.dtype}/{b.device}")
    if a.dim() < 1:
        raise ValueError(f"{name}: inputs need a leading batch dimension, got a 0-d tensor")
    if a.dtype not in TRITON_DTYPES:
        raise ValueError(f"{name}: the Triton kernel supports {TRITON_DTYPES}, got {a.dtype}")


def row_format(*tensors: torch.Tensor) -> torch.memory_format:
    """The memory format in which all ``tensors`` are dense, so each sample is one contiguous row.

    A row reduction or a per-row axpy does not care in which order a sample's elements sit, only that
    every operand uses the same order: channels_last inputs are used in place, not copied.
    """
    if all(t.is_contiguous() for t in tensors):
        return torch.contiguous_format
    if all(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        return torch.channels_last
    return torch.contiguous_format  # mixed or strided layouts: as_rows copies


def as_rows(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """A (B, N) view of ``t`` in memory format ``fmt`` (a copy only when ``t`` is not dense in it)."""
    if fmt == torch.channels_last:
        t = t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    return t.contiguous().view(t.shape[0], -1)
