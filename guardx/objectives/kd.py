"""Knowledge distillation to soft labels (the student's loss on the distilled set)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from guardx.objectives._common import stats_dict


class SoftLabelKD:
    """KL(softmax(t/T) ‖ softmax(s/T)), batch mean, as SRe2L's train_FKD (no T² factor).

    ``targets`` are teacher logits (store mode); with ``teacher`` given (online mode) they are hard labels
    and the teacher labels the batch itself.
    """

    backward_in_forward = None

    def __init__(self, temperature: float = 20.0, teacher=None):
        self.temperature, self.teacher = temperature, teacher

    def __repr__(self) -> str:
        return f"SoftLabelKD(T={self.temperature:g}, {'online' if self.teacher is not None else 'stored'})"

    def __call__(self, model, x: torch.Tensor, targets: torch.Tensor):
        if self.teacher is not None:
            with torch.no_grad():
                targets = self.teacher(x)
        t = self.temperature
        student = F.log_softmax(model(x) / t, dim=1)
        loss = F.kl_div(student, F.softmax(targets.float() / t, dim=1), reduction="batchmean")
        return loss, stats_dict(kl=loss, loss=loss)
