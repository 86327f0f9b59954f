"""Distributed squeeze on CPU with gloo.

* 2-rank DDP and DeepSpeed ZeRO-1/2 (with and without gradient accumulation, clipping active) train
  GUARD exact to the parameters one process reaches on the same global batches; bf16 autocast stays
  within rounding of it;
* checkpoints move between world sizes and backends (ZeRO-2 on 2 ranks → 1 plain process, 1 process →
  ZeRO-2 on 2 ranks), with optimiser, schedule, step and sampler position;
* two "nodes" on localhost (two torchrun launches, c10d rendezvous) finish an epoch;
* killing one rank ends the run with a clear error instead of a hang, and the run resumes on 1 rank;
* ZeRO-3 refusals, DeepSpeed config merging, the launch scripts' commands (dry run), in-process.

Equality needs a model whose forward couples no samples: BatchNorm normalises each rank's micro-batch
on its own, which one process holding the whole batch does not reproduce. These runs therefore use the
DC ConvNet (instance norm). Augmentation is seeded per sample, so crops do not depend on the world size.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from guardx import squeeze
from guardx.config import load_config
from guardx.errors import ConfigError, GuardxWarning

REPO = Path(__file__).resolve().parents[1]

BASE = [
    "data.dataset=digits", "data.resolution=16", "data.rrc_scale=[0.5,1.0]", "data.flip=true",
    "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "model.name=convnet", "model.width=8",
    "objective.name=guard", "objective.mode=exact", "squeeze.epochs=1", "squeeze.batch_size=32",
    "squeeze.max_steps=6", "squeeze.ckpt_every_steps=1", "squeeze.keep_checkpoints=10",
    "squeeze.grad_clip=0.1",  # small enough to clip: DeepSpeed's clipping must equal torch's
    "run.progress=false", "run.device=cpu",
]
DS = "distributed.backend=deepspeed"
# name -> overrides of a 2-rank run that must end where the single-process run ends
EXACT = {
    "ddp": ["distributed.backend=ddp"],
    "ddp_accum2": ["distributed.backend=ddp", "distributed.grad_accum=2"],
    "zero1": [DS, "distributed.zero_stage=1"],
    "zero2": [DS, "distributed.zero_stage=2", "distributed.deepspeed_config=launch/ds_zero2.json"],
    "zero2_accum2": [DS, "distributed.zero_stage=2", "distributed.grad_accum=2"],
    "zero2_from_1rank": [DS, "distributed.zero_stage=2"],  # resumes the single-process checkpoint of step 2
}
# bf16 autocast: the same arithmetic up to rounding
BF16 = {
    "zero1_bf16": [DS, "distributed.zero_stage=1", "distributed.precision=bf16",
                   "distributed.deepspeed_config=launch/ds_zero1.json"],
    "ddp_bf16": ["distributed.backend=ddp", "distributed.precision=bf16"],
}


# precise BN on 2 ranks (tests/dist_worker.py: recalibrate_job): 3 batches of 8 per rank of the digits split
RECALIBRATE = {"batches": 3, "batch_size": 8}
RECALIBRATE_DATA = [*BASE[:6], "data.workers=0", "run.device=cpu"]


def _env() -> dict:
    # two ranks on two cores; DeepSpeed on its CPU accelerator; this checkout's code first on the path
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _node(rank: int, port: int, job: str, *guardx_args: str) -> list[str]:
    """One "node" of a 2-node DDP job on localhost, through the shipped multi-node launch script."""
    return ["env", f"PYTHON={sys.executable}", "BACKEND=ddp", "bash", str(REPO / "launch" / "run_multi_node.sh"),
            "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job, *guardx_args]


def _single(out: Path, *overrides: str) -> Path:
    """A single-process squeeze, in this process."""
    return squeeze.run(load_config(None, [*BASE, f"run.out_dir={out}", *overrides]))


def _model(path: Path) -> dict:
    blob = torch.load(path, weights_only=True)
    return blob["model"] if "model" in blob else blob["engine"]["model"]


def _assert_same_model(got: dict, ref: dict, atol: float) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype, k
        assert torch.allclose(got[k], ref[k], rtol=0, atol=atol), (k, (got[k] - ref[k]).abs().max().item())


def _metrics(out: Path) -> dict:
    return json.loads((out / "squeeze" / "metrics.json").read_text())


def _ckpt(out: Path, step: int) -> Path:
    return out / "squeeze" / "ckpt" / f"step_{step:09d}.pt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process reference, then every 2-rank variant in one torchrun launch."""
    root = tmp_path_factory.mktemp("dist")
    _single(root / "single")
    seeded = _ckpt(root / "zero2_from_1rank", 2)
    seeded.parent.mkdir(parents=True)
    shutil.copy(_ckpt(root / "single", 2), seeded)
    spec = [[*BASE, f"run.out_dir={root / name}", *extra] for name, extra in {**EXACT, **BF16}.items()]
    spec.append({"recalibrate_bn": {**RECALIBRATE, "overrides": [*RECALIBRATE_DATA, "distributed.backend=ddp"],
                                    "out": str(root / "recalibrated.pt")}})
    (root / "runs.json").write_text(json.dumps(spec))
    proc = subprocess.run(_torchrun("--standalone", "--nproc-per-node", "2", "tests/dist_worker.py",
                                    str(root / "runs.json")),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXACT))
