"""What the overhead benchmark compares, and against which numbers (plain data: no torch import, so
``guardx --help`` stays fast)."""

# name → label; the order is the table's. Kinds: guardx's objectives, A/B ablations of one guardx
# optimisation, and baselines (straightforward or official-code implementations, guardx/bench/baselines.py).
METHODS = {
    "plain": "Plain (SRe2L squeeze, CE)",
    "guard_lossdiff": "GUARD lossdiff (official first-order)",
    "guard_exact": "GUARD exact (eq. 11)",
    "guard_cure": "GUARD cure (official CIFAR code)",
    "gradnorm": "GradNorm (Table 3 ablation)",
    "adv": "Adv training, PGD-{k} (guardx: eval-BN, input-only attack)",
    "guard_lossdiff_nofold": "A/B: GUARD lossdiff, BatchNorm not folded",
    "guard_exact_nofold": "A/B: GUARD exact, BatchNorm not folded",
    "guard_exact_autograd": "A/B: GUARD exact, autograd's convolution double backward",
    "ref_adv_official": "baseline: Adv training, PGD-{k} as the official code (train-mode attack, full backward)",
    "ref_lossdiff_4fwd": "baseline: lossdiff as the official code (4 forwards)",
    "ref_exact_naive": "baseline: exact by naive double backprop",
}


def method_kind(name: str) -> str:
    if name.startswith("ref_"):
        return "baseline"
    return "ablation" if name.endswith(("_nofold", "_autograd")) else "guardx"


# each guardx method against the implementation it replaces (same run): "<ours> takes x× the time of <ref>"
COMPARE = [("guard_lossdiff", "ref_lossdiff_4fwd"), ("guard_exact", "ref_exact_naive"),
           ("adv", "ref_adv_official"), ("guard_lossdiff", "guard_lossdiff_nofold"),
           ("guard_exact", "guard_exact_nofold"), ("guard_exact", "guard_exact_autograd")]

# Paper, Table 4: one A100 80GB PCIe, batch 32, 5 runs; Adv Training as in Section 3.2.
PAPER_TABLE4 = {"device": "NVIDIA A100 80GB PCIe", "batch_size": 32,
                "GUARD": {"s_per_iter": 0.007, "std": 2.661e-4, "peak_mem_mib": 3851},
                "Adv Training": {"s_per_iter": 2.198, "std": 6.735e-4, "peak_mem_mib": 4211}}

# Project performance targets (issue 14), checked as ratios of medians within one run (never in tests).
TARGETS = [
    ("GUARD lossdiff step ≤ 2.7× plain", "guard_lossdiff", "plain", "time", "<=", 2.7),
    ("GUARD exact step ≤ 4.7× plain", "guard_exact", "plain", "time", "<=", 4.7),
    ("GUARD lossdiff peak memory ≤ 1.3× plain", "guard_lossdiff", "plain", "mem", "<=", 1.3),
    ("GUARD exact peak memory ≤ 1.3× plain", "guard_exact", "plain", "mem", "<=", 1.3),
    ("PGD-10 adv step ≥ 2× GUARD lossdiff", "adv", "guard_lossdiff", "time", ">=", 2.0),
    ("PGD-10 adv step ≥ 2× GUARD exact", "adv", "guard_exact", "time", ">=", 2.0),
]

# A measured time ratio below this fraction of its FLOP ratio is flagged: either the reference step was
# slowed (load, a cold cache) or the method skips work the FLOP count does not see (BatchNorm, folded).
SUSPECT_BELOW = 0.9
