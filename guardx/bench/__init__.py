"""Benchmarks behind ``guardx bench``: Table 4's per-step overhead, its growth with batch size and
resolution, and stage throughput. Results (JSON with the raw numbers and the environment, plus a
markdown table) go to ``benchmarks/results/``; see ``benchmarks/README.md``.

Speed claims live here as ratios measured in one run, never in pass/fail tests.
"""
