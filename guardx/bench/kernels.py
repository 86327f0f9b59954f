"""Bandwidth of GUARD's row-wise Triton kernels against their PyTorch references (GPU only).

    guardx bench kernels                 # writes benchmarks/results/kernels-<gpu>.{json,md}
    guardx bench kernels --batch 32 --resolutions 32,64,112,224 --dtypes fp32,bf16

Both ops are memory-bound, so the unit is GB/s of *necessary* traffic (the same numerator for both
implementations; a higher number means less time):
* perturb_along: read x and g, write the output            → 3 · N · bytes per element
* rowwise_sqdist forward + backward: read a, b (forward), read a, b and write ∂a, ∂b (backward)
                                                            → 6 · N · bytes per element
Timings: ``triton.testing.do_bench`` (median, with the 20th/80th percentiles), which flushes L2 between
runs. The reference rows are the exact PyTorch code guardx runs on CPU (eager, autograd).
"""
from __future__ import annotations

import torch

from guardx.bench.measure import device_tag, environment, parse_ints, save_result
from guardx.errors import GuardxError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run_kernels(args, progress=print) -> dict:
    if not torch.cuda.is_available():
        raise GuardxError("guardx bench kernels needs a CUDA GPU (the kernels' CPU path is the PyTorch reference, "
                          "and the Triton interpreter is for tests, not timing); nothing measured")
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad:
        raise GuardxError(f"--dtypes takes a comma-separated subset of {','.join(DTYPES)}; got {args.dtypes!r}")
    import triton
    from triton.testing import do_bench

    from guardx.kernels import perturb_along_reference, rowwise_sqdist_reference
    from guardx.kernels.perturb import perturb_along_triton
    from guardx.kernels.sqdist import RowwiseSqDist

    device = torch.device("cuda")
    rows = []
    for res in parse_ints(args.resolutions, "--resolutions"):
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            shape = (args.batch, 3, res, res)
            x, g = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)
            a, b = x.clone().requires_grad_(True), g.clone().requires_grad_(True)
            go = torch.randn(args.batch, device=device, dtype=dtype)
            n, esize = x.numel(), x.element_size()

            def sqdist_fwd_bwd(fn):
                return lambda: torch.autograd.grad(fn(a, b), [a, b], go)

            cases = {
                ("perturb_along", "triton"): (lambda: perturb_along_triton(x, g, 3.0), 3),
                ("perturb_along", "torch"): (lambda: perturb_along_reference(x, g, 3.0), 3),
                ("rowwise_sqdist fwd+bwd", "triton"): (sqdist_fwd_bwd(RowwiseSqDist.apply), 6),
                ("rowwise_sqdist fwd+bwd", "torch"): (sqdist_fwd_bwd(rowwise_sqdist_reference), 6),
            }
            for (op, impl), (fn, passes) in cases.items():
                ms, lo, hi = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
                gbps = passes * n * esize * 1e-9 / (ms * 1e-3)
                rows.append({"op": op, "impl": impl, "shape": list(shape), "dtype": dname, "ms_median": ms,
                             "ms_p20": lo, "ms_p80": hi, "gb_per_s": gbps})
                progress(f"{op:24s} {impl:7s} {str(shape):20s} {dname}: {ms * 1e3:8.1f} us  {gbps:7.1f} GB/s")

    def reference(r):
        return next(q for q in rows if q["impl"] == "torch" and q["op"] == r["op"] and q["shape"] == r["shape"]
                    and q["dtype"] == r["dtype"])

    for r in rows:  # speed-up of triton over torch on the same case
        if r["impl"] == "triton":
            r["speedup_vs_torch"] = reference(r)["ms_median"] / r["ms_median"]
    env = environment(device)
    env["triton"] = triton.__version__
    result = {"benchmark": "kernels", "env": env,
              "config": {k: getattr(args, k) for k in ("batch", "resolutions", "dtypes")}, "rows": rows}
    lines = [f"# GUARD row-wise kernels — {env['device_name']}", "",
             f"torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · git {env['git_revision']}; "
             "do_bench median (p20–p80); GB/s of necessary traffic.", "",
             "| op | shape | dtype | triton µs | torch µs | triton GB/s | torch GB/s | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in (q for q in rows if q["impl"] == "triton"):
        ref = reference(r)
        lines.append(f"| {r['op']} | {tuple(r['shape'])} | {r['dtype']} | {r['ms_median'] * 1e3:.1f} | "
                     f"{ref['ms_median'] * 1e3:.1f} | {r['gb_per_s']:.0f} | {ref['gb_per_s']:.0f} | "
                     f"{r['speedup_vs_torch']:.2f}× |")
    json_path, md_path = save_result(args.out, f"kernels-{device_tag(device)}", result, "\n".join(lines) + "\n")
    result["files"] = [str(json_path), str(md_path)]
    return result
