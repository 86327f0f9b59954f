"""Triton kernels for GUARD's per-step row-wise ops, each with a PyTorch reference beside it.

    from guardx.kernels import perturb_along, rowwise_sqdist
    xz = perturb_along(x, g, h)          # x + h·g/‖g‖₂ per sample, one fused pass
    s = rowwise_sqdist(gz, g0)           # Σ_j (gz − g0)² per sample, fused backward

Each op dispatches to Triton for CUDA tensors and to its reference otherwise, so this package imports
and runs anywhere (see :mod:`kernels._dispatch` for ``kernel_backend`` / ``GUARDX_KERNELS``). Layering:
nothing here imports guardx.
"""
from ._dispatch import HAS_TRITON, current_backend, kernel_backend
from .perturb import perturb_along, perturb_along_reference, unit_direction
from .sqdist import rowwise_sqdist, rowwise_sqdist_reference

__all__ = ["HAS_TRITON", "current_backend", "kernel_backend", "perturb_along", "perturb_along_reference",
           "rowwise_sqdist", "rowwise_sqdist_reference", "unit_direction"]
