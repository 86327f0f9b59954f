"""CDA: the crop-scale curriculum follows the authors' schedule, and recover applies it per iteration."""
from __future__ import annotations

import math

import pytest
import torch

from guardx.distill.cda import crop_scale_at, scale_schedule


def _cda_reference(iteration: int, total: int, mode: str, milestone: float) -> float:
    """min_crop as CDA's recover_cda_in1k.py computes it (l. 51-66), transcribed."""
    min_crop = 0.08
    if iteration < milestone * total:
        if mode == "step":
            min_crop = 1.0
        elif mode == "linear":
            min_crop = 0.08 + (1.0 - 0.08) * (1 - iteration / (milestone * total))
        elif mode == "cosine":
            min_crop = 0.08 + (1.0 - 0.08) * (1 + math.cos(math.pi * iteration / (milestone * total))) / 2
    return min_crop


@pytest.mark.parametrize("mode", ["step", "linear", "cosine"])
@pytest.mark.parametrize("milestone", [0.0, 0.5, 1.0])
def test_crop_scale_follows_the_cda_schedule(mode, milestone):
    total = 40
    for it in range(total):
        lo, hi = crop_scale_at(it, total, schedule=mode, milestone=milestone)
        assert hi == 1.0
        assert lo == pytest.approx(_cda_reference(it, total, mode, milestone), abs=1e-12), it


def test_cosine_default_falls_from_the_whole_image_to_sre2l_crops():
    total = 1000
    los = [crop_scale_at(it, total)[0] for it in range(total)]
    assert los[0] == 1.0 and los[500] == pytest.approx(0.54) and los[-1] == pytest.approx(0.08, abs=1e-4)
    assert all(a >= b for a, b in zip(los, los[1:]))  # global to local: never widens again


def test_recover_applies_the_schedule_each_iteration(tiny_cfg, monkeypatch):
    import guardx.recover as recover
    from guardx.models import create_model

    cfg = tiny_cfg("recover.iterations=5", "recover.jitter=0")
    teacher = create_model("resnet18_small", num_classes=10, width=4, mean=[0.5] * 3, std=[0.5] * 3).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    seen = []
    crop = recover.random_resized_crop_batch

    def recording_crop(x, size, scale, flip, gen):
        seen.append(tuple(scale))
        return crop(x, size, scale, flip, gen)

    monkeypatch.setattr(recover, "random_resized_crop_batch", recording_crop)
    targets = torch.tensor([0, 1])
    recover.synthesize(teacher, targets, cfg, resolution=16, seed=0, scale_at=scale_schedule(cfg.cda, 5))
    assert seen == [crop_scale_at(it, 5) for it in range(5)]
    seen.clear()
    recover.synthesize(teacher, targets, cfg, resolution=16, seed=0)  # default: SRe2L's fixed range
    assert seen == [tuple(cfg.recover.rrc_scale)] * 5
