"""Benchmarks behind ``guardx bench <name>``, one home for all of them. Results (JSON with the raw numbers
and the environment, plus a markdown table) go to ``benchmarks/results/``; see ``benchmarks/README.md``.

    measure     the shared machinery (public): the fixed-batch squeeze step, timing blocks and round-robin
                timing, FLOP counts, peak memory in a fresh process, load average, result files
    compare     several objectives at one point: FLOPs, round-robin time, isolated memory, ratios
    overhead    the paper's Table 4            sweep       its growth over batch size × resolution
    throughput  squeeze / recover / loader / end-to-end    loaders     loader backends on JPEGs
    scaling     squeeze and recover across ranks           attacks     evaluation attacks' cost
    kernels     the Triton row ops' bandwidth (GPU)        report      the README's measured-results block
    methods     what Table 4 compares (plain data)         baselines   reference implementations (not product code)

Speed claims live here as ratios measured in one run, never in pass/fail tests.
"""
