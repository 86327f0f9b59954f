"""Typed configuration: one dataclass per concern, YAML files, ``section.key=value`` overrides.

Resolution order (later wins): dataclass defaults (the paper's / official values) → YAML file(s) →
command-line overrides. An unknown key, a wrong type or an invalid value is a one-line
:class:`~guardx.errors.ConfigError` that names the key (and the closest valid key).

Every field carries a ``help`` string; ``guardx config --reference`` prints them as the README's
config reference.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from guardx.errors import ConfigError, did_you_mean
from guardx.utils.misc import parse_fraction


def F(default, help: str):  # noqa: A002  (a field with its documentation)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _one_of(section: str, key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{key}={value!r} is not one of {list(allowed)}")


def _positive(section: str, key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{section}.{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass
class RunConfig:
    out_dir: str = F("runs/guardx", "run directory; every stage writes under it")
    seed: int = F(0, "global seed (each rank offsets it by its rank where randomness must differ)")
    device: str = F("auto", "auto | cpu | cuda")
    progress: bool = F(True, "show tqdm progress bars (rank 0 only)")

    def validate(self):
        _one_of("run", "device", self.device, ("auto", "cpu", "cuda"))


@dataclass
class DataConfig:
    dataset: str = F("imagefolder", "digits (embedded, 32x32 RGB from scikit-learn) | imagefolder")
    backend: str = F("folder", "loader for imagefolder data: folder (torchvision) | ffcv | dali")
    train_dir: str = F("", "ImageFolder root of the training split (class sub-folders)")
    val_dir: str = F("", "ImageFolder root of the validation/test split")
    ffcv_train: str = F("", "FFCV .beton of the training split (backend=ffcv)")
    ffcv_val: str = F("", "FFCV .beton of the validation split (backend=ffcv)")
    num_classes: int = F(0, "number of classes; 0 = infer from the data")
    resolution: int = F(224, "training/eval crop size in pixels")
    val_crop_ratio: float = F(0.875, "eval: resize to resolution/ratio, then center-crop resolution")
    rrc_scale: list = F([0.08, 1.0], "train: RandomResizedCrop area range")
    flip: bool = F(True, "train: random horizontal flip")
    workers: int = F(4, "per rank: loader worker processes (folder) or decoding threads (ffcv, dali)")
    mean: list = F([0.485, 0.456, 0.406], "per-channel mean, applied inside the model wrapper")
    std: list = F([0.229, 0.224, 0.225], "per-channel std, applied inside the model wrapper")
    ffcv_order: str = F("sharded", "ffcv: sharded (the seeded, sharded order every backend uses) | quasi_random "
                        "(FFCV's page-aware order for a .beton larger than RAM, with ffcv_os_cache=false; one rank only)")
    ffcv_os_cache: bool = F(True, "ffcv: read the .beton through the OS page cache (shared by the ranks of a node); "
                            "false = each process caches the pages it reads")
    ffcv_batches_ahead: int = F(3, "ffcv: batches decoded ahead of the consumer")
    ffcv_max_resolution: int = F(256, "guardx data convert: longest side stored in the .beton (0 = keep the original)")
    ffcv_jpeg_quality: int = F(90, "guardx data convert: JPEG quality of the re-encoded images")
    ffcv_write_mode: str = F("jpg", "guardx data convert: jpg | raw (uint8 pixels: fastest decode, ~8x larger) | "
                             "proportion (JPEG with probability ffcv_compress_probability, else raw)")
    ffcv_compress_probability: float = F(0.5, "guardx data convert, write_mode=proportion: share stored as JPEG")
    dali_decode: str = F("auto", "dali: auto (mixed = nvJPEG on the GPU when the loader's device is CUDA, else cpu) "
                         "| mixed | cpu")
    dali_prefetch: int = F(2, "dali: prefetch queue depth (batches in flight)")

    def validate(self):
        _one_of("data", "dataset", self.dataset, ("digits", "imagefolder"))
        _one_of("data", "backend", self.backend, ("folder", "ffcv", "dali"))
        _positive("data", "resolution", self.resolution)
        _positive("data", "workers", self.workers, allow_zero=True)
        if len(self.rrc_scale) != 2 or not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            raise ConfigError(f"data.rrc_scale must be [min, max] with 0 < min <= max <= 1, got {self.rrc_scale}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("data.mean and data.std must have 3 values (RGB)")
        _one_of("data", "ffcv_order", self.ffcv_order, ("sharded", "quasi_random"))
        _one_of("data", "ffcv_write_mode", self.ffcv_write_mode, ("jpg", "raw", "proportion"))
        _one_of("data", "dali_decode", self.dali_decode, ("auto", "mixed", "cpu"))
        _positive("data", "ffcv_batches_ahead", self.ffcv_batches_ahead)
        _positive("data", "ffcv_max_resolution", self.ffcv_max_resolution, allow_zero=True)
        _positive("data", "dali_prefetch", self.dali_prefetch)
        if not 1 <= self.ffcv_jpeg_quality <= 100:
            raise ConfigError(f"data.ffcv_jpeg_quality must be in [1, 100], got {self.ffcv_jpeg_quality}")
        if not 0 <= self.ffcv_compress_probability <= 1:
            raise ConfigError(f"data.ffcv_compress_probability must be in [0, 1], got {self.ffcv_compress_probability}")


@dataclass
class ModelConfig:
    name: str = F("resnet18", "teacher architecture: resnet18 | resnet18_small | convnet")
    width: int = F(64, "base width (64 = the standard ResNet-18; 128 = the DC/MTT ConvNet)")

    def validate(self):
        from guardx.models import is_model, list_models

        if not is_model(self.name):
            raise ConfigError(f"model.name={self.name!r} is not a known model{did_you_mean(self.name, list_models())}; "
                              f"known: {list_models()}")
        _positive("model", "width", self.width)


@dataclass
class ObjectiveConfig:
    name: str = F("plain", "plain | guard | adv (PGD-k adversarial training) | gradnorm")
    mode: str = F("exact", "guard: exact (eq. 11, double backprop) | lossdiff (official ImageNet code) | cure (official CIFAR code)")
    h: float = F(3.0, "guard: discretisation step along z (in units of `space`)")
    lam: float = F(100.0, "guard exact/cure: regulariser weight lambda")
    beta: float = F(1e-4, "guard lossdiff: weight of |L(x+hz) - L(x)|")
    space: str = F("normalized", "where the perturbation acts: normalized (after the model's normaliser) | pixel")
    eps: float = F(1 / 255, "adv: L-inf radius in pixel units (accepts k/255)")
    alpha: float = F(0.25 / 255, "adv: PGD step size in pixel units")
    steps: int = F(10, "adv: PGD steps k")
    random_start: bool = F(True, "adv: start PGD from a uniform point in the eps-ball")
    lam_g: float = F(1e-2, "gradnorm: weight lambda_g of ||grad_x loss||^2")

    def validate(self):
        _one_of("objective", "name", self.name, ("plain", "guard", "adv", "gradnorm"))
        _one_of("objective", "mode", self.mode, ("exact", "lossdiff", "cure"))
        _one_of("objective", "space", self.space, ("normalized", "pixel"))
        _positive("objective", "steps", self.steps)

    def params(self) -> dict:
        """Keyword arguments for :func:`guardx.objectives.build_objective`."""
        n = self.name
        if n == "guard":
            return dict(mode=self.mode, h=self.h, lam=self.lam, beta=self.beta, space=self.space)
        if n == "adv":
            return dict(eps=self.eps, alpha=self.alpha, steps=self.steps, random_start=self.random_start)
        if n == "gradnorm":
            return dict(lam_g=self.lam_g, space=self.space)
        return {}


@dataclass
class SqueezeConfig:
    epochs: int = F(50, "training epochs of the teacher on real data")
    batch_size: int = F(32, "global batch size (split evenly over ranks)")
    lr: float = F(0.025, "SGD learning rate")
    momentum: float = F(0.9, "SGD momentum")
    weight_decay: float = F(1e-4, "SGD weight decay")
    schedule: str = F("cosine", "learning-rate schedule per step: cosine | constant")
    grad_clip: float = F(0.0, "max gradient norm; 0 disables clipping")
    keep_checkpoints: int = F(3, "epoch checkpoints kept on disk (the newest)")
    ckpt_every_steps: int = F(0, "also checkpoint every N steps inside an epoch; 0 = epoch ends only")
    max_steps: int = F(0, "stop after N optimiser steps in total (smoke runs); 0 = no limit")
    bn_recalibrate_batches: int = F(0, "after training, re-estimate BatchNorm running statistics over N training "
                                       "batches (precise BN); 0 = keep the training-time averages (official)")

    def validate(self):
        for k in ("epochs", "batch_size"):
            _positive("squeeze", k, getattr(self, k))
        _one_of("squeeze", "schedule", self.schedule, ("cosine", "constant"))


@dataclass
class RecoverConfig:
    iterations: int = F(2000, "optimisation steps per synthetic batch")
    batch_size: int = F(100, "synthetic images optimised together (one per class per ipc index)")
    lr: float = F(0.25, "Adam learning rate (cosine-decayed)")
    betas: list = F([0.5, 0.9], "Adam betas")
    r_bn: float = F(0.01, "weight of the BatchNorm-statistics loss")
    first_bn_multiplier: float = F(10.0, "extra weight of the first BatchNorm layer's term")
    jitter: int = F(32, "max random roll (pixels) applied each iteration")
    rrc_scale: list = F([0.08, 1.0], "RandomResizedCrop area range applied each iteration")
    flip: bool = F(True, "random horizontal flip each iteration")
    ipc: int = F(50, "images per class")
    classes: list = F([], "class indices to synthesise; empty = all")

    def validate(self):
        for k in ("iterations", "batch_size", "ipc"):
            _positive("recover", k, getattr(self, k))
        _positive("recover", "jitter", self.jitter, allow_zero=True)


@dataclass
class RelabelConfig:
    epochs: int = F(300, "epochs of soft labels to store (one random crop per image per epoch)")
    batch_size: int = F(100, "teacher batch size while labelling")
    mode: str = F("store", "store (crops + soft labels on disk) | online (teacher runs during train)")
    topk: int = F(0, "keep the top-k teacher logits per crop (fp16 + int16 index); 0 = all classes")
    rrc_scale: list = F([0.08, 1.0], "RandomResizedCrop area range of the crops")
    flip: bool = F(True, "random horizontal flip of the crops")

    def validate(self):
        _positive("relabel", "epochs", self.epochs)
        _one_of("relabel", "mode", self.mode, ("store", "online"))
        _positive("relabel", "topk", self.topk, allow_zero=True)


@dataclass
class TrainConfig:
    model: str = F("", "student architecture; empty = model.name")
    width: int = F(0, "student width; 0 = model.width")
    epochs: int = F(300, "epochs on the distilled set (store mode reuses the stored epochs cyclically if longer)")
    batch_size: int = F(128, "global batch size")
    lr: float = F(1e-3, "AdamW learning rate (cosine-decayed per step)")
    weight_decay: float = F(0.01, "AdamW weight decay")
    temperature: float = F(20.0, "KL temperature on teacher and student logits")
    keep_checkpoints: int = F(2, "epoch checkpoints kept on disk")

    def validate(self):
        for k in ("epochs", "batch_size"):
            _positive("train", k, getattr(self, k))
        _positive("train", "temperature", self.temperature)


@dataclass
class EvaluateConfig:
    attacks: list = F(["pgd"], "attacks besides clean accuracy: pgd (pgd_steps steps) or pgd<N> (N steps), fgsm, "
                               "mim, cw, square, autoattack (e.g. pgd100,square,autoattack,cw,mim)")
    eps: list = F([1 / 255], "L-inf radii in pixel units (accepts k/255); cw ignores them (unbounded L2)")
    checkpoints: list = F([], "model files to evaluate, PATH or LABEL=PATH; empty = the run's teacher and student")
    out_dir: str = F("", "results folder; empty = <run.out_dir>/evaluate")
    pgd_steps: int = F(100, "PGD iterations (PGD-100 in the paper)")
    pgd_alpha: float = F(0.0, "PGD step size; 0 = eps/4")
    pgd_random_start: bool = F(True, "PGD random start inside the eps-ball")
    pgd_early_stop: bool = F(False, "PGD and MIM: keep a sample's first misclassified iterate and stop attacking it "
                                     "(worst-iterate accuracy, <= last-iterate; much faster at large eps)")
    mim_steps: int = F(20, "MIM (momentum iterative FGSM) iterations")
    mim_decay: float = F(1.0, "MIM momentum decay mu")
    mim_alpha: float = F(0.0, "MIM step size; 0 = eps/4")
    cw_c: float = F(1e-5, "CW-L2 weight c of the margin term (the paper: 1e-5)")
    cw_kappa: float = F(0.0, "CW-L2 confidence kappa")
    cw_steps: int = F(50, "CW-L2 Adam steps (torchattacks' default; the paper gives only c)")
    cw_lr: float = F(0.01, "CW-L2 Adam learning rate")
    square_queries: int = F(5000, "Square attack queries per sample (also the Square inside autoattack standard)")
    square_p_init: float = F(0.8, "Square attack initial fraction of pixels changed per query")
    autoattack_version: str = F("standard", "standard (APGD-CE, APGD-T, FAB-T, Square) | fast (APGD-CE, APGD-T)")
    autoattack_steps: int = F(100, "autoattack: iterations of APGD-CE, APGD-T and FAB-T (reference: 100)")
    autoattack_targets: int = F(9, "autoattack: target classes of APGD-T and FAB-T (reference: 9)")
    batch_size: int = F(256, "evaluation batch size per rank (also the block of samples that shares attack seeds)")
    max_samples: int = F(0, "evaluate the first N test samples only; 0 = the whole split")

    def validate(self):
        from guardx.attacks import parse_attack

        if not self.eps or any(isinstance(e, bool) or not isinstance(e, (int, float)) or e < 0 for e in self.eps):
            raise ConfigError(f"evaluate.eps must be a non-empty list of radii >= 0 (numbers or k/255), got {self.eps}")
        for spec in self.attacks:
            if not isinstance(spec, str):
                raise ConfigError(f"evaluate.attacks entries must be names like pgd100, got {spec!r}")
            parse_attack(spec)
        if len(set(self.attacks)) != len(self.attacks):
            raise ConfigError(f"evaluate.attacks has duplicates: {self.attacks}")
        for k in ("pgd_steps", "mim_steps", "cw_steps", "square_queries", "autoattack_steps", "autoattack_targets",
                  "batch_size", "cw_lr"):
            _positive("evaluate", k, getattr(self, k))
        _one_of("evaluate", "autoattack_version", self.autoattack_version, ("standard", "fast"))


@dataclass
class DistributedConfig:
    backend: str = F("none", "none (one process) | ddp | deepspeed; ranks come from torchrun's environment")
    zero_stage: int = F(0, "deepspeed: ZeRO stage 0 | 1 (shard optimiser state) | 2 (+ gradients); 3 is refused "
                           "with the reason (GUARD's double backprop needs every layer's weights in the forward)")
    precision: str = F("fp32", "fp32 | bf16 | fp16: fp32 weights, forward under torch.autocast on every backend "
                                "(fp16 adds a gradient scaler; deepspeed: its torch_autocast mode)")
    grad_accum: int = F(1, "micro-batches per optimiser step; the global batch (squeeze/train.batch_size) is "
                           "split over ranks x grad_accum")
    deepspeed_config: str = F("", "deepspeed: JSON file (e.g. launch/ds_zero2.json) for DeepSpeed's own knobs; "
                                  "batch, accumulation, clipping, stage and precision come from guardx "
                                  "(\"auto\" in the file); empty = generated")
    timeout_s: int = F(600, "collective timeout in seconds: a stalled rank makes the others exit with an "
                            "error after this long (a killed rank: at once)")

    def validate(self):
        _one_of("distributed", "backend", self.backend, ("none", "ddp", "deepspeed"))
        _one_of("distributed", "zero_stage", self.zero_stage, (0, 1, 2, 3))
        _one_of("distributed", "precision", self.precision, ("fp32", "bf16", "fp16"))
        _positive("distributed", "grad_accum", self.grad_accum)
        _positive("distributed", "timeout_s", self.timeout_s)
        if self.deepspeed_config and self.backend != "deepspeed":
            raise ConfigError(f"distributed.deepspeed_config is set but distributed.backend={self.backend}: "
                              "set distributed.backend=deepspeed")


@dataclass
class MethodConfig:
    name: str = F("sre2l", "label of the method in the report")
    objective: dict = F({}, "overrides of the `objective` section for this method's squeeze")


STAGES = ("squeeze", "recover", "relabel", "train", "evaluate")


@dataclass
class PipelineConfig:
    methods: list = F([{"name": "sre2l", "objective": {"name": "plain"}}],
                      "methods compared: a list of {name, objective: {...overrides}}")
    stages: list = F(list(STAGES), "stages the pipeline runs, in order")
    eval_teacher: bool = F(True, "also evaluate each teacher on the test split")

    def __post_init__(self):
        self.methods = [m if isinstance(m, MethodConfig) else _build(MethodConfig, m, "pipeline.methods.")
                        for m in self.methods]
        for m in self.methods:
            _build(ObjectiveConfig, m.objective, f"pipeline.methods.{m.name}.objective.").validate()

    def validate(self):
        for s in self.stages:
            _one_of("pipeline", "stages", s, STAGES)
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ConfigError(f"pipeline.methods names must be unique, got {names}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    relabel: RelabelConfig = field(default_factory=RelabelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    dc: "DCConfig" = field(default_factory=lambda: DCConfig())
    cda: "CDAConfig" = field(default_factory=lambda: CDAConfig())

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_objective(self, overrides: dict) -> "Config":
        """A copy whose ``objective`` section has ``overrides`` applied (a pipeline method)."""
        data = self.to_dict()
        data["objective"].update(overrides)
        return from_dict(data)


# --------------------------------------------------------------------------- parsing

def _parse_number(value: Any, want: type) -> Any:
    """Accept ``k/255``-style fractions for floats (ε is written that way in the paper)."""
    if isinstance(value, str) and want is float:
        try:
            return parse_fraction(value)
        except ValueError:
            pass
    return value


def _coerce(value: Any, want: Any, key: str) -> Any:
    origin = typing.get_origin(want)
    if want is Any:
        return value
    if dataclasses.is_dataclass(want):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return _build(want, value, key + ".")
    if want is list or origin is list:
        if isinstance(value, str):  # "a,b,c" from the command line
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_parse_number(v, float) if isinstance(v, str) and "/" in v else v for v in value]
    if want is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    value = _parse_number(value, want)
    if want is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if want is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key} must be {want.__name__}, got {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}'{did_you_mean(k, names, prefix)}")
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def from_dict(data: dict) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    return _build(Config, data).validate()


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"cannot set {dotted}: {p} is not a section")
    cur[parts[-1]] = value


def load_config(paths: str | Path | list | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file(s) then ``section.key=value`` overrides (values parsed as YAML: 3, 0.1, true, [1,2])."""
    data: dict = {}
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for p in paths or []:
        p = Path(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        _deep_update(data, loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key, value)
    return from_dict(data)


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def reference_markdown() -> str:
    """The config reference (every section, key, default and meaning) as markdown tables."""
    out = []
    for sec in dataclasses.fields(Config):
        cls = sec.type if isinstance(sec.type, type) else typing.get_type_hints(Config)[sec.name]
        out.append(f"### `{sec.name}`\n\n| key | default | meaning |\n|---|---|---|")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = json.dumps(default) if not isinstance(default, float) else f"{default:g}"
            meaning = f.metadata.get("help", "").replace("|", "\\|")  # a bare | would split the cell
            out.append(f"| `{f.name}` | `{shown}` | {meaning} |")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- distillers beyond SRe2L

@dataclass
class DCConfig:
    ipc: int = F(10, "synthetic images per class")
    iterations: int = F(1000, "outer iterations, each from a fresh network theta0 ~ p(theta0) (DC's Iteration, "
                               "Algorithm 1's K)")
    outer_loops: int = F(0, "synthetic-set updates per iteration (DC's outer_loop, Algorithm 1's T); 0 = DC's "
                            "value for the ipc (1: 1, 10: 10, 20: 20, 30: 30, 40: 40, 50: 50)")
    inner_loops: int = F(0, "epochs of network training on the synthetic set between two synthetic updates "
                            "(DC's inner_loop); 0 = DC's value for the ipc (1: 1, 10: 50, 20: 25, 30: 20, 40: 15, 50: 10)")
    lr_img: float = F(0.1, "SGD learning rate of the synthetic images (normalised space)")
    momentum_img: float = F(0.5, "SGD momentum of the synthetic images")
    lr_net: float = F(0.01, "SGD learning rate of the network trained on the synthetic set (no momentum)")
    batch_real: int = F(256, "real images per class per synthetic update")
    batch_train: int = F(256, "batch size of the network training on the synthetic set")
    init: str = F("real", "synthetic images start as random real images of their class (real) or N(0, 1) "
                          "noise in the normalised space (noise)")
    dsa: bool = F(False, "differentiable siamese augmentation (DSA) of the real and synthetic batches "
                         "(the same transform for both) and of the network's training batches")
    dsa_strategy: str = F("color_crop_cutout_flip_scale_rotate", "DSA families, one drawn per batch")
    model: str = F("convnet", "network whose gradients are matched (DC/MTT ConvNet)")
    width: int = F(128, "network width")
    depth: int = F(0, "ConvNet depth; 0 = by resolution (3 at 32 px, 4 at 64, 5 at 128)")
    batched: bool = F(True, "compute every class's synthetic-image gradient in one vectorised call "
                            "(torch.func.vmap); false = one class at a time (same maths)")
    ckpt_every: int = F(10, "checkpoint every N iterations (and at the end); a rerun resumes from the newest")

    def validate(self):
        from guardx.data.dsa import DSA
        from guardx.distill.dc import DC_LOOPS
        from guardx.models import is_model, list_models

        for k in ("ipc", "iterations", "lr_img", "lr_net", "batch_real", "batch_train", "width", "ckpt_every"):
            _positive("dc", k, getattr(self, k))
        for k in ("outer_loops", "inner_loops", "depth"):
            _positive("dc", k, getattr(self, k), allow_zero=True)
        _one_of("dc", "init", self.init, ("real", "noise"))
        if (not self.outer_loops or not self.inner_loops) and self.ipc not in DC_LOOPS:
            raise ConfigError(f"dc.ipc={self.ipc} has no DC loop counts (DC defines them for ipc {sorted(DC_LOOPS)}): "
                              "set dc.outer_loops and dc.inner_loops")
        try:
            DSA(self.dsa_strategy)
        except ValueError as e:
            raise ConfigError(f"dc.dsa_strategy: {e}") from None
        if not is_model(self.model):
            raise ConfigError(f"dc.model={self.model!r} is not a known model{did_you_mean(self.model, list_models())}")


@dataclass
class CDAConfig:
    schedule: str = F("cosine", "how the lower bound of recover's random-resized-crop scale falls from "
                                "scale_start to scale_end: step | linear | cosine (CDA's easy2hard_mode)")
    milestone: float = F(1.0, "fraction of the recover iterations over which it falls (then scale_end); "
                              "0 = no curriculum (scale_end throughout: SRe2L's crop)")
    scale_start: float = F(1.0, "lower crop-scale bound at iteration 0 (1.0 = whole image)")
    scale_end: float = F(0.08, "lower crop-scale bound from the milestone on")
    scale_max: float = F(1.0, "upper crop-scale bound throughout")

    def validate(self):
        _one_of("cda", "schedule", self.schedule, ("step", "linear", "cosine"))
        if not 0 <= self.milestone <= 1:
            raise ConfigError(f"cda.milestone must be in [0, 1], got {self.milestone}")
        if not 0 < self.scale_end <= self.scale_start <= self.scale_max <= 1:
            raise ConfigError("cda: need 0 < scale_end <= scale_start <= scale_max <= 1, got "
                              f"{self.scale_end}, {self.scale_start}, {self.scale_max}")
