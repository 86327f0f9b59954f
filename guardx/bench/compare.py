"""Several objectives measured against each other at one (batch size, resolution): what ``guardx bench
overhead`` (Table 4) and ``guardx bench sweep`` share.

Per point:
* every method's fixed-batch step (``measure.fixed_batch_step``: same model seed, same batch) is built in
  this process;
* FLOPs of one whole step per method (``measure.step_flops``; this call also warms the method up);
* time: ``measure.round_robin`` over all methods — ``warmup`` untimed steps each, then ``rounds`` rounds
  of one ``iters``-step block per method, the order rotated every round;
* peak memory: each method in a fresh process (``measure.run_isolated``), ``warmup`` steps then
  ``memory_steps`` measured steps.

Ratios to ``plain`` use the same statistic for every method: the median block (``time_x_plain``); the
median of the round-by-round ratios (``paired_x_plain``, with its min and max) sits beside it. Next to
each time ratio stands the FLOP ratio; a time ratio below ``SUSPECT_BELOW`` × its FLOP ratio is flagged.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager

import torch

from guardx.bench.measure import (block_stats, fixed_batch_step, paired_ratios, round_robin, run_isolated,
                                  step_flops, step_memory, synchronize, call_target)
from guardx.bench.methods import METHODS, SUSPECT_BELOW, method_kind
from guardx.errors import GuardxError


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise GuardxError(f"unknown benchmark method(s) {bad or text!r}; known: {', '.join(METHODS)}")
    if "plain" not in names:
        names.insert(0, "plain")  # every ratio is to plain
    return names


def method_label(name: str, spec: dict) -> str:
    return METHODS[name].format(k=spec["pgd_steps"])


def build_method(name: str, spec: dict):
    """The objective callable timed for ``name``."""
    from guardx.bench.baselines import AutogradDoubleBackward, NaiveExact, OfficialAdv, OfficialLossDiff, Unfolded
    from guardx.objectives import build_objective

    pgd = dict(steps=spec["pgd_steps"], eps=spec["pgd_eps"], alpha=spec["pgd_alpha"])
    if name == "plain":
        return build_objective("plain")
    if name in ("guard_exact", "guard_lossdiff", "guard_cure"):
        return build_objective("guard", mode=name.split("_", 1)[1])
    if name.endswith("_nofold"):
        return Unfolded(build_method(name[: -len("_nofold")], spec))
    if name.endswith("_autograd"):
        return AutogradDoubleBackward(build_method(name[: -len("_autograd")], spec))
    if name == "adv":
        return build_objective("adv", **pgd)
    if name == "gradnorm":
        return build_objective("gradnorm")
    if name == "ref_adv_official":
        return OfficialAdv(**pgd)
    if name == "ref_lossdiff_4fwd":
        return OfficialLossDiff()
    if name == "ref_exact_naive":
        return NaiveExact()
    raise GuardxError(f"unknown benchmark method {name!r}; known: {', '.join(METHODS)}")


def method_step(name: str, spec: dict, batch_size: int, resolution: int):
    """``name``'s fixed-batch step at this point (the one step definition: ``measure.fixed_batch_step``)."""
    return fixed_batch_step(build_method(name, spec), model=spec["model"], num_classes=spec["num_classes"],
                            width=spec.get("width") or None, batch_size=batch_size, resolution=resolution,
                            device=spec["device"], precision=spec.get("precision", "fp32"),
                            channels_last=spec.get("channels_last", False), seed=spec.get("seed", 0))


