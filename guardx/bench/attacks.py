"""Cost of each evaluation attack at the paper's settings: attacked images per second.

    guardx bench attacks --device cuda --model resnet18 --resolution 224 --batch-size 128 \\
        --checkpoint runs/imagenet1k/guard/train/student.pt          # the GPU run (ImageNet-sized inputs)
    guardx bench attacks --smoke                                     # tiny CPU run: checks the command

What a number is. One ``guardx.attacks.run_attack`` call on a fixed batch of ``--batch-size`` images, timed
after one untimed warm-up call (``measure.timed_blocks``: CUDA events + synchronize on a GPU, perf_counter
on a CPU), repeated ``--repeats`` times; reported as images/s = batch / seconds per call (mean ± std over
repeats). Inputs are uniform random images whose labels are the model's own predictions, so every image
is clean-correct and attacked in full; in ``guardx evaluate`` misclassified images are skipped, so a real
evaluation costs (clean accuracy) × this. Budgets are the paper's (``pgd100``: 100 steps, α = ε/4, random
start; ``mim``: 20 steps; ``cw``: 50 Adam steps, c = 1e-5; ``square``: 5000 queries; ``autoattack``:
standard, 100 iterations, 9 targets), all without early stop, so the random-weight numbers are the worst
case. Square and AutoAttack stop attacking an image once it is broken: their cost depends on the model
(``--checkpoint``) far more than PGD's. Excluded: data loading and the clean forward pass.

Results: ``eval-attacks-<device>-<model>-r<res>-bs<B>.{json,md}``.
"""
from __future__ import annotations

import torch

from guardx.bench.measure import (IMAGENET_MEAN, IMAGENET_STD, device_tag, environment, load_average,
                                  resolve_device, save_result, summary, timed_blocks)
from guardx.errors import GuardxError

ATTACKS = "pgd100,fgsm,mim,cw,square,autoattack"
PAPER = {"pgd": {}, "fgsm": {}, "mim": {"steps": 20, "decay": 1.0}, "cw": {"c": 1e-5, "steps": 50, "lr": 0.01},
         "square": {"queries": 5000}, "autoattack": {"version": "standard", "steps": 100, "targets": 9}}


def run_attacks(a, progress=print) -> dict:
    from guardx.attacks import parse_attack, run_attack
    from guardx.models import create_model
    from guardx.models._io import load_model
    from guardx.utils.misc import parse_fraction

    budgets = {k: dict(v) for k, v in PAPER.items()}
    if a.smoke:
        a.device, a.model, a.classes, a.resolution, a.batch_size, a.repeats = "cpu", "resnet18_small", 10, 16, 8, 2
        a.out, a.attacks = "/tmp/guardx-bench-smoke", ATTACKS.replace("pgd100", "pgd3")
        budgets.update(mim={"steps": 3}, cw={"steps": 3}, square={"queries": 10},
                       autoattack={"steps": 2, "targets": 2, "square_queries": 10})
    device = resolve_device(a.device)
    try:
        eps = parse_fraction(a.eps)
    except ValueError as e:
        raise GuardxError(str(e)) from None
    torch.manual_seed(0)
    if a.checkpoint:
        model, meta = load_model(a.checkpoint, device)
        a.model, a.resolution = meta["name"], meta["resolution"]
    else:
        model = create_model(a.model, num_classes=a.classes, resolution=a.resolution, mean=list(IMAGENET_MEAN),
                             std=list(IMAGENET_STD)).to(device).eval()
    x = torch.rand(a.batch_size, 3, a.resolution, a.resolution, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)

    rows, load_before = {}, load_average()
    for name in [s for s in a.attacks.split(",") if s]:
        base, suffix = parse_attack(name)
        params = {**budgets.get(base, {}), **suffix}
        seconds = timed_blocks(lambda: run_attack(name, model, x, y, eps, seed=0, **params), device,
                               warmup=1, repeats=a.repeats, iters=1)
        rates = [a.batch_size / s for s in seconds]
        rows[name] = {"params": params, "seconds_per_call": seconds, "images_per_s": summary(rates)}
        progress(f"{name:>10}: {rows[name]['images_per_s']['mean']:.2f} img/s")

    stem = f"eval-attacks-{device_tag(device)}-{a.model}-r{a.resolution}-bs{a.batch_size}"
    settings = {k: v for k, v in vars(a).items() if k != "handler"} | {"eps": eps}
    data = {"benchmark": "eval_attacks", "settings": settings, "environment": environment(device),
            "load": {"before": load_before, "after": load_average()}, "attacks": rows}
    md = [f"# Evaluation attacks: images/s ({device_tag(device)}, {a.model} @ {a.resolution}px, batch {a.batch_size}, "
          f"ε = {a.eps}, {'checkpoint ' + a.checkpoint if a.checkpoint else 'random weights'})", "",
          "| attack | params | images/s (mean ± std) |", "|---|---|---:|"]
    for n, r in rows.items():
        rate = r["images_per_s"]
        md.append(f"| {n} | {r['params'] or 'paper defaults'} | {rate['mean']:.2f} ± {rate['std']:.2f} |")
    json_path, md_path = save_result(a.out, stem, data, "\n".join(md) + "\n")
    data["files"] = [str(json_path), str(md_path)]
    return data
