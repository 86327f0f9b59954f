"""``perturb_along(x, g, h)`` = x + h · g / ‖g‖₂ per sample (a zero-gradient sample does not move).

GUARD builds its perturbed input this way every step (x + h·z with z = ∇ℓ/‖∇ℓ‖). The PyTorch
reference moves the batch through memory about eleven times; the kernels here fuse it.

DRAM traffic, in units of one batch-sized tensor (N = elements of x):

    reference                                   fused (rows ≤ FUSED_MAX)     tiled (larger rows)
    norm        read g                 1N       read g, read x, write  3N    partials: read g   1N
    g / norm    read g, write z        2N                                     apply: read x, g,
    where(...)  read z, zeros; write   3N                                       write out        3N
    zeros_like  write                  1N
    h * z       read, write            2N
    x + ...     read x, read, write    3N
    total                            ~12N                              3N                      4N

Rows that fit on chip (FUSED_MAX elements, e.g. 3×32×32 or 3×48×48 images) take one pass: one read
of x and g, one write. Larger rows need the whole row's norm before any output can be written, so g is
read twice (once for the partial sums, once for the update), still a third of the reference's traffic.

The direction is a stop-gradient (GUARD's z is detached): the autograd wrapper passes the incoming
gradient straight to ``x`` and none to ``g``; the reference detaches ``g`` the same way.
"""
from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON, as_rows, check_pair, row_format, use_triton
from ._rowwise import block_for, num_warps_for, sumsq_partials

FUSED_MAX = 8192  # row length up to which one program holds the whole row in registers


# ---------------------------------------------------------------- PyTorch reference
def unit_direction(g: torch.Tensor) -> torch.Tensor:
    """z_i = g_i / ‖g_i‖₂ per sample, detached; a zero gradient gives z_i = 0 (not NaN)."""
    g = g.detach()
    norm = g.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))
    return torch.where(norm > 0, g / norm.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(g))


def perturb_along_reference(x: torch.Tensor, g: torch.Tensor, h: float) -> torch.Tensor:
    return x + h * unit_direction(g)


# ---------------------------------------------------------------- Triton kernels
if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._rowwise import row_total

    @triton.jit
    def _row_scale(sq, h):
        """h / ‖g‖ from Σg², or 0 for a zero row (the max keeps the unused branch finite)."""
        return tl.where(sq > 0, h / tl.sqrt_rn(tl.maximum(sq, 1.1754944e-38)), 0.0)

    @triton.jit
    def perturb_row_kernel(
        X,  # pointer to x, (rows, n_cols) contiguous
        G,  # pointer to the direction g, same layout
        OUT,  # pointer to the output, same layout
        n_cols,  # elements per row (≤ BLOCK)
        h,  # step length along g/‖g‖
        BLOCK: tl.constexpr,  # next power of two ≥ n_cols: the whole row in one program
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        offs = row.to(tl.int64) * n_cols + cols
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)  # upcast: fp32 math for every dtype
        scale = _row_scale(tl.sum(g * g, axis=0), h)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + offs, (x + scale * g).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def perturb_apply_kernel(
        X,  # pointer to x, (rows, n_cols) contiguous
        G,  # pointer to the direction g, same layout
        P,  # pointer to the fp32 partial sums of g², (rows, n_tiles)
        OUT,  # pointer to the output, same layout as x
        n_cols,  # elements per row
        n_tiles,  # partial sums per row
        h,  # step length along g/‖g‖
        BLOCK: tl.constexpr,  # elements per tile (the partials used the same tiling)
        CHUNK: tl.constexpr,  # partials summed per loop step
    ):
        row = tl.program_id(0)
        tile = tl.program_id(1)
        scale = _row_scale(row_total(P, row, n_tiles, CHUNK), h)
        cols = tile * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        offs = row.to(tl.int64) * n_cols + cols
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + offs, (x + scale * g).to(OUT.dtype.element_ty), mask=mask)


def perturb_along_triton(x: torch.Tensor, g: torch.Tensor, h: float, *, block: int | None = None) -> torch.Tensor:
    """Launch the kernels (no autograd). ``block`` overrides the tile width (tests use it to reach
    the tiled path on small rows)."""
    check_pair("perturb_along", x, g)
    fmt = row_format(x, g)
    out = torch.empty_like(x, memory_format=fmt)
    if x.numel() == 0:
        return out
    xr, gr, outr = as_rows(x, fmt), as_rows(g.detach(), fmt), as_rows(out, fmt)
    rows, n_cols = xr.shape
    if block is None and n_cols <= FUSED_MAX:
        width = triton.next_power_of_2(n_cols)
        perturb_row_kernel[(rows,)](xr, gr, outr, n_cols, float(h), BLOCK=width, num_warps=num_warps_for(width))
        return out
    block = block_for(n_cols, block)
    partials = sumsq_partials(gr, None, block)
    perturb_apply_kernel[(rows, partials.shape[1])](xr, gr, partials, outr, n_cols, partials.shape[1], float(h),
                                                    BLOCK=block, CHUNK=64, num_warps=num_warps_for(block))
    return out


class PerturbAlong(torch.autograd.Function):
    """Autograd wrapper: ∂out/∂x = identity, and ``g`` is a stop-gradient (GUARD detaches z)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: torch.Tensor, h: float) -> torch.Tensor:
        return perturb_along_triton(x, g, h)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out, None, None


def perturb_along(x: torch.Tensor, g: torch.Tensor, h: float) -> torch.Tensor:
    """x + h · g/‖g‖₂ per sample (first dimension = samples); zero rows of ``g`` leave ``x`` unchanged.

    Triton on CUDA tensors, the PyTorch reference otherwise (see :mod:`kernels._dispatch`).
    """
    if use_triton(x, g):
        return PerturbAlong.apply(x, g, h)
    return perturb_along_reference(x, g, h)
