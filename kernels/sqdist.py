"""``rowwise_sqdist(a, b)`` = Σ_j (a_ij − b_ij)² per row (sample), differentiable in both inputs.

GUARD exact's regulariser is λ/B Σ_i ‖∇ℓ_i(x_i + h z_i) − ∇ℓ_i(x_i)‖², i.e. ``rowwise_sqdist(gz, g0)``,
and its gradient flows into gz and g0 and on through their double-backprop graphs.

DRAM traffic and saved memory, in units of one batch-sized tensor (N elements):

                reference (a − b).flatten(1).pow(2).sum(1)        Triton
    forward     sub: read a, b; write d               3N          partials: read a, b           2N
                pow: read d; write d²                 2N          (+ B·tiles fp32 partials)
                sum: read d²                          1N
    saved       d = a − b (pow's input)               1N          nothing new (a and b already live
                                                                  in the double-backprop graph)
    backward    pow′: ḡ·2·d in 2–3 elementwise ops  4–6N          fused: read a, b,
                sub′: −∂a for b (read, write)         2N          write ∂a and ∂b               4N
    total                                         ~12–14N                                       6N

Backward (the VJP): with s_i = Σ_j (a_ij − b_ij)² and upstream ḡ_i = ∂L/∂s_i,
    ∂L/∂a_ij = 2 (a_ij − b_ij) ḡ_i,   ∂L/∂b_ij = −∂L/∂a_ij.
The Triton backward is not itself differentiable (``once_differentiable``): GUARD differentiates the
regulariser once (the second order sits in gz/g0's graphs, not here).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._dispatch import HAS_TRITON, as_rows, check_pair, row_format, use_triton
from ._rowwise import block_for, num_warps_for, sumsq_partials


# ---------------------------------------------------------------- PyTorch reference
def rowwise_sqdist_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).pow(2).sum(1)


# ---------------------------------------------------------------- Triton kernels
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def sqdist_backward_kernel(
        A,  # pointer to a, (rows, n_cols) contiguous
        B,  # pointer to b, same layout
        GO,  # pointer to the upstream gradient ∂L/∂s, (rows,) contiguous
        GA,  # pointer to ∂L/∂a (written if WRITE_A)
        GB,  # pointer to ∂L/∂b (written if WRITE_B)
        n_cols,  # elements per row
        WRITE_A: tl.constexpr,  # a needs a gradient
        WRITE_B: tl.constexpr,  # b needs a gradient
        BLOCK: tl.constexpr,  # elements per tile
    ):
        row = tl.program_id(0)
        tile = tl.program_id(1)
        cols = tile * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        offs = row.to(tl.int64) * n_cols + cols
        two_go = 2.0 * tl.load(GO + row).to(tl.float32)
        a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)  # fp32 math for every dtype
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        d = two_go * (a - b)
        if WRITE_A:
            tl.store(GA + offs, d.to(GA.dtype.element_ty), mask=mask)
        if WRITE_B:
            tl.store(GB + offs, (-d).to(GB.dtype.element_ty), mask=mask)


def rowwise_sqdist_forward_triton(a: torch.Tensor, b: torch.Tensor, *, block: int | None = None) -> torch.Tensor:
    """Σ_j (a_ij − b_ij)² per row, accumulated in fp32, returned in the inputs' dtype (as the reference)."""
    check_pair("rowwise_sqdist", a, b)
    if a.numel() == 0:
        return torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
    fmt = row_format(a, b)
    ar, br = as_rows(a.detach(), fmt), as_rows(b.detach(), fmt)
    partials = sumsq_partials(ar, br, block_for(ar.shape[1], block))
    total = partials[:, 0] if partials.shape[1] == 1 else partials.sum(1)
    return total.to(a.dtype)


def rowwise_sqdist_backward_triton(a: torch.Tensor, b: torch.Tensor, grad_out: torch.Tensor, need_a: bool,
                                   need_b: bool, *, block: int | None = None):
    fmt = row_format(a, b)
    grad_a = torch.empty_like(a, memory_format=fmt) if need_a else None
    grad_b = torch.empty_like(b, memory_format=fmt) if need_b else None
    if a.numel() == 0 or not (need_a or need_b):
        return grad_a, grad_b
    ar, br = as_rows(a, fmt), as_rows(b, fmt)
    rows, n_cols = ar.shape
    block = block_for(n_cols, block)
    ga = as_rows(grad_a, fmt) if need_a else ar  # an unused pointer argument when not written
    gb = as_rows(grad_b, fmt) if need_b else br
    # the upstream gradient of a .mean() arrives expanded (stride 0): B contiguous values are cheap
    go = grad_out.reshape(rows).contiguous()
    sqdist_backward_kernel[(rows, triton.cdiv(n_cols, block))](
        ar, br, go, ga, gb, n_cols, WRITE_A=need_a, WRITE_B=need_b, BLOCK=block, num_warps=num_warps_for(block))
    return grad_a, grad_b


class RowwiseSqDist(torch.autograd.Function):
    """Forward: the partial-sum reduction. Backward: one fused pass writing both input gradients."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return rowwise_sqdist_forward_triton(a, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        a, b = ctx.saved_tensors
        return rowwise_sqdist_backward_triton(a, b, grad_out, *ctx.needs_input_grad[:2])


def rowwise_sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_j (a_ij − b_ij)² over every non-batch element, one value per sample (shape ``(B,)``).

    Triton on CUDA tensors, the PyTorch reference otherwise (see :mod:`kernels._dispatch`).
    """
    if use_triton(a, b):
        return RowwiseSqDist.apply(a, b)
    return rowwise_sqdist_reference(a, b)
