"""L∞ projected gradient descent (Madry et al.), shared by evaluation and adversarial training.

Step for step the same as torchattacks' ``PGD`` (mean cross-entropy, ``alpha * sign(grad)``, project
to the ε-ball, clamp to [0, 1]); with ``random_start=False`` both give identical adversarial examples.

``early_stop=True`` freezes a sample at its first misclassified iterate and stops computing on it:
robust accuracy under the worst iterate (as APGD reports it), never higher than the last-iterate
number, and much cheaper at large ε where most samples fall in a few steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def uniform_noise(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform in [-eps, eps]; drawn on the CPU when a (CPU) generator is given, for reproducibility."""
    if generator is None:
        return torch.empty_like(x).uniform_(-eps, eps)
    return ((2 * torch.rand(x.shape, generator=generator, dtype=x.dtype) - 1) * eps).to(x.device)


def pgd(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
        random_start: bool = True, generator: torch.Generator | None = None,
        early_stop: bool = False) -> torch.Tensor:
    """Adversarial batch in [0, 1] with ‖x_adv − x‖∞ ≤ eps. The model's mode is the caller's choice."""
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    adv = x.clone()
    if random_start:
        adv = (adv + uniform_noise(x, eps, generator)).clamp(0, 1)
    if not early_stop:
        for _ in range(steps):
            adv = _step(model, adv, x, y, eps, alpha)
        return adv
    active = torch.arange(len(x), device=x.device)
    for _ in range(steps):
        with torch.no_grad():  # a sample already fooled keeps its adversarial point
            fooled = model(adv[active]).argmax(1) != y[active]
        active = active[~fooled]
        if len(active) == 0:
            break
        adv[active] = _step(model, adv[active], x[active], y[active], eps, alpha)
    return adv


def _step(model, adv, x, y, eps, alpha):
    adv = adv.detach().requires_grad_(True)
    loss = F.cross_entropy(model(adv), y)
    (grad,) = torch.autograd.grad(loss, adv)
    adv = adv.detach() + alpha * grad.sign()
    return (x + (adv - x).clamp(-eps, eps)).clamp(0, 1).detach()