def test_two_ranks_match_one_process(runs, name):
    ref = torch.load(_ckpt(runs / "single", 6), weights_only=True)
    got = torch.load(_ckpt(runs / name, 6), weights_only=True)
    assert (got["step"], got["consumed"], got["world_size"]) == (6, 6 * 32, 2)
    _assert_same_model(_model(runs / name / "squeeze" / "teacher.pt"),
                       _model(runs / "single" / "squeeze" / "teacher.pt"), atol=1e-6)
    # the checkpoint is the single-process one: same optimiser format and state, same schedule position
    opt, ref_opt = got["engine"]["optimizer"], ref["engine"]["optimizer"]
    assert opt["param_groups"] == ref_opt["param_groups"]
    for i, entry in ref_opt["state"].items():
        assert torch.allclose(opt["state"][i]["momentum_buffer"], entry["momentum_buffer"], rtol=0, atol=1e-5)
    assert got["engine"]["scheduler"] == ref["engine"]["scheduler"]
    if name == "zero2_from_1rank":  # it did resume: 4 of the 6 steps ran here
        assert _metrics(runs / name)["samples_this_run"] == 4 * 32


@pytest.mark.slow
def test_zero2_checkpoint_resumes_on_one_process(runs, tmp_path):
    """Written by 2 ZeRO-2 ranks at step 4, resumed by one plain process: same end as never stopping."""
    _ckpt(tmp_path, 4).parent.mkdir(parents=True)
    shutil.copy(_ckpt(runs / "zero2", 4), _ckpt(tmp_path, 4))
    _single(tmp_path)
    assert _metrics(tmp_path)["samples_this_run"] == 2 * 32
    _assert_same_model(_model(tmp_path / "squeeze" / "teacher.pt"), _model(runs / "single" / "squeeze" / "teacher.pt"),
                       atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BF16))
def test_bf16_autocast_stays_near_fp32_and_saves_fp32(runs, name):
    """bf16 autocast (CPU here; GPU in production), DeepSpeed with the shipped ZeRO-1 JSON and DDP: fp32
    weights and optimiser state are saved, within bf16 rounding of the fp32 run after 6 steps."""
    ref = torch.load(_ckpt(runs / "single", 6), weights_only=True)["engine"]
    got = torch.load(_ckpt(runs / name, 6), weights_only=True)["engine"]
    _assert_same_model(got["model"], ref["model"], atol=1e-3)
    assert not all(torch.equal(got["model"][k], v) for k, v in ref["model"].items())  # it did run in bf16
    ref_state, got_state = ref["optimizer"]["state"], got["optimizer"]["state"]
    scale = max(e["momentum_buffer"].abs().max().item() for e in ref_state.values())
    for i, entry in ref_state.items():
        assert torch.allclose(got_state[i]["momentum_buffer"], entry["momentum_buffer"], rtol=0, atol=0.02 * scale)


class _RanksInTurn:
    """Rank 0's first ``batches`` batches, then rank 1's: one process over what the 2 ranks saw."""

    def __init__(self, loaders, batches):
        self.loaders, self.batches = loaders, batches

    def set_epoch(self, epoch, start=0):
        for loader in self.loaders:
            loader.set_epoch(epoch, start)

    def __iter__(self):
        for loader in self.loaders:
            yield from itertools.islice(loader, self.batches)


