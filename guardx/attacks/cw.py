"""Carlini–Wagner L2 with a fixed c (no binary search), like torchattacks' ``CW``, whose docstring calls c
the "box-constraint" parameter as the paper does.

Minimises ‖x' − x‖₂² + c · max(Z_y − max_{j≠y} Z_j, −κ) over x' = (tanh(w) + 1)/2 with Adam, and
returns, per sample, the misclassified iterate with the smallest L2 distance (the clean image if none was).
The paper's setting is c = 1e-5 with no ε bound, so robust accuracy under CW is the share of samples
for which no misclassified point was found at any distance.

Written here because torchattacks 3.5.1 gets three things wrong:

* its margin takes ``max((1 - onehot) * Z)`` and ``max(onehot * Z)``, which are 0, not the logits, when
  those logits are negative (Harry24k/adversarial-attacks-pytorch#184); here the true class is masked
  with −inf and its logit gathered;
* it maps pixels at exactly 0 or 1 to w = ±inf (atanh(±1)), where tanh has zero gradient, so they can
  never move; here the tanh-space start is shrunk by 1e-6 (as Carlini's and cleverhans' code do);
* its early abort compares the *batch's* summed loss, so a sample's result depends on its batch-mates;
  here Carlini's rule (stop when the loss has not fallen by 0.01 % over steps/10 iterations) is applied to
  each sample's own loss, so results do not depend on batching or on the number of ranks.
"""
from __future__ import annotations

import torch

from guardx.attacks import register_attack


def cw_l2(model, x: torch.Tensor, y: torch.Tensor, *, c: float = 1e-5, kappa: float = 0.0, steps: int = 50,
          lr: float = 0.01, abort_early: bool = True) -> torch.Tensor:
    x = x.detach()
    w = torch.atanh((2 * x - 1) * (1 - 1e-6)).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)  # elementwise: each sample's trajectory is its own
    best = x.clone()
    best_l2 = torch.full((len(x),), float("inf"), device=x.device, dtype=x.dtype)
    running = torch.ones(len(x), dtype=torch.bool, device=x.device)
    prev = best_l2.clone()
    check_every = max(steps // 10, 1)
    view = (-1,) + (1,) * (x.dim() - 1)
    for step in range(steps):
        adv = (torch.tanh(w) + 1) / 2
        l2 = (adv - x).flatten(1).pow(2).sum(1)
        logits = model(adv)
        real = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
        loss = l2 + c * (real - other).clamp(min=-kappa)
        (grad,) = torch.autograd.grad(loss.sum(), w)
        with torch.no_grad():
            # the iterate just evaluated: keep it if misclassified and closer than the best so far
            improved = running & (logits.argmax(1) != y) & (l2 < best_l2)
            best_l2 = torch.where(improved, l2, best_l2)
            best = torch.where(improved.view(view), adv, best)
            if abort_early and step % check_every == 0:
                running &= ~(loss > prev * 0.9999)
                prev = torch.where(running, loss, prev)
            if not running.any():
                break
            w_before = w.detach().clone()
        w.grad = grad
        opt.step()
        with torch.no_grad():  # an aborted sample stays where it stopped
            w.copy_(torch.where(running.view(view), w, w_before))
    return best.clamp(0, 1)


@register_attack("cw", bounded=False, budget="steps", params={
    "c": "CW-L2 weight c of the margin term (the paper: 1e-5)", "kappa": "CW-L2 confidence kappa",
    "steps": "CW-L2 Adam steps (torchattacks' default; the paper gives only c)", "lr": "CW-L2 Adam learning rate"},
    ranges={"c": (0, None), "kappa": (0, None), "steps": (1, None), "lr": (0, None)})
def _cw(model, x, y, eps=None, *, c: float = 1e-5, kappa: float = 0.0, steps: int = 50, lr: float = 0.01,
        seed: int | None = None):
    """CW-L2 (``eps`` is ignored: the paper exempts CW from the ε bound)."""
    return cw_l2(model, x, y, c=c, kappa=kappa, steps=steps, lr=lr)
