"""ZCA whitening as MTT uses it: kornia's ``ZCAWhitening(eps=0.1, compute_inv=True)`` fitted on the train set.

MTT (``utils.get_dataset``, ``--zca``) loads images with ``ToTensor()`` only (pixels in [0, 1], no mean/std
normalisation), fits the whitening on the whole training split and trains experts, distils and evaluates in
the whitened space. The recipe (kornia ``zca_mean``), written here with ``torch.linalg`` instead of kornia:

    X  (N, D) flattened images, μ = mean over samples
    C  = (X - μ)ᵀ(X - μ) / (N - 1)                  unbiased covariance, D × D
    C  = U diag(s) Uᵀ                                eigendecomposition (kornia takes the SVD; C is symmetric PSD,
                                                     so both give the same U diag(·) Uᵀ products)
    T  = U diag((s + ε)^-½) Uᵀ,  T⁻¹ = U diag((s + ε)^½) Uᵀ
    zca(x) = (x - μ) T,  inverse(y) = y T⁻¹ + μ

ε = 0.1 regularises the small eigenvalues (MTT's value). The matrix is D × D with D = 3·R²: 38 MB at 32 px,
600 MB at 64 px; at 128 px (9.7 GB) it is refused, as MTT never whitens its 128 px ImageNet subsets.
A student trained on a ZCA-distilled set sees pixels in [0, 1] and applies ``ZCA.forward`` first, inside
the model (as the normalisation is), so attacks keep acting on pixels.
"""
from __future__ import annotations

import torch
import torch.nn as nn

MAX_FEATURES = 3 * 64 * 64  # above this the D × D matrix is too large to be worth it (MTT stops at 64 px too)


class ZCA(nn.Module):
    """``forward(x)``: whiten images (B, C, H, W); ``inverse(y)``: back to pixels. Fit with :meth:`fit`."""

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor, inverse_matrix: torch.Tensor,
                 shape: tuple[int, int, int], eps: float):
        super().__init__()
        self.shape, self.eps = tuple(int(s) for s in shape), float(eps)
        self.register_buffer("mean", mean.reshape(1, -1))
        self.register_buffer("matrix", matrix)
        self.register_buffer("inverse_matrix", inverse_matrix)

    @classmethod
    @torch.no_grad()
    def fit(cls, images: torch.Tensor, eps: float = 0.1, *, chunk: int = 4096, device=None) -> "ZCA":
        """Fit on ``images`` (N, C, H, W): float in [0, 1], or uint8 (divided by 255). Statistics are
        accumulated in float64 chunk by chunk, so the set may stay uint8 on the CPU."""
        n, shape = len(images), tuple(images.shape[1:])
        d = shape[0] * shape[1] * shape[2]
        if d > MAX_FEATURES:
            raise ValueError(f"ZCA of {shape} images needs a {d}x{d} matrix ({d * d * 4 / 2**30:.1f} GiB); "
                             f"whiten at most {MAX_FEATURES} features (64 px), as MTT does")
        if n < 2:
            raise ValueError("ZCA needs at least 2 images")
        device = device or images.device
        total = torch.zeros(d, dtype=torch.float64, device=device)
        gram = torch.zeros(d, d, dtype=torch.float64, device=device)
        for start in range(0, n, chunk):
            x = _as_float(images[start:start + chunk]).to(device, torch.float64).reshape(-1, d)
            total += x.sum(0)
            gram += x.T @ x
        mean = total / n
        cov = (gram - n * torch.outer(mean, mean)) / (n - 1)
        s, u = torch.linalg.eigh(cov)
        s = s.clamp_min(0)  # round-off can make a zero eigenvalue slightly negative
        matrix = (u * (s + eps).rsqrt()) @ u.T
        inverse_matrix = (u * (s + eps).sqrt()) @ u.T
        return cls(mean.float(), matrix.float(), inverse_matrix.float(), shape, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(len(x), -1)
        return ((flat - self.mean.to(x.dtype)) @ self.matrix.to(x.dtype)).reshape(x.shape)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        flat = y.reshape(len(y), -1)
        return (flat @ self.inverse_matrix.to(y.dtype) + self.mean.to(y.dtype)).reshape(y.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, eps={self.eps:g}"

    # plain-tensor state, loadable with weights_only=True
    def to_state(self) -> dict:
        return {"mean": self.mean.cpu(), "matrix": self.matrix.cpu(), "inverse_matrix": self.inverse_matrix.cpu(),
                "shape": list(self.shape), "eps": self.eps}

    @classmethod
    def from_state(cls, state: dict) -> "ZCA":
        return cls(state["mean"], state["matrix"], state["inverse_matrix"], tuple(state["shape"]), state["eps"])


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255) if x.dtype == torch.uint8 else x