@pytest.mark.slow
def test_recalibrate_bn_on_two_ranks_equals_one_process_over_their_batches(runs):
    """recalibrate_bn's promise across ranks: the ranks' averaged running statistics are the plain average
    over every rank's batches, i.e. what one process computes over the same batches."""
    from dist_worker import bn_model

    from guardx.data import build_loader
    from guardx.distributed.context import DistContext
    from guardx.loop import recalibrate_bn

    data = load_config(None, RECALIBRATE_DATA).data
    loaders = [build_loader(data, "train", rank, 2, batch_size=RECALIBRATE["batch_size"], seed=0) for rank in (0, 1)]
    model = bn_model()
    n = RECALIBRATE["batches"]
    used = recalibrate_bn(model, _RanksInTurn(loaders, n), batches=2 * n, ctx=DistContext(), device="cpu", seed=0)
    assert used == 2 * n
    got = torch.load(runs / "recalibrated.pt", weights_only=True)
    assert got.keys() == model.state_dict().keys()
    compared = 0
    for key, ref in model.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(got[key], ref, rtol=1e-5, atol=1e-6, msg=key)
            compared += 1
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(got[key], ref), key  # the weights are untouched
    assert compared == 2 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    # rank 0's own estimate is not the answer: the average needs rank 1's batches
    alone = bn_model()
    recalibrate_bn(alone, loaders[0], batches=n, ctx=DistContext(), device="cpu", seed=0)
    assert not torch.allclose(alone.state_dict()["net.bn1.running_var"], got["net.bn1.running_var"], rtol=1e-3)