@contextmanager
def settings(spec: dict):
    """The process-wide settings a measurement runs under (threads, cuDNN autotuning, GUARD's row-op
    kernels), restored afterwards for callers that measure in-process."""
    from guardx.kernels import kernel_backend

    device = torch.device(spec["device"])
    threads, autotune = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = spec.get("cudnn_benchmark", True)
        with kernel_backend(spec.get("kernels", "auto")):
            yield device
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = autotune


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- time and FLOPs (one process)
def time_point(spec: dict, methods: list[str], batch_size: int, resolution: int, progress=print) -> dict:
    """FLOPs and round-robin times of every method at one point: ``{name: {...}}`` (see module docstring)."""
    device = torch.device(spec["device"])
    steps, out = {}, {}
    for name in methods:
        try:
            steps[name] = method_step(name, spec, batch_size, resolution)
            out[name] = {"flops": step_flops(steps[name])}
        except torch.cuda.OutOfMemoryError:
            steps.pop(name, None)
            out[name] = {"error": "out of memory"}
            _free(device)
    progress(f"  {batch_size}×{resolution}px: timing {len(steps)} methods round-robin, {spec['rounds']} rounds "
             f"× {spec['iters']} step(s) after {spec['warmup']} warm-up step(s) each")
    synchronize(device)
    times = round_robin(steps, device, rounds=spec["rounds"], iters=spec["iters"], warmup=spec["warmup"],
                        progress=progress)
    for name, t in times.items():
        out[name].update(s_per_iter=t, stats=block_stats(t), loss_finite=steps[name].loss_finite,
                         final_loss=steps[name].last.get("loss") if steps[name].loss_finite else None)
    steps = None
    _free(device)
    return out


# ---------------------------------------------------------------- memory (a fresh process per method)
def memory_worker(spec: dict) -> dict:
    """Peak memory of ``spec["method"]`` at every point of ``spec["points"]`` (run in its own process)."""
    from guardx.bench.measure import environment

    with settings(spec) as device:
        points = []
        for bs, res in spec["points"]:
            point = {"batch_size": int(bs), "resolution": int(res)}
            try:
                step = method_step(spec["method"], spec, int(bs), int(res))
                point.update(step_memory(step, device, warmup=spec["warmup"], steps=spec["memory_steps"]))
            except torch.cuda.OutOfMemoryError:
                point["error"] = "out of memory"
            step = None
            _free(device)
            points.append(point)
        env = environment(device)
    return {"method": spec["method"], "points": points, "env": env}


def measure_memory(spec: dict, methods: list[str], isolate: str, progress=print) -> dict:
    """``{name: [point, ...]}``: each method in a fresh process unless ``isolate == "none"``."""
    out = {}
    for name in methods:
        progress(f"  peak memory of {name} ({'fresh process' if isolate == 'process' else 'this process'}) ...")
        one = dict(spec, method=name)
        result = (run_isolated("guardx.bench.compare:memory_worker", one) if isolate == "process"
                  else call_target("guardx.bench.compare:memory_worker", one))
        out[name] = result["points"]
    return out


# ---------------------------------------------------------------- ratios
def add_ratios(table: dict, ref: str = "plain") -> None:
    """Ratios to ``ref`` in place: time (median / median), paired time (per round), memory, FLOPs, and
    the time ratio as a fraction of the FLOP ratio (flagged below ``SUSPECT_BELOW``)."""
    base = table.get(ref)
    if not base or "error" in base:
        return
    for name, m in table.items():
        if "error" in m:
            continue
        m["time_x_plain"] = m["stats"]["median"] / base["stats"]["median"]
        m["paired_x_plain"] = paired_ratios(m["s_per_iter"], base["s_per_iter"])
        if "peak_mem_mib" in m and base.get("peak_mem_mib"):
            m["mem_x_plain"] = m["peak_mem_mib"] / base["peak_mem_mib"]
            m["step_mem_x_plain"] = m["step_mem_mib"] / base["step_mem_mib"] if base["step_mem_mib"] > 0 else None
        m["flops_x_plain"] = m["flops"]["total"] / base["flops"]["total"]
        m["time_per_flop_ratio"] = m["time_x_plain"] / m["flops_x_plain"]
        m["suspect"] = name != ref and m["time_per_flop_ratio"] < SUSPECT_BELOW


def row(name: str, spec: dict, timing: dict, memory: dict | None) -> dict:
    """One method's entry: label, kind, timing/FLOPs, and memory when measured."""
    entry = {"label": method_label(name, spec), "kind": method_kind(name), **timing}
    if memory:
        if "error" in memory:
            entry.setdefault("error", memory["error"])
        else:
            entry.update({k: memory[k] for k in ("peak_mem_mib", "static_mem_mib", "step_mem_mib")})
    return entry
