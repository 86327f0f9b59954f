"""DeepSpeed engine: ZeRO stage 0/1/2 (optimiser state, and at stage 2 gradients, sharded over ranks).

Choices, each for a reason:

* guardx's own optimiser (SGD for squeeze, AdamW for train) is handed to DeepSpeed as a client optimiser
  (``zero_allow_untested_optimizer``): the update is then exactly the single-process one, and the
  checkpoint format is the same on every backend.
* ``gradient_clipping`` is always written: DeepSpeed's default is 1.0, not "off".
* the objective runs inside the wrapped module's forward: DeepSpeed 0.19 hooks the engine's outputs,
  so an inner ``autograd.grad`` on them would be taken for the real backward.
* checkpoints are consolidated: every rank assembles the full fp32 weights and optimiser state from the
  shards (DeepSpeed's public fragment API, ``deepspeed.utils.safe_get_full_*``), rank 0 writes them in
  ``torch.optim`` format, and loading slices them again for this world size. A checkpoint written by 2
  ZeRO-2 ranks therefore resumes on 1 plain process, on DDP, or on 8 ZeRO-1 ranks. The cost is one
  all-reduce of the model and of each optimiser-state tensor per checkpoint (ResNet-18: ~90 MB).
* bf16/fp16 is DeepSpeed's ``torch_autocast`` mode: fp32 weights in the module, the forward (every pass
  of the objective) under ``torch.autocast``, Conv/Linear gradients exchanged in the low precision, and
  for fp16 a gradient scaler. It is the same arithmetic as the DDP and single-process engines, works at
  every ZeRO stage, and keeps BatchNorm statistics and the normaliser in fp32.
* ZeRO-3 is refused: for objectives that run backward passes inside the forward (GUARD, gradnorm, adv)
  because ZeRO-3 gathers each layer's parameters only for DeepSpeed's own forward and backward; for the
  others because the consolidated checkpoints above are built for ZeRO-1/2 (ZeRO-3's optimiser keeps its
  own sharded format), and ResNet-scale weights fit on every GPU anyway.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from guardx.distributed.engine import Engine
from guardx.errors import ConfigError, GuardxError

_AUTOCAST_DTYPE = {"bf16": "bfloat16", "fp16": "float16"}


def check_zero_stage(d, step_module: nn.Module) -> None:
    """One-line :class:`ConfigError` for ZeRO-3, saying why for this objective."""
    if d.zero_stage != 3:
        return
    why = getattr(step_module, "backward_in_forward", None)  # declared by the objective
    if why:
        raise ConfigError(f"distributed.zero_stage=3 cannot train {getattr(step_module, 'objective', '')!r}: {why}, "
                          "and ZeRO-3 gathers each layer's "
                          "parameters only for DeepSpeed's own forward and backward; use "
                          "distributed.zero_stage=1 or 2, or distributed.backend=ddp")
    # the objective would run, but guardx's checkpoints (full, any world size) are built for ZeRO-1/2
    raise ConfigError("distributed.zero_stage=3 is not supported: guardx's resumable, world-size-independent "
                      "checkpoints cover ZeRO stages 0-2, and ResNet-scale weights fit on every GPU, so "
                      "ZeRO-3 would save nothing; use distributed.zero_stage=1 or 2")


# guardx derives these from its own config; a DeepSpeed JSON file may leave them out or say "auto"
def _owned(d, *, world_size: int, global_batch: int, grad_clip: float) -> dict:
    if global_batch <= 0 or global_batch % (world_size * d.grad_accum):
        raise ConfigError(f"the global batch {global_batch} must be divisible by world size × distributed.grad_accum "
                          f"({world_size} × {d.grad_accum})")
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": global_batch // (world_size * d.grad_accum),
        "gradient_accumulation_steps": d.grad_accum,
        "gradient_clipping": float(grad_clip),  # DeepSpeed's default is 1.0
        "zero_optimization": {"stage": d.zero_stage},
        "torch_autocast": {"enabled": d.precision != "fp32", "dtype": _AUTOCAST_DTYPE.get(d.precision, "bfloat16")},
    }


def deepspeed_config(d, *, world_size: int, global_batch: int, grad_clip: float) -> dict:
    """The DeepSpeed config: generated from guardx's, or ``d.deepspeed_config`` (JSON) checked against it.

    The file contributes everything guardx does not decide (bucket sizes, overlap_comm, offload, ...);
    batch sizes, accumulation, clipping, ZeRO stage and precision (``torch_autocast``) must agree with the
    guardx config or be ``"auto"``; optimiser and scheduler sections are refused (guardx builds them).
    """
    owned = _owned(d, world_size=world_size, global_batch=global_batch, grad_clip=grad_clip)
    base = {"zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
    if not d.deepspeed_config:
        return {**base, **owned}
    path = Path(d.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"distributed.deepspeed_config: file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"distributed.deepspeed_config: {path} is not valid JSON ({e})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"distributed.deepspeed_config: {path} must hold a JSON object")
    for section in ("optimizer", "scheduler"):
        if section in user:
            raise ConfigError(f"distributed.deepspeed_config: remove the {section!r} section from {path}: guardx "
                              "builds the optimiser and schedule from its own config (squeeze.lr, ...)")
    for section in ("bf16", "fp16"):
        if (user.get(section) or {}).get("enabled", False) not in (False, "auto"):
            raise ConfigError(f"distributed.deepspeed_config: {path} enables {section!r}; guardx runs low precision "
                              "as torch autocast: set distributed.precision and disable the section")
    merged = {**base, **user}
    for key, value in owned.items():
        if isinstance(value, dict):  # one level down: zero_optimization.stage, torch_autocast.*
            sub = dict(user.get(key) or {})
            for k, v in value.items():
                _agree(sub, k, v, f"{key}.{k}", path)
            merged[key] = sub
        else:
            _agree(merged, key, value, key, path)
    return merged


def _agree(where: dict, key: str, ours, name: str, path: Path) -> None:
    theirs = where.get(key, "auto")
    same = theirs == ours or (isinstance(ours, float) and isinstance(theirs, (int, float)) and float(theirs) == ours)
    if theirs == "auto":
        where[key] = ours
    elif not same:
        raise ConfigError(f"distributed.deepspeed_config: {path} sets {name}={json.dumps(theirs)} but the guardx "
                          f"config gives {json.dumps(ours)}: make them agree or write \"auto\" in the file")


class DeepSpeedEngine(Engine):
    def __init__(self, step_module: nn.Module, optimizer, scheduler=None, grad_clip: float = 0.0, *, cfg, ctx,
                 global_batch: int, **kw):
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        super().__init__(step_module, optimizer, scheduler, grad_clip, **kw)
        self.scaler = None  # DeepSpeed autocasts and scales fp16 losses itself
        ds_logger.setLevel(logging.WARNING)
        config = deepspeed_config(cfg, world_size=ctx.world_size, global_batch=global_batch, grad_clip=grad_clip)
        # the parameter groups as the caller built them: DeepSpeed replaces them with flat shards
        self._groups = [list(g["params"]) for g in optimizer.param_groups]
        self.ds, self.ds_optimizer, _, _ = deepspeed.initialize(model=step_module, optimizer=optimizer,
                                                                lr_scheduler=scheduler, config=config)
        self._sharded = hasattr(self.ds_optimizer, "_lazy_init_hp_params_optimizer_state")  # ZeRO-1/2

    @property
    def model(self) -> nn.Module:
        return self.ds.module.model

    def train(self, mode: bool = True) -> "DeepSpeedEngine":
        self.ds.train(mode)
        return self

    def __call__(self, x, y):
        # set before the forward: ZeRO decides then whether this backward reduces gradients
        self.ds.set_gradient_accumulation_boundary(self.last_micro_batch)
        return self.ds(x, y)  # DeepSpeed applies torch_autocast itself

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss / self._micro_total, scale_wrt_gas=False)  # our micro-batch count, not the config's

    def step(self) -> bool:
        self.ds.step()  # DeepSpeed steps the optimiser and the scheduler at the boundary set above
        self._micro_done += 1
        if self._micro_done < self._micro_total:
            return False
        self._micro_total, self._micro_done = 1, 0
        return True

    # ------------------------------------------------------------------ consolidated checkpoints
    # The module always holds the full fp32 weights (ZeRO-1/2 all-gather the updated shards after every
    # step), so the model state is the module's; only the optimiser state has to be assembled.

    def _inner(self) -> torch.optim.Optimizer:
        """The caller's torch optimiser; under ZeRO-1/2 its parameters are this rank's flat fp32 shards."""
        return self.ds_optimizer.optimizer if self._sharded else self.ds_optimizer

    def _optimizer_state(self) -> dict:
        inner = self._inner()
        if not self._sharded:
            return inner.state_dict()
        from deepspeed.utils import safe_get_full_optimizer_state

        state, groups, index = {}, [], 0
        for group, params in zip(inner.param_groups, self._groups):
            shard = group["params"][0]
            shard_state = inner.state.get(shard, {})
            for p in params:
                entry = {}
                for key, value in shard_state.items():
                    if torch.is_tensor(value) and value.shape == shard.shape:  # per-element: assemble from shards
                        entry[key] = safe_get_full_optimizer_state(p, key).reshape(p.shape)
                    else:  # per-shard scalars (AdamW's step count) are the same for every parameter
                        entry[key] = value.clone() if torch.is_tensor(value) else value
                if entry:
                    state[index] = entry
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(index - len(params), index))})
        return {"state": state, "param_groups": groups}

    def state_dict(self) -> dict:
        """Full fp32 model + ``torch.optim`` state + scheduler (collective: every rank calls it)."""
        return {"model": self.model.state_dict(), "optimizer": self._optimizer_state(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if not self._sharded:
            self._inner().load_state_dict(state["optimizer"])
        else:
            self._load_sharded(state)
        self._load_scheduler_and_scaler(state)

    def _load_sharded(self, state: dict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        device = next(self.model.parameters()).device
        for name, p in self.model.named_parameters():  # the shards ZeRO updates (copies of the module's)
            safe_set_full_fp32_param(p, state["model"][name].to(device, torch.float32))
        saved, inner = state["optimizer"], self._inner()
        if [len(g["params"]) for g in saved["param_groups"]] != [len(g) for g in self._groups]:
            raise GuardxError("checkpoint optimiser state does not match this model's parameter groups")
        entries = []
        for group, params, saved_group in zip(inner.param_groups, self._groups, saved["param_groups"]):
            shard = group["params"][0]
            per_param = [saved["state"].get(i, {}) for i in saved_group["params"]]
            # create the shard's state the way the first optimiser step would, then point the fragments at it
            first = next((e for e in per_param if e), None)
            if first is not None:
                inner.state[shard] = {k: torch.zeros_like(shard) if torch.is_tensor(v) and v.dim() > 0
                                      else (v.clone() if torch.is_tensor(v) else v) for k, v in first.items()}
            entries += [(p, e) for p, e in zip(params, per_param)]
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        self.ds_optimizer._hp_optimizer_states_linked = False
        self.ds_optimizer._lazy_init_hp_params_optimizer_state()
        for p, entry in entries:
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    safe_set_full_optimizer_state(p, value.to(device, torch.float32), key)
