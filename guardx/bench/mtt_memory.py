"""Peak memory of one trajectory-matching iteration as the synthetic steps N grow: MTT (unrolled) vs TESLA.

    python -m guardx.bench.mtt_memory --device cuda --steps 5,10,20,40 --width 128 --resolution 32
    python -m guardx.bench.mtt_memory --device cpu                    # the committed CPU run (small ConvNet)

One iteration is exactly what ``guardx mtt`` runs: ``Matcher(mode, ...)`` — N student steps from random
"expert" parameters on the synthetic set, the normalised parameter distance, and the gradient w.r.t. the
images and the step size — minus the optimiser step, data and expert loading. Modes: ``unrolled`` (MTT),
``exact`` and ``first_order`` (TESLA, see ``guardx.distill.mtt``). Each (mode, N) runs in a fresh process:
a warm-up iteration with N = 1 (libraries, allocator), then the peak is reset and one iteration with N is
measured. Peak memory is ``torch.cuda.max_memory_allocated`` on GPU and the process's peak RSS on CPU
(see ``guardx.bench.measure``), reported as the growth over the memory held before the iteration; on CPU the
workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` so that RSS follows the live tensors.
Alongside, a device-independent number: the peak bytes autograd holds as saved tensors
(:class:`SavedTensorMeter`) — the activation memory the graph needs, without allocator effects.
TESLA also keeps θ_0..θ_N (N·P floats; P is printed) — parameters, not activations.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.autograd.graph import saved_tensors_hooks

from guardx.bench.measure import (current_memory_mib, device_tag, environment, memory_kind, peak_memory_mib,
                                  reset_peak_memory, resolve_device, run_isolated, save_result, synchronize)

MODES = ("unrolled", "exact", "first_order")
LABELS = {"unrolled": "MTT (unrolled)", "exact": "TESLA exact", "first_order": "TESLA first-order (public code)"}


class _Held:
    """One tensor autograd saved for backward; its bytes count while the graph holds it."""

    __slots__ = ("tensor", "meter", "nbytes")

    def __init__(self, tensor: torch.Tensor, meter: "SavedTensorMeter"):
        self.tensor, self.meter, self.nbytes = tensor, meter, tensor.numel() * tensor.element_size()
        meter.live += self.nbytes
        meter.peak = max(meter.peak, meter.live)
        meter.count += 1

    def __del__(self):
        self.meter.live -= self.nbytes


class SavedTensorMeter(saved_tensors_hooks):
    """Live and peak bytes of the tensors autograd saves for backward inside the ``with`` block.

    A property of the computation graph (what backward will need), not of the allocator: a tensor saved
    by several nodes counts once per node. ``peak`` is the largest total alive at any moment.
    """

    def __init__(self):
        self.live = self.peak = self.count = 0
        super().__init__(lambda t: _Held(t, self), lambda held: held.tensor)

    def __enter__(self) -> "SavedTensorMeter":
        super().__enter__()
        return self


def _problem(spec: dict, steps: int, device: torch.device):
    from guardx.distill.mtt import Matcher, plan_batches
    from guardx.distill.trajectory import FlatModel, build_model

    gen = torch.Generator().manual_seed(0)
    model = build_model({"name": "convnet", "width": spec["width"], "depth": spec["depth"] or None,
                         "num_classes": spec["classes"], "resolution": spec["resolution"]}).to(device)
    flat = FlatModel(model)
    start = flat.flat_params()
    target = start + 0.01 * torch.randn(flat.num_params, generator=gen).to(device)
    n = spec["classes"] * spec["ipc"]
    images = torch.randn(n, 3, spec["resolution"], spec["resolution"], generator=gen).to(device).requires_grad_(True)
    labels = torch.arange(spec["classes"], device=device).repeat_interleave(spec["ipc"])
    syn_lr = torch.tensor(0.01, device=device).requires_grad_(True)
    plan = [i.to(device) for i in plan_batches(n, spec["batch_syn"], steps, 0)]
    args = (images, syn_lr, labels, start, target, plan, list(range(steps)))
    return Matcher(flat), args, flat.num_params


def measure(spec: dict) -> dict:
    """One (mode, N) point; runs inside a fresh process (``run_isolated``)."""
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    matcher, args, num_params = _problem(spec, 1, device)
    matcher(spec["mode"], *args)  # warm-up: libraries, kernels, allocator
    del args
    matcher, args, _ = _problem(spec, spec["steps"], device)
    synchronize(device)
    base = current_memory_mib(device)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    matcher(spec["mode"], *args)
    synchronize(device)
    seconds = time.perf_counter() - t0
    peak = peak_memory_mib(device)
    with SavedTensorMeter() as meter:  # a second iteration, to count what autograd saves
        matcher(spec["mode"], *args)
    return {"mode": spec["mode"], "steps": spec["steps"], "peak_mib": peak, "base_mib": base,
            "growth_mib": peak - base, "saved_peak_mib": meter.peak / 2**20, "saved_tensors": meter.count,
            "seconds": seconds, "num_params": num_params}


def render(result: dict) -> str:
    s, env = result["spec"], result["environment"]
    lines = [f"# Trajectory matching: peak memory of one iteration vs synthetic steps N — {env['device_name']}", "",
             f"ConvNet width {s['width']} (depth {s['depth'] or 'by resolution'}), {s['resolution']}×{s['resolution']} px, "
             f"{s['classes']} classes × {s['ipc']} ipc, batch_syn {s['batch_syn'] or 'all'}, fp32, "
             f"{result['points'][0]['num_params']} parameters (P); {s['threads']} thread(s); torch {env['torch']}, "
             f"git {env['git_revision']}.", "",
             f"Memory: {result['memory_kind']}{result['malloc']}, growth over the memory held before the iteration; each point a fresh "
             "process (warm-up iteration with N = 1 first). `saved` = peak bytes autograd holds for backward "
             "(device-independent). TESLA also keeps θ_0..θ_N: N·P·4 bytes "
             f"({result['points'][0]['num_params'] * 4 / 2**20:.3f} MiB per step here).", "",
             "| method | N | peak growth (MiB) | saved for backward (MiB) | s/iteration |", "|---|---:|---:|---:|---:|"]
    for p in result["points"]:
        lines.append(f"| {LABELS[p['mode']]} | {p['steps']} | {p['growth_mib']:.1f} | {p['saved_peak_mib']:.2f} | "
                     f"{p['seconds']:.2f} |")
    lines += ["", f"Load: {result['load']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", default="5,10,20,40")
    p.add_argument("--modes", default="unrolled,exact")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=0)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--ipc", type=int, default=5)
    p.add_argument("--batch-syn", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    # CPU: fixed mmap threshold, so glibc hands freed activations back to the OS at once and the peak RSS
    # follows the live tensors (with its dynamic threshold, freed blocks stay in the heap and a flat
    # computation shows a growing RSS); the workers inherit it
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    spec = {"device": str(device), "width": args.width, "depth": args.depth, "resolution": args.resolution,
            "classes": args.classes, "ipc": args.ipc, "batch_syn": args.batch_syn, "threads": args.threads}
    points = []
    for steps in [int(s) for s in args.steps.split(",")]:
        for mode in args.modes.split(","):
            point = run_isolated("guardx.bench.mtt_memory:measure", {**spec, "mode": mode, "steps": steps})
            points.append(point)
            print(f"{LABELS[mode]:32s} N={steps:3d}  peak +{point['growth_mib']:8.1f} MiB  saved "
                  f"{point['saved_peak_mib']:8.2f} MiB  {point['seconds']:.2f} s", file=sys.stderr)
    load = None
    try:
        load = "load average {:.2f} {:.2f} {:.2f} on {} cores".format(*os.getloadavg(), os.cpu_count())
    except OSError:
        pass
    malloc = "" if device.type == "cuda" else f" with MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
    result = {"spec": spec, "points": points, "memory_kind": memory_kind(device), "malloc": malloc, "load": load,
              "environment": environment(device)}
    stem = f"mtt-memory-{device_tag(device)}"
    json_path, md_path = save_result(args.out, stem, result, render(result))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
