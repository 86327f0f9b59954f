"""The row reduction both ops share: Σ_j (a_ij − b_ij)² (or Σ_j a_ij²) per row, tiled over the row.

A GUARD row is one sample (3·224·224 = 150,528 values at ImageNet size) and a batch has only 32 rows,
so one program per row would leave most of a GPU idle. Instead a (row, tile) grid writes one fp32
partial sum per tile; callers finish the (tiny) sum over tiles. Partials instead of atomics keep the
result deterministic: the same inputs give the same bits on every run.
"""
from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON

MAX_BLOCK = 4096  # elements per tile: 16 KiB of fp32 per operand, enough to saturate HBM per program


def block_for(n_cols: int, block: int | None = None) -> int:
    """Tile width: a power of two (tl.arange needs one), at most MAX_BLOCK, no wider than the row needs."""
    if block is not None:
        if block < 16 or block & (block - 1):
            raise ValueError(f"block must be a power of two >= 16, got {block}")
        return block
    import triton

    return min(MAX_BLOCK, max(16, triton.next_power_of_2(n_cols)))


def num_warps_for(block: int) -> int:
    return 8 if block >= 2048 else 4


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def sumsq_partials_kernel(
        A,  # pointer to the first operand, (rows, n_cols) contiguous
        B,  # pointer to the second operand (same layout); ignored unless HAS_B
        P,  # pointer to the fp32 partial sums, (rows, n_tiles) contiguous
        n_cols,  # elements per row
        n_tiles,  # tiles per row = cdiv(n_cols, BLOCK)
        HAS_B: tl.constexpr,  # Σ(a − b)² when True, Σ a² when False
        BLOCK: tl.constexpr,  # elements per tile
    ):
        row = tl.program_id(0)
        tile = tl.program_id(1)
        cols = tile * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        offs = row.to(tl.int64) * n_cols + cols  # int64: rows·n_cols can pass 2^31 at large batch × resolution
        # fp16/bf16 are upcast before any arithmetic: accumulate in fp32 (and bf16 math is wrong in the
        # CPU interpreter)
        v = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            v = v - tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(P + row * n_tiles + tile, tl.sum(v * v, axis=0))

    @triton.jit
    def row_total(
        P,  # pointer to the fp32 partial sums, (rows, n_tiles) contiguous
        row,  # this program's row
        n_tiles,  # partials per row
        CHUNK: tl.constexpr,  # partials read per loop step
    ):
        """Σ of one row's partials, in a fixed order (every program of the row gets the same bits)."""
        acc = tl.zeros([CHUNK], dtype=tl.float32)
        for t0 in range(0, n_tiles, CHUNK):
            t = t0 + tl.arange(0, CHUNK)
            acc += tl.load(P + row * n_tiles + t, mask=t < n_tiles, other=0.0)
        return tl.sum(acc, axis=0)


def sumsq_partials(a_rows: torch.Tensor, b_rows: torch.Tensor | None, block: int) -> torch.Tensor:
    """Launch :func:`sumsq_partials_kernel`; returns the (rows, n_tiles) fp32 partials."""
    import triton

    rows, n_cols = a_rows.shape
    n_tiles = triton.cdiv(n_cols, block)
    partials = torch.empty((rows, n_tiles), dtype=torch.float32, device=a_rows.device)
    sumsq_partials_kernel[(rows, n_tiles)](
        a_rows, a_rows if b_rows is None else b_rows, partials, n_cols, n_tiles,
        HAS_B=b_rows is not None, BLOCK=block, num_warps=num_warps_for(block))
    return partials
