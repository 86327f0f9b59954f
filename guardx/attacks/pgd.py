"""L∞ sign-gradient attacks: PGD (Madry et al.), FGSM (one step) and MIM (momentum, Dong et al.).

Step for step these are torchattacks' ``PGD`` / ``FGSM`` / ``MIFGSM`` (mean cross-entropy,
``alpha * sign(direction)``, project to the ε-ball, clamp to [0, 1]); without random start they give
identical adversarial examples (tested). Written here rather than called because guardx needs three
things torchattacks lacks:

* ``generator``: the random start is drawn from a caller-seeded generator, not the global RNG, so an
  evaluation is reproducible and independent of how samples are split across ranks;
* ``early_stop=True`` freezes a sample at its first misclassified iterate and stops computing on it:
  robust accuracy under the worst iterate (as APGD reports it), never higher than the last-iterate
  number, and much cheaper at large ε where most samples fall in a few steps;
* one loop for all three, so MIM gets the seeding and early stop too; and where a sample's gradient is
  exactly zero (a saturated softmax) MIM keeps following its momentum, where torchattacks' 0/0 makes the
  momentum NaN and freezes the sample for the rest of the attack.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from guardx.attacks import register_attack


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(int(seed))


def uniform_noise(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform in [-eps, eps], from ``generator`` (on its device) when one is given."""
    if generator is None:
        return torch.empty_like(x).uniform_(-eps, eps)
    u = torch.rand(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return ((2 * u - 1) * eps).to(x.device)


def pgd(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
        random_start: bool = True, generator: torch.Generator | None = None,
        early_stop: bool = False) -> torch.Tensor:
    """Adversarial batch in [0, 1] with ‖x_adv − x‖∞ ≤ eps. The model's mode is the caller's choice."""
    return _iterate(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                    generator=generator, early_stop=early_stop, decay=None)


def mim(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int, decay: float = 1.0,
        early_stop: bool = False) -> torch.Tensor:
    """MI-FGSM: the step follows the sign of g_t = decay · g_{t-1} + ∇ℓ / mean|∇ℓ| (per sample)."""
    return _iterate(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=False, generator=None,
                    early_stop=early_stop, decay=decay)


def _iterate(model, x, y, *, eps, alpha, steps, random_start, generator, early_stop, decay):
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    adv = x.clone()
    if random_start:
        adv = (adv + uniform_noise(x, eps, generator)).clamp(0, 1)
    momentum = torch.zeros_like(x) if decay is not None else None
    if not early_stop:
        for _ in range(steps):
            adv, momentum = _step(model, adv, x, y, eps, alpha, momentum, decay)
        return adv
    active = torch.arange(len(x), device=x.device)
    for _ in range(steps):
        with torch.no_grad():  # a sample already fooled keeps its adversarial point
            fooled = model(adv[active]).argmax(1) != y[active]
        active = active[~fooled]
        if len(active) == 0:
            break
        m = momentum[active] if momentum is not None else None
        adv[active], m = _step(model, adv[active], x[active], y[active], eps, alpha, m, decay)
        if momentum is not None:
            momentum[active] = m
    return adv


def _step(model, adv, x, y, eps, alpha, momentum, decay):
    adv = adv.detach().requires_grad_(True)
    loss = F.cross_entropy(model(adv), y)
    (grad,) = torch.autograd.grad(loss, adv)
    if momentum is not None:
        scale = grad.abs().mean(dim=tuple(range(1, grad.dim())), keepdim=True)
        grad = grad / torch.where(scale > 0, scale, torch.ones_like(scale)) + momentum * decay
        momentum = grad
    adv = adv.detach() + alpha * grad.sign()
    return (x + (adv - x).clamp(-eps, eps)).clamp(0, 1).detach(), momentum


EARLY_STOP_HELP = ("PGD and MIM: keep a sample's first misclassified iterate and stop attacking it "
                   "(worst-iterate accuracy, <= last-iterate; much faster at large eps)")


@register_attack("pgd", budget="steps", params={
    "steps": "PGD iterations (PGD-100 in the paper)", "alpha": "PGD step size; 0 = eps/4",
    "random_start": "PGD random start inside the eps-ball", "early_stop": EARLY_STOP_HELP},
    ranges={"steps": (1, None), "alpha": "pixels"})
def _pgd(model, x, y, eps, *, steps: int = 100, alpha: float = 0.0, random_start: bool = True,
         early_stop: bool = False, seed: int | None = None, generator: torch.Generator | None = None):
    """PGD-``steps`` with step ``alpha`` (0 = ε/4, the paper's) from a uniform random start."""
    gen = generator if generator is not None else seeded_generator(seed, x.device)
    return pgd(model, x, y, eps=eps, alpha=alpha or eps / 4, steps=steps, random_start=random_start,
               generator=gen, early_stop=early_stop)


@register_attack("fgsm")
def _fgsm(model, x, y, eps, *, seed: int | None = None):
    """One step of size ε from the clean point (Goodfellow et al.)."""
    return pgd(model, x, y, eps=eps, alpha=eps, steps=1, random_start=False)


@register_attack("mim", budget="steps", keys={"early_stop": "pgd_early_stop"}, params={
    "steps": "MIM (momentum iterative FGSM) iterations", "decay": "MIM momentum decay mu",
    "alpha": "MIM step size; 0 = eps/4", "early_stop": EARLY_STOP_HELP},
    ranges={"steps": (1, None), "decay": (0, None), "alpha": "pixels"})
def _mim(model, x, y, eps, *, steps: int = 20, decay: float = 1.0, alpha: float = 0.0,
         early_stop: bool = False, seed: int | None = None):
    """MIM-``steps``; ``alpha`` 0 = ε/4 (torchattacks' default ratio, 2/255 at 8/255)."""
    return mim(model, x, y, eps=eps, alpha=alpha or eps / 4, steps=steps, decay=decay, early_stop=early_stop)
