"""What the overhead benchmark compares, and against which numbers (plain data: no torch import, so
``guardx --help`` stays fast)."""

# name → label; the order is the table's. ``ref_*`` are the baselines.
METHODS = {
    "plain": "Plain (SRe2L squeeze, CE)",
    "guard_exact": "GUARD exact (eq. 11)",
    "guard_lossdiff": "GUARD lossdiff (official first-order)",
    "adv": "Adv training, PGD-{k}",
    "gradnorm": "GradNorm (Table 3 ablation)",
    "ref_lossdiff_4fwd": "baseline: lossdiff as the official code (4 forwards)",
    "ref_exact_naive": "baseline: exact by naive double backprop",
}
OPTIONAL_METHODS = {"guard_cure": "GUARD cure (official CIFAR code)"}
BASELINE_OF = {"guard_lossdiff": "ref_lossdiff_4fwd", "guard_exact": "ref_exact_naive"}

# Paper, Table 4: one A100 80GB PCIe, batch 32, 5 runs; Adv Training as in Section 3.2.
PAPER_TABLE4 = {"device": "NVIDIA A100 80GB PCIe", "batch_size": 32,
                "GUARD": {"s_per_iter": 0.007, "std": 2.661e-4, "peak_mem_mib": 3851},
                "Adv Training": {"s_per_iter": 2.198, "std": 6.735e-4, "peak_mem_mib": 4211}}

# Project performance targets, checked as ratios within one run (never in tests).
TARGETS = [
    ("GUARD lossdiff step ≤ 3.3× plain (its FLOP floor)", "guard_lossdiff", "plain", "time", "<=", 3.3),
    ("GUARD exact step ≤ 5× plain", "guard_exact", "plain", "time", "<=", 5.0),
    ("PGD-10 adv step ≥ 2× GUARD lossdiff", "adv", "guard_lossdiff", "time", ">=", 2.0),
    ("PGD-10 adv step ≥ 2× GUARD exact", "adv", "guard_exact", "time", ">=", 2.0),
    ("GUARD lossdiff peak memory ≤ 1.3× plain", "guard_lossdiff", "plain", "mem", "<=", 1.3),
    ("GUARD exact peak memory ≤ 1.3× plain", "guard_exact", "plain", "mem", "<=", 1.3),
]
