"""Largest eigenvalues of the input-space Hessian of each sample's loss, from Hessian-vector products.

For a batch, H_i = ∇²_{z_i} ℓ(f(z_i), y_i) where z_i is the tensor the network sees: the normalised
image (``space="normalized"``, default: where GUARD's regulariser acts, as in the official code) or the
pixel image (``space="pixel"``). BatchNorm runs in eval mode, so samples do not interact and the Hessian
of Σ_i ℓ_i is block diagonal: one double-backward pass gives H_i v_i for every sample at once, and both
solvers below run batched, one Krylov space per sample.

* ``lanczos`` (default): ``iters`` Lanczos steps with full re-orthogonalisation; the top-k Ritz values of
  the tridiagonal matrix approximate the k algebraically largest eigenvalues (exact once ``iters`` reaches
  the input dimension). A Krylov space that closes early (a piecewise-linear network's input Hessian has
  rank ≤ classes − 1) continues from a fresh random direction orthogonal to it.
* ``power``: power iteration with deflation; converges to the eigenvalues largest in *magnitude* (equal
  to the largest ones for the positive semi-definite Hessians of ReLU networks), more slowly.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from guardx.models.wrapper import split_normalizer


def batched_hvp(model, x: torch.Tensor, y: torch.Tensor, space: str = "normalized") -> tuple[Callable, torch.Size]:
    """``(hvp, shape)``: ``hvp(v)`` returns H_i v_i for each sample (v of ``shape``, flattened or not)."""
    to_input, net = split_normalizer(model, space)
    z = to_input(x).detach().requires_grad_(True)
    losses = F.cross_entropy(net(z), y, reduction="none")
    (g,) = torch.autograd.grad(losses.sum(), z, create_graph=True)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        (hv,) = torch.autograd.grad(g, z, grad_outputs=v.reshape(z.shape), retain_graph=True)
        return hv.reshape(len(z), -1).detach()

    return hvp, z.shape


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def _orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove from each w_i its components along the rows of basis_i (twice: one pass loses orthogonality)."""
    for _ in range(2):
        w = w - torch.einsum("bjd,bj->bd", basis, torch.einsum("bjd,bd->bj", basis, w))
    return w


def lanczos(hvp: Callable, batch: int, dim: int, *, k: int, iters: int, generator: torch.Generator | None,
            device, dtype) -> torch.Tensor:
    """Top-k Ritz values (descending) per sample, shape (batch, k)."""
    m = min(iters, dim)
    basis = torch.zeros(batch, m, dim, device=device, dtype=dtype)
    alpha = torch.zeros(batch, m, device=device, dtype=dtype)
    beta = torch.zeros(batch, m, device=device, dtype=dtype)
    v = _unit(torch.randn(batch, dim, generator=generator, dtype=dtype).to(device))
    for j in range(m):
        basis[:, j] = v
        w = hvp(v)
        alpha[:, j] = (w * v).sum(1)
        w = _orthogonalise(w, basis[:, : j + 1])  # also removes the alpha·v and beta·v_prev terms
        b = w.norm(dim=1)
        if j == m - 1:
            break
        scale = alpha[:, : j + 1].abs().amax(1).clamp_min(1.0)
        closed = b <= 1e-6 * scale  # invariant subspace found: continue from a fresh orthogonal direction
        if closed.any():
            fresh = _orthogonalise(torch.randn(batch, dim, generator=generator, dtype=dtype).to(device),
                                   basis[:, : j + 1])
            w = torch.where(closed[:, None], fresh, w)
            b = torch.where(closed, torch.zeros_like(b), b)
        beta[:, j] = b
        v = _unit(w)
    t = torch.diag_embed(alpha) + torch.diag_embed(beta[:, : m - 1], 1) + torch.diag_embed(beta[:, : m - 1], -1)
    ritz = torch.linalg.eigvalsh(t)  # ascending
    return ritz.flip(-1)[:, :k]


def power_iteration(hvp: Callable, batch: int, dim: int, *, k: int, iters: int,
                    generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """k eigenvalues of largest magnitude per sample (descending by magnitude), by deflation."""
    found_vals, found_vecs = [], []

    def deflated(v):
        w = hvp(v)
        for lam, u in zip(found_vals, found_vecs):
            w = w - lam[:, None] * u * (u * v).sum(1, keepdim=True)
        return w

    for _ in range(k):
        v = _unit(torch.randn(batch, dim, generator=generator, dtype=dtype).to(device))
        lam = torch.zeros(batch, device=device, dtype=dtype)
        for _ in range(iters):
            w = deflated(v)
            lam = (w * v).sum(1)
            v = _unit(w)
        found_vals.append(lam)
        found_vecs.append(v)
    return torch.stack(found_vals, 1)


def hessian_eigenvalues(model, x: torch.Tensor, y: torch.Tensor, *, k: int = 1, iters: int = 20,
                        method: str = "lanczos", space: str = "normalized", seed: int = 0) -> torch.Tensor:
    """The k largest input-Hessian eigenvalues of each sample's cross-entropy, shape (B, k)."""
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    model.eval()  # running BatchNorm statistics: samples must not interact
    hvp, shape = batched_hvp(model, x, y, space)
    dim = math.prod(shape[1:])
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same start vectors on any device
    solve = lanczos if method == "lanczos" else power_iteration
    return solve(hvp, len(x), dim, k=min(k, dim), iters=iters, generator=gen, device=x.device, dtype=x.dtype)