@pytest.mark.slow
def test_two_nodes_on_localhost_finish_an_epoch(tmp_path):
    """Two torchrun launches (one per "node", node ranks 0 and 1) meet at a c10d rendezvous."""
    port, out = _free_port(), tmp_path / "run"
    overrides = [*BASE, "objective.mode=lossdiff", "squeeze.batch_size=64", "squeeze.max_steps=0",
                 f"run.out_dir={out}"]
    procs = [subprocess.Popen(_node(node, port, "guardx-test", "squeeze", *overrides), cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    metrics = _metrics(out)
    assert metrics["epochs"] == 1 and len(metrics["history"]) == 1
    assert metrics["samples_this_run"] == 1438  # the whole digits train split, once
    assert (out / "squeeze" / "teacher.pt").is_file()


@pytest.mark.slow
def test_killed_rank_ends_the_run_which_resumes_on_one_rank(tmp_path):
    """SIGKILL the rank of "node" 1 mid-epoch: node 0's rank stops with a one-line error (no hang), and
    one process resumes the newest 2-rank checkpoint to where an uninterrupted single-process run gets.

    A constant learning rate lets the resumed run stop 2 steps after the kill, wherever that fell (the
    cosine schedule's resume is covered by the ZeRO-2 → 1 process test)."""
    psutil = pytest.importorskip("psutil")
    port, out = _free_port(), tmp_path / "killed"
    overrides = [*BASE, "squeeze.max_steps=0", "squeeze.keep_checkpoints=2", "squeeze.schedule=constant",
                 f"run.out_dir={out}"]
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    procs = [subprocess.Popen(_node(node, port, "guardx-kill", "squeeze", *overrides, "distributed.timeout_s=60"),
                              cwd=REPO, env=_env(), stdout=logs[node].open("w"), stderr=subprocess.STDOUT)
             for node in (0, 1)]
    try:
        deadline = time.monotonic() + 240
        # any checkpoint past step 2 (keep_checkpoints=2 rotates step 3 away quickly on a fast machine)
        while not any(int(p.name[5:14]) >= 3 for p in (out / "squeeze" / "ckpt").glob("step_?????????.pt")):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "run did not start"
            time.sleep(0.05)
        workers = psutil.Process(procs[1].pid).children(recursive=True)
        assert workers, "node 1 has no worker process"
        for w in workers:
            w.send_signal(signal.SIGKILL)
        codes = [p.wait(timeout=120) for p in procs]  # bounded: a hang fails here
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    node0 = logs[0].read_text()
    assert codes[0] != 0 and codes[1] != 0
    errors = [line for line in node0.splitlines() if line.startswith("guardx: error:")]
    assert len(errors) == 1, node0[-3000:]
    assert re.match(r"guardx: error: rank \d of 2 lost its peers during squeeze step \d+: another rank died", errors[0])

    # resume on one plain process from the newest 2-rank checkpoint, 2 steps on
    last = torch.load(sorted((out / "squeeze" / "ckpt").glob("step_*.pt"))[-1], weights_only=True)
    assert last["world_size"] == 2 and last["step"] >= 3 and not (out / "squeeze" / "teacher.pt").exists()
    steps = [f"squeeze.max_steps={last['step'] + 2}", "squeeze.schedule=constant"]
    with pytest.warns(GuardxWarning, match="squeeze.max_steps: 0 -> "):  # part of the fingerprint: resume on purpose
        _single(out, *steps, "run.on_config_change=resume")
    _single(tmp_path / "uninterrupted", *steps)
    assert _metrics(out)["samples_this_run"] == 2 * 32
    _assert_same_model(_model(out / "squeeze" / "teacher.pt"),
                       _model(tmp_path / "uninterrupted" / "squeeze" / "teacher.pt"), atol=1e-6)


# --------------------------------------------------------------------------- in-process checks

def test_zero3_with_guard_exact_is_refused_in_one_line(capsys, tmp_path, monkeypatch):
    from guardx.cli import main

    # DeepSpeed's one-rank world is described in os.environ: keep that out of the other tests
    monkeypatch.setattr(os, "environ", os.environ.copy())
    code = main(["squeeze", *BASE, f"run.out_dir={tmp_path}", DS, "distributed.zero_stage=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("guardx: error: distributed.zero_stage=3 cannot train Guard(mode=exact")
    assert "double backprop" in err and "use distributed.zero_stage=1 or 2, or distributed.backend=ddp" in err


@pytest.mark.parametrize("objective, reason", [
    (["objective.name=guard", "objective.mode=cure"], "double backprop"),
    (["objective.name=guard", "objective.mode=lossdiff"], "parameter gradients inside the forward"),
    (["objective.name=gradnorm"], "double backprop"),
    (["objective.name=adv"], "backward passes inside the forward"),
    (["objective.name=plain"], "checkpoints cover ZeRO stages 0-2"),
])
def test_zero3_is_refused_with_the_reason_for_each_objective(objective, reason):
    from guardx.distributed.deepspeed_engine import check_zero_stage
    from guardx.objectives import ObjectiveStep, build_objective

    cfg = load_config(None, [DS, "distributed.zero_stage=3", *objective])
    step = ObjectiveStep(torch.nn.Linear(2, 2), build_objective(cfg.objective.name, **cfg.objective.params()))
    with pytest.raises(ConfigError, match=reason):
        check_zero_stage(cfg.distributed, step)
    check_zero_stage(load_config(None, [DS, "distributed.zero_stage=2"]).distributed, step)  # ZeRO-2 is fine


def test_deepspeed_config_generated_and_from_file(tmp_path):
    from guardx.distributed.deepspeed_engine import deepspeed_config

    d = load_config(None, [DS, "distributed.zero_stage=2", "distributed.grad_accum=2"]).distributed
    cfg = deepspeed_config(d, world_size=4, global_batch=256, grad_clip=0.0)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == \
        (256, 32, 2)
    assert cfg["gradient_clipping"] == 0.0  # written explicitly: DeepSpeed's default would clip at 1.0
    assert cfg["zero_optimization"] == {"stage": 2} and cfg["torch_autocast"]["enabled"] is False
    with pytest.raises(ConfigError, match="divisible by world size"):
        deepspeed_config(d, world_size=3, global_batch=256, grad_clip=0.0)

    # the shipped files: "auto" keys filled in, DeepSpeed's own knobs kept
    for stage in (1, 2):
        d = load_config(None, [DS, f"distributed.zero_stage={stage}", "distributed.precision=bf16",
                               f"distributed.deepspeed_config={REPO}/launch/ds_zero{stage}.json"]).distributed
        cfg = deepspeed_config(d, world_size=8, global_batch=1024, grad_clip=5.0)
        assert cfg["zero_optimization"]["stage"] == stage and cfg["zero_optimization"]["reduce_bucket_size"] > 0
        assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
        assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_clipping"]) == (128, 5.0)

    # a file that disagrees with the guardx config, or brings its own optimiser, is a one-line error
    d = load_config(None, [DS, "distributed.zero_stage=1",
                           f"distributed.deepspeed_config={REPO}/launch/ds_zero2.json"]).distributed
    with pytest.raises(ConfigError, match=r"sets zero_optimization.stage=2 but the guardx config gives 1"):
        deepspeed_config(d, world_size=2, global_batch=64, grad_clip=0.0)
    bad = tmp_path / "opt.json"
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    d = load_config(None, [DS, f"distributed.deepspeed_config={bad}"]).distributed
    with pytest.raises(ConfigError, match="remove the 'optimizer' section"):
        deepspeed_config(d, world_size=2, global_batch=64, grad_clip=0.0)


def test_gradient_accumulation_in_one_process_matches_the_whole_batch(tmp_path):
    """The accumulation path itself (loss scaled by the step's micro-batch count, one optimiser step per
    group), checked without any process group: 4 micro-batches of 8 = one batch of 32."""
    _single(tmp_path / "whole", "squeeze.max_steps=3")
    _single(tmp_path / "accum", "squeeze.max_steps=3", "distributed.grad_accum=4")
    _assert_same_model(_model(tmp_path / "accum" / "squeeze" / "teacher.pt"),
                       _model(tmp_path / "whole" / "squeeze" / "teacher.pt"), atol=1e-6)
    assert _metrics(tmp_path / "accum")["steps"] == 3


def test_launch_scripts_compose_the_torchrun_commands(tmp_path):
    """The single-node script and the SLURM file (with stand-ins for srun and scontrol) in DRY_RUN mode."""
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": "py", "NGPU": "8"}
    single = subprocess.run(["bash", "launch/run_single_node.sh", "squeeze", "--config", "c.yaml", "a.b=1"],
                            cwd=REPO, env={**env, "BACKEND": "deepspeed", "ZERO": "1", "PRECISION": "bf16"},
                            capture_output=True, text=True, check=True).stdout.split()
    assert single[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8"]
    assert single[6:] == ["-m", "guardx", "squeeze", "--config", "c.yaml", "a.b=1", "distributed.backend=deepspeed",
                          "distributed.zero_stage=1", f"distributed.deepspeed_config={REPO}/launch/ds_zero1.json",
                          "distributed.precision=bf16"]

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a17\\ngpu-a18\\n"\n')
    # srun stand-in: run the task once per node, as SLURM would on each
    (bin_dir / "srun").write_text('#!/bin/bash\nshift\nfor id in 0 1; do SLURM_NODEID=$id "$@"; done\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    slurm = {**env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-a[17-18]",
             "SLURM_NNODES": "2", "SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": str(REPO), "GPUS_PER_NODE": "4"}
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "squeeze", "--config", "c.yaml"],
                          cwd=tmp_path, env=slurm, capture_output=True, text=True, check=True)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    for node, line in enumerate(lines):
        assert line.split() == ["py", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "4",
                                "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu-a17:29500", "--rdzv-id", "77",
                                "--rdzv-conf", f"is_host={int(node == 0)}", "--max-restarts", "0",
                                "-m", "guardx", "squeeze", "--config", "c.yaml", "distributed.backend=ddp"]


def test_only_collective_failures_become_peer_lost_errors():
    from guardx.distributed.context import DistContext, PeerLostError

    ctx = DistContext(rank=1, world_size=4)
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.7]:4711: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging")
    with pytest.raises(PeerLostError) as info:
        with ctx.on_peer_loss(lambda: "squeeze step 7"):
            raise gloo
    assert str(info.value).startswith("rank 1 of 4 lost its peers during squeeze step 7: another rank died")
    assert "(Read error [10.0.0.7]:4711: Connection reset by peer)" in str(info.value)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # a bug stays a bug
        with ctx.on_peer_loss(lambda: "squeeze step 7"):
            raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="gloo"):  # one process has no peers to lose
        with DistContext().on_peer_loss(lambda: "squeeze step 7"):
            raise gloo


@pytest.mark.slow
def test_folded_guard_under_ddp_matches_one_process(tmp_path):
    """GUARD exact and lossdiff with BatchNorm folded (guardx/objectives/_fold.py) inside the DDP-wrapped
    ObjectiveStep, 2 ranks of half a batch each: every parameter's averaged gradient equals one process
    computing each half with its own BatchNorm batch statistics (what each rank's CE forward sees) and
    averaging, folded or not (unfolded also with autograd's own convolution double backward); rank 0's running
    statistics are its half's single update (to rounding: the ranks run one thread, this process two)."""
    from fold_ddp_worker import MODES, global_batch, model, objective

    out = tmp_path / "ddp.pt"
    proc = subprocess.run(_torchrun("--standalone", "--nproc-per-node", "2", "tests/fold_ddp_worker.py", str(out)),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    x, y = global_batch()
    for mode in MODES:
        halves = []
        for xh, yh in zip(x.chunk(2), y.chunk(2)):
            m = model()
            loss, _ = objective(mode)(m, xh, yh)
            halves.append((dict(zip([n for n, _ in m.named_parameters()], torch.autograd.grad(loss, list(
                m.parameters())))), dict(m.named_buffers())))
        for fold in (True, False):
            ddp = got[f"{mode}-{fold}"]
            for name, g0 in halves[0][0].items():
                ref = (g0 + halves[1][0][name]) / 2
                torch.testing.assert_close(ddp["grads"][name], ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item(),
                                           msg=f"{mode} fold={fold} {name}")
            for name, b in halves[0][1].items():
                torch.testing.assert_close(ddp["buffers"][name], b, rtol=1e-9, atol=1e-12, msg=f"{mode} {fold} {name}")
