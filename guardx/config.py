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
from guardx.registry import Interval
from guardx.utils.misc import parse_fraction


def F(default, help: str, *, range=None, choices=None, length: int | None = None):  # noqa: A002
    """A field with its documentation and its allowed values, checked for every section by
    :func:`check_fields` and shown in the config reference:

    * ``range``: an :class:`~guardx.registry.Interval` (``"[0, 1]"``, ``"(0, inf)"``) for a number, or for
      every element of a list (the element type comes from the annotation, e.g. ``list[float]``);
    * ``choices``: the allowed values (a misspelt one gets a did-you-mean);
    * ``length``: the exact number of elements of a list.
    """
    meta = {"help": help, "range": Interval.of(range), "choices": tuple(choices) if choices else None,
            "length": length}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


def _one_of(section: str, key: str, value, allowed) -> None:
    if value not in allowed:
        hint = did_you_mean(value, [str(a) for a in allowed]) if isinstance(value, str) else ""
        raise ConfigError(f"{section}.{key}={value!r} is not one of {list(allowed)}{hint}")


def check_fields(section: str, values) -> None:
    """The declared ``range``/``choices``/``length`` of every field of a section (see :func:`F`)."""
    for f in dataclasses.fields(values):
        value, meta = getattr(values, f.name), f.metadata
        where = f"{section}.{f.name}"
        if meta.get("choices"):
            _one_of(section, f.name, value, meta["choices"])
        if isinstance(value, list):
            if meta.get("length") is not None and len(value) != meta["length"]:
                raise ConfigError(f"{where} must have {meta['length']} values, got {value!r}")
            if meta.get("range") is not None:
                for i, v in enumerate(value):
                    meta["range"].check(v, f"{where}[{i}]")
        elif meta.get("range") is not None:
            meta["range"].check(value, where)


def _rrc(section: str, key: str, scale: list) -> None:
    if scale[0] > scale[1]:
        raise ConfigError(f"{section}.{key} must be [min, max] with min <= max, got {scale}")


ON_CONFIG_CHANGE = ("error", "restart", "resume")


@dataclass
class RunConfig:
    out_dir: str = F("runs/guardx", "run directory; every stage writes under it")
    seed: int = F(0, "global seed (each rank offsets it by its rank where randomness must differ)", range="[0, inf)")
    seeds: list[int] = F([], "pipeline: run every method once per seed, each in <out_dir>/<method>/seed<k>/, and report "
                             "mean, spread and paired confidence intervals; empty = run.seed only", range="[0, inf)")
    device: str = F("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    progress: bool = F(True, "show tqdm progress bars (rank 0 only)")
    distiller: str = F("sre2l", "the distiller whose set train and evaluate use (the pipeline sets it per method): "
                                "sre2l | cda | dc | mtt | tesla")
    deterministic: bool = F(False, "PyTorch's deterministic algorithms (torch.use_deterministic_algorithms, cuDNN "
                                   "autotuning off): the same numbers on the same machine and software, at some speed "
                                   "cost; across CPUs/BLAS builds numbers still differ (see the README)")
    on_config_change: str = F("error", "a stage folder holds work done with other settings (a changed key that "
                                       "determines the stage's result): error (stop, naming the keys) | restart "
                                       "(delete the stage's work and start it over) | resume (continue it with the "
                                       "new settings; the change is recorded in the stage's fingerprint.json)",
                              choices=ON_CONFIG_CHANGE)

    def validate(self):
        from guardx.distill import DISTILLERS

        DISTILLERS.get(self.distiller, where="run.distiller")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"run.seeds has duplicates: {self.seeds}")


@dataclass
class DataConfig:
    dataset: str = F("imagefolder", "digits (embedded: scikit-learn's 8x8 scans as RGB at data.resolution) | imagefolder",
                     choices=("digits", "imagefolder"))
    backend: str = F("folder", "loader for imagefolder data: folder (torchvision) | ffcv | dali",
                     choices=("folder", "ffcv", "dali"))
    train_dir: str = F("", "ImageFolder root of the training split (class sub-folders)")
    val_dir: str = F("", "ImageFolder root of the validation/test split")
    ffcv_train: str = F("", "FFCV .beton of the training split (backend=ffcv)")
    ffcv_val: str = F("", "FFCV .beton of the validation split (backend=ffcv)")
    num_classes: int = F(0, "number of classes; 0 = infer from the data", range="[0, inf)")
    holdout: float = F(0.0, "fraction of the training split held out (stratified, fixed) for model selection: "
                            "training uses the rest, evaluate.split=holdout evaluates on it; the test split is "
                            "never used for choices (digits and folder backends)", range="[0, 1)")
    resolution: int = F(224, "training/eval crop size in pixels", range="[1, inf)")
    val_crop_ratio: float = F(0.875, "eval: resize to resolution/ratio, then center-crop resolution", range="(0, 1]")
    rrc_scale: list[float] = F([0.08, 1.0], "train: RandomResizedCrop area range", range="(0, 1]", length=2)
    flip: bool = F(True, "train: random horizontal flip")
    workers: int = F(4, "per rank: loader worker processes (folder) or decoding threads (ffcv, dali)",
                     range="[0, inf)")
    mean: list[float] = F([0.485, 0.456, 0.406], "per-channel mean, applied inside the model wrapper",
                          range="[0, 1]", length=3)
    std: list[float] = F([0.229, 0.224, 0.225], "per-channel std, applied inside the model wrapper",
                         range="(0, inf)", length=3)
    ffcv_order: str = F("sharded", "ffcv: sharded (the seeded, sharded order every backend uses) | quasi_random "
                        "(FFCV's page-aware order for a .beton larger than RAM, with ffcv_os_cache=false; one rank "
                        "only)", choices=("sharded", "quasi_random"))
    ffcv_os_cache: bool = F(True, "ffcv: read the .beton through the OS page cache (shared by the ranks of a node); "
                            "false = each process caches the pages it reads")
    ffcv_batches_ahead: int = F(3, "ffcv: batches decoded ahead of the consumer", range="[1, inf)")
    ffcv_max_resolution: int = F(256, "guardx data convert: longest side stored in the .beton (0 = keep the original)",
                                 range="[0, inf)")
    ffcv_jpeg_quality: int = F(90, "guardx data convert: JPEG quality of the re-encoded images", range="[1, 100]")
    ffcv_write_mode: str = F("jpg", "guardx data convert: jpg | raw (uint8 pixels: fastest decode, ~8x larger) | "
                             "proportion (JPEG with probability ffcv_compress_probability, else raw)",
                             choices=("jpg", "raw", "proportion"))
    ffcv_compress_probability: float = F(0.5, "guardx data convert, write_mode=proportion: share stored as JPEG",
                                         range="[0, 1]")
    dali_decode: str = F("auto", "dali: auto (mixed = nvJPEG on the GPU when the loader's device is CUDA, else cpu) "
                         "| mixed | cpu", choices=("auto", "mixed", "cpu"))
    dali_prefetch: int = F(2, "dali: prefetch queue depth (batches in flight)", range="[1, inf)")
    val_labels: str = F("", "labels file that makes data.val_dir a flat folder of images (ImageNet's val): lines "
                            "FILENAME SYNSET, FILENAME INDEX (0-based into the sorted train synsets), Kaggle's "
                            "LOC_val_solution.csv, or the devkit ground truth (needs val_label_map); empty = "
                            "val_dir is an ImageFolder")
    val_label_map: str = F("", "devkit ILSVRC2012_ID -> synset map for integer val labels: the devkit's "
                               "data/meta.mat (needs scipy) or a text file of 'ID SYNSET' lines (e.g. map_clsloc.txt)")
    class_names: str = F("", "synset -> display name file (LOC_synset_mapping.txt / words.txt lines "
                             "'n01440764 tench, Tinca tinca'); empty = the synset ids")

    def validate(self):
        _rrc("data", "rrc_scale", self.rrc_scale)
        if self.holdout and self.dataset == "imagefolder" and self.backend != "folder":
            raise ConfigError(f"data.holdout needs data.backend=folder (got {self.backend})")
        if self.val_label_map and not self.val_labels:
            raise ConfigError("data.val_label_map is set but data.val_labels is empty: set data.val_labels to the "
                              "ground-truth file it maps")


@dataclass
class ModelConfig:
    name: str = F("resnet18", "teacher architecture: resnet18 | resnet18_small | convnet")
    width: int = F(64, "base width (64 = the standard ResNet-18; 128 = the DC/MTT ConvNet)", range="[1, inf)")
    init: str = F("", "start the teacher from these weights (never downloaded): a local torchvision state_dict, "
                      "timm checkpoint or guardx model file, or torchvision:resnet18 (torchvision's ImageNet "
                      "weights in the torch hub cache); empty = random init")
    init_head: str = F("keep", "model.init's classifier: keep (its class count must match the data) | reset "
                               "(re-initialise the classifier for this data's classes)", choices=("keep", "reset"))

    def validate(self):
        from guardx.models import MODELS

        MODELS.get(self.name, where="model.name")


def _registry_fields(registry, *, owner: str) -> list[tuple[str, type, Any]]:
    """Config fields for every parameter a registry's entries declare (one field per config key; entries
    sharing a key must agree on its default and range). Adding an entry to the registry adds its keys here."""
    out = []
    for key, users in registry.all_params().items():
        for what in ("default", "range"):
            if len({repr(getattr(p, what)) for _, p in users}) > 1:
                raise TypeError(f"{owner}.{key} has different {what}s in {[e.name for e, _ in users]}")
        p = users[0][1]
        names = ", ".join(e.name for e, _ in users)
        out.append((key, p.type, F(p.default, f"{names}: {p.help}", range=p.range)))
    return out


class _ObjectiveMethods:
    def validate(self):
        from guardx.objectives import OBJECTIVES

        OBJECTIVES.get(self.name, where="objective.name")  # unknown name: ConfigError with did-you-mean
        check_fields("objective", self)  # ranges of every objective's keys (also when built outside Config)
        try:
            OBJECTIVES.build(self.name, **self.params())  # the objective validates its own values
        except ValueError as e:
            raise ConfigError(f"objective: {e}") from None

    def params(self) -> dict:
        """Keyword arguments for :func:`guardx.objectives.build_objective` (the chosen objective's only)."""
        from guardx.objectives import OBJECTIVES

        return {p.name: getattr(self, p.key) for p in OBJECTIVES.get(self.name).params.values()}


def _objective_section():
    from guardx.objectives import OBJECTIVES

    names = " | ".join(OBJECTIVES.names())
    fields = [("name", str, F("plain", f"training objective: {names} (adv = PGD-k adversarial training)"))]
    cls = dataclasses.make_dataclass("ObjectiveConfig", fields + _registry_fields(OBJECTIVES, owner="objective"),
                                     bases=(_ObjectiveMethods,))
    cls.__module__ = __name__  # picklable as guardx.config.ObjectiveConfig
    return cls


ObjectiveConfig = _objective_section()


@dataclass
class SqueezeConfig:
    epochs: int = F(50, "training epochs of the teacher on real data; 0 (with model.init) = the init weights are "
                        "the teacher (SRe2L's ImageNet-1K baseline)", range="[0, inf)")
    batch_size: int = F(32, "global batch size (split evenly over ranks)", range="[1, inf)")
    lr: float = F(0.025, "SGD learning rate", range="(0, inf)")
    momentum: float = F(0.9, "SGD momentum", range="[0, 1]")
    weight_decay: float = F(1e-4, "SGD weight decay", range="[0, inf)")
    schedule: str = F("cosine", "learning-rate schedule per step: cosine | constant", choices=("cosine", "constant"))
    grad_clip: float = F(0.0, "max gradient norm; 0 disables clipping", range="[0, inf)")
    keep_checkpoints: int = F(3, "epoch checkpoints kept on disk (the newest)", range="[1, inf)")
    ckpt_every_steps: int = F(0, "also checkpoint every N steps inside an epoch; 0 = epoch ends only", range="[0, inf)")
    max_steps: int = F(0, "stop after N optimiser steps in total (smoke runs); 0 = no limit", range="[0, inf)")
    bn_recalibrate_batches: int = F(0, "after training, re-estimate BatchNorm running statistics over N training "
                                       "batches (precise BN); 0 = keep the training-time averages (official)",
                                    range="[0, inf)")


@dataclass
class RecoverConfig:
    iterations: int = F(2000, "optimisation steps per synthetic batch", range="[1, inf)")
    batch_size: int = F(100, "synthetic images optimised together (one per class per ipc index)", range="[1, inf)")
    lr: float = F(0.25, "Adam learning rate (cosine-decayed)", range="(0, inf)")
    betas: list[float] = F([0.5, 0.9], "Adam betas", range="[0, 1)", length=2)
    r_bn: float = F(0.01, "weight of the BatchNorm-statistics loss", range="[0, inf)")
    first_bn_multiplier: float = F(10.0, "extra weight of the first BatchNorm layer's term", range="[0, inf)")
    jitter: int = F(32, "max random roll (pixels) applied each iteration", range="[0, inf)")
    rrc_scale: list[float] = F([0.08, 1.0], "RandomResizedCrop area range applied each iteration", range="(0, 1]",
                               length=2)
    crop_schedule: str = F("fixed", "fixed (rrc_scale throughout: SRe2L) | cda (CDA's curriculum from the cda.* "
                                    "section: the lower bound falls from cda.scale_start to cda.scale_end)",
                           choices=("fixed", "cda"))
    flip: bool = F(True, "random horizontal flip each iteration")
    ipc: int = F(50, "images per class", range="[1, inf)")
    classes: list[int] = F([], "class indices to synthesise; empty = all", range="[0, inf)")

    def validate(self):
        _rrc("recover", "rrc_scale", self.rrc_scale)
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"recover.classes has duplicates: {self.classes}")


@dataclass
class RelabelConfig:
    epochs: int = F(300, "epochs of soft labels to store (one random crop per image per epoch)", range="[1, inf)")
    batch_size: int = F(100, "teacher batch size while labelling", range="[1, inf)")
    mode: str = F("store", "store (crops + soft labels on disk) | online (teacher runs during train)",
                  choices=("store", "online"))
    topk: int = F(0, "keep the top-k teacher logits per crop (fp16 + int16 index); 0 = all classes", range="[0, inf)")
    rrc_scale: list[float] = F([0.08, 1.0], "RandomResizedCrop area range of the crops", range="(0, 1]", length=2)
    flip: bool = F(True, "random horizontal flip of the crops")

    def validate(self):
        _rrc("relabel", "rrc_scale", self.rrc_scale)


@dataclass
class TrainConfig:
    model: str = F("", "student architecture; empty = model.name")
    width: int = F(0, "student width; 0 = model.width", range="[0, inf)")
    epochs: int = F(300, "epochs on the distilled set (store mode reuses the stored epochs cyclically if longer)",
                    range="[1, inf)")
    batch_size: int = F(128, "global batch size", range="[1, inf)")
    optimizer: str = F("adamw", "adamw (SRe2L's student) | sgd (DC/MTT's evaluation: with momentum)",
                       choices=("adamw", "sgd"))
    lr: float = F(1e-3, "learning rate", range="(0, inf)")
    momentum: float = F(0.9, "sgd: momentum", range="[0, 1]")
    weight_decay: float = F(0.01, "weight decay", range="[0, inf)")
    schedule: str = F("cosine", "learning-rate schedule per step: cosine (SRe2L) | step (x0.1 at half the steps, "
                                "DC/MTT's evaluation) | constant", choices=("cosine", "step", "constant"))
    temperature: float = F(20.0, "KL temperature on teacher (or stored soft) and student logits", range="(0, inf)")
    augment: str = F("auto", "hard/soft-label sets: crops (random-resized crop + flip, relabel.rrc_scale/flip) | "
                             "dsa (DC/MTT's differentiable siamese augmentation, train.dsa_strategy) | none; "
                             "auto = crops. Teacher-labelled sets always replay relabel's crops",
                     choices=("auto", "crops", "dsa", "none"))
    dsa_strategy: str = F("color_crop_cutout_flip_scale_rotate", "train.augment=dsa: DSA's transforms (DC's default)")
    recipe: str = F("auto", "auto: where the distilled set's manifest carries its authors' student recipe (MTT, "
                            "TESLA, DC: optimiser, lr such as MTT's learned one, epochs, batch, augmentation, loss), "
                            "train with it; config: always the train.* values", choices=("auto", "config"))
    keep_checkpoints: int = F(2, "epoch checkpoints kept on disk", range="[1, inf)")

    def validate(self):
        from guardx.models import MODELS

        if self.model:
            MODELS.get(self.model, where="train.model")


@dataclass
class _EvaluateBase:
    attacks: list[str] = F(["pgd"], "attacks besides clean accuracy: pgd (pgd_steps steps) or pgd<N> (N steps), "
                                    "fgsm, mim, cw, square, autoattack (e.g. pgd100,square,autoattack,cw,mim); "
                                    "attack@radius (e.g. autoattack@1/255) runs it at that radius only")
    eps: list[float] = F([1 / 255], "L-inf radii in pixel units (accepts k/255); cw ignores them (unbounded L2)",
                         range="pixels")
    checkpoints: list[str] = F([], "model files to evaluate, PATH or LABEL=PATH; empty = the run's teacher and "
                                   "student")
    out_dir: str = F("", "results folder; empty = <run.out_dir>/evaluate")
    batch_size: int = F(256, "evaluation batch size per rank (also the block of samples that shares attack seeds)",
                        range="[1, inf)")
    max_samples: int = F(0, "evaluate the first N test samples only; 0 = the whole split", range="[0, inf)")
    split: str = F("test", "test (digits' test split, an ImageFolder's data.val_dir) | holdout (data.holdout of the "
                           "training split: for tuning, never the test split)", choices=("test", "holdout"))
    fold_bn: bool = F(True, "attack a copy of the model with each BatchNorm folded into the convolution before it "
                            "(the same function to rounding; on a CPU digits ResNet AutoAttack took 12 % less time)")

    def validate(self):
        from guardx.attacks import parse_attack

        if not self.eps:
            raise ConfigError("evaluate.eps is empty: give at least one radius (e.g. evaluate.eps=[1/255])")
        for spec in self.attacks:
            parse_attack(spec)
        if len(set(self.attacks)) != len(self.attacks):
            raise ConfigError(f"evaluate.attacks has duplicates: {self.attacks}")

    def attack_params(self, spec: str) -> dict:
        """The keyword arguments ``spec`` (e.g. ``pgd100``) runs with: its config keys, then its budget suffix."""
        from guardx.attacks import attack_info, parse_attack

        budget = parse_attack(spec)[1]
        return {**{p.name: getattr(self, p.key) for p in attack_info(spec).params.values()}, **budget}


def _evaluate_section():
    from guardx.attacks import ATTACKS

    cls = dataclasses.make_dataclass("EvaluateConfig", _registry_fields(ATTACKS, owner="evaluate"),
                                     bases=(_EvaluateBase,))
    cls.__module__ = __name__  # picklable as guardx.config.EvaluateConfig
    return cls


EvaluateConfig = _evaluate_section()


@dataclass
class DistributedConfig:
    backend: str = F("none", "none (one process) | ddp | deepspeed; ranks come from torchrun's environment",
                     choices=("none", "ddp", "deepspeed"))
    zero_stage: int = F(0, "deepspeed: ZeRO stage 0 | 1 (shard optimiser state) | 2 (+ gradients); 3 is refused "
                           "with the reason (GUARD's double backprop needs every layer's weights in the forward)",
                        choices=(0, 1, 2, 3))
    precision: str = F("fp32", "fp32 | bf16 | fp16: fp32 weights, forward under torch.autocast on every backend "
                                "(fp16 adds a gradient scaler; deepspeed: its torch_autocast mode)",
                       choices=("fp32", "bf16", "fp16"))
    grad_accum: int = F(1, "micro-batches per optimiser step; the global batch (squeeze/train.batch_size) is "
                           "split over ranks x grad_accum", range="[1, inf)")
    deepspeed_config: str = F("", "deepspeed: JSON file (e.g. launch/ds_zero2.json) for DeepSpeed's own knobs; "
                                  "batch, accumulation, clipping, stage and precision come from guardx "
                                  "(\"auto\" in the file); empty = generated")
    timeout_s: int = F(600, "collective timeout in seconds: a stalled rank makes the others exit with an "
                            "error after this long (a killed rank: at once)", range="[1, inf)")

    def validate(self):
        if self.deepspeed_config and self.backend != "deepspeed":
            raise ConfigError(f"distributed.deepspeed_config is set but distributed.backend={self.backend}: "
                              "set distributed.backend=deepspeed")


@dataclass
class MethodConfig:
    name: str = F("sre2l", "label of the method in the report (and its run folder)")
    distiller: str = F("sre2l", "the distiller that makes this method's set")
    objective: dict = F({}, "overrides of the `objective` section: the objective of the distiller's real-data "
                            "training (e.g. GUARD in the squeeze)")
    overrides: dict = F({}, "overrides of any other section for this method, e.g. {train: {lr: 0.01}}")
    baseline: str = F("", "the method this one is compared with; empty = pipeline.baseline")
    column: str = F("", "column of the paper-style table (methods as columns, attacks as rows), e.g. GUARD(DC); "
                        "empty = no such table")
    group: str = F("", "row group of the paper-style table, e.g. IPC 10")


@dataclass
class PipelineConfig:
    methods: list = F([{"name": "sre2l", "distiller": "sre2l", "objective": {"name": "plain"}}],
                      "methods compared: a list of {name, distiller, objective: {...}, overrides: {section: {...}}}")
    stages: list[str] = F([], "run only these stages of each method (in the method's order); empty = all of them "
                              "(the distiller's stages, then train and evaluate)")
    eval_teacher: bool = F(True, "also evaluate each teacher on the test split")
    baseline: str = F("", "the method every other is compared with (paired difference, 95% CI, verdict); "
                          "empty = the first method")
    share_stages: bool = F(True, "a stage another method already ran with the same settings (its fingerprint: e.g. "
                                 "SRe2L's and CDA's squeeze) is linked, not run again; its teacher is evaluated once")
    workers: int = F(1, "processes on this machine, each with (CPU cores / N) torch threads: each seed's stages up to "
                        "train (a seed per process), and each (seed, method) evaluation once its seed is trained; "
                        "single-process runs only. Small CPU models use extra threads poorly, extra processes fully",
                        range=(1, None))

    def __post_init__(self):
        self.methods = [m if isinstance(m, MethodConfig) else _build(MethodConfig, m, "pipeline.methods.")
                        for m in self.methods]
        for m in self.methods:
            _build(ObjectiveConfig, m.objective, f"pipeline.methods.{m.name}.objective.").validate()

    def validate(self):
        from guardx.distill import DISTILLERS
        from guardx.stages import STAGE_MODULES

        for s in self.stages:
            _one_of("pipeline", "stages", s, STAGE_MODULES)
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ConfigError(f"pipeline.methods names must be unique, got {names}")
        for key, value in [("pipeline.baseline", self.baseline)] + \
                [(f"pipeline.methods.{m.name}.baseline", m.baseline) for m in self.methods]:
            if value and value not in names:
                raise ConfigError(f"{key}={value!r} is not one of the methods {names}{did_you_mean(value, names)}")
        for m in self.methods:
            DISTILLERS.get(m.distiller, where=f"pipeline.methods.{m.name}.distiller")
            bad = [k for k in m.overrides if k in ("objective", "pipeline")]
            if bad:
                raise ConfigError(f"pipeline.methods.{m.name}.overrides: set {bad[0]} through the method's own "
                                  f"`objective` field" if bad[0] == "objective" else
                                  f"pipeline.methods.{m.name}.overrides cannot change the pipeline section")


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
    buffers: "BuffersConfig" = field(default_factory=lambda: BuffersConfig())
    mtt: "MTTConfig" = field(default_factory=lambda: MTTConfig())
    dc: "DCConfig" = field(default_factory=lambda: DCConfig())
    cda: "CDAConfig" = field(default_factory=lambda: CDAConfig())

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            check_fields(f.name, getattr(self, f.name))  # declared ranges, choices, lengths
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()  # names (registries) and relations between keys
        if self.squeeze.epochs == 0 and not self.model.init:
            raise ConfigError("squeeze.epochs=0 trains nothing: it needs model.init (pretrained weights that become "
                              "the teacher, e.g. model.init=torchvision:resnet18)")
        from guardx.attacks.plan import metric_names

        names = metric_names(self)
        twice = sorted({m for m in names if names.count(m) > 1})
        if twice:
            raise ConfigError(f"evaluate.attacks measures {twice[0]} twice (an attack@radius repeats one of "
                              f"evaluate.eps?): {self.evaluate.attacks}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: dict) -> "Config":
        """A validated copy with ``{section: {key: value}}`` applied on top (a pipeline method's settings)."""
        data = self.to_dict()
        for section, values in overrides.items():
            if section not in data:
                names = [f.name for f in dataclasses.fields(self)]
                raise ConfigError(f"unknown config section {section!r}{did_you_mean(section, names)}")
            if not isinstance(values, dict):
                raise ConfigError(f"overrides of section {section!r} must be a mapping, got {values!r}")
            data[section].update(values)
        return from_dict(data)

    def with_objective(self, overrides: dict) -> "Config":
        """A copy whose ``objective`` section has ``overrides`` applied."""
        return self.with_overrides({"objective": overrides})


# --------------------------------------------------------------------------- trajectory matching (MTT, TESLA)
# Defaults are the authors' code defaults (MTT buffer.py/distill.py, TESLA distill.py); per dataset/ipc
# settings live in configs/mtt/*.yaml with their sources.

@dataclass
class BuffersConfig:
    num_experts: int = F(100, "expert networks trained on real data (MTT: 100)", range="[1, inf)")
    epochs: int = F(50, "training epochs per expert; parameters are kept after each (MTT: 50)", range="[1, inf)")
    batch_size: int = F(256, "expert batch size (MTT: batch_train 256)", range="[1, inf)")
    lr: float = F(0.01, "expert SGD learning rate, constant (MTT: lr_teacher 0.01)", range="(0, inf)")
    momentum: float = F(0.0, "expert SGD momentum (MTT: 0)", range="[0, 1]")
    weight_decay: float = F(0.0, "expert SGD weight decay (MTT: l2 0)", range="[0, inf)")
    grad_clip: float = F(0.0, "max gradient norm of an expert step; 0 disables (GUARD exact may need it on fresh nets)",
                         range="[0, inf)")
    model: str = F("convnet", "expert architecture (MTT/TESLA: convnet); also the distillers' student network")
    width: int = F(128, "expert width (MTT's ConvNet: 128)", range="[1, inf)")
    depth: int = F(0, "expert depth; 0 = the model's default for the resolution (MTT: ConvNet = D3 at 32 px, "
                      "ConvNetD4 at 64 px, ConvNetD5 at 128 px)", range="[0, inf)")
    resolution: int = F(0, "image size the experts and the MTT/TESLA set use; 0 = data.resolution (MTT: 128 px "
                           "for ImageNet subsets, while SRe2L runs at 224)", range="[0, inf)")
    zca: bool = F(False, "ZCA-whiten the inputs instead of mean/std normalisation (MTT --zca; at most 64 px)")
    zca_eps: float = F(0.1, "ZCA regularisation added to the covariance eigenvalues (MTT: kornia eps 0.1)",
                       range="(0, inf)")
    dsa_strategy: str = F("color_crop_cutout_flip_scale_rotate", "DSA augmentation of every expert batch "
                          "(MTT's default strategy); none = no augmentation")

    def validate(self):
        from guardx.models import MODELS

        MODELS.get(self.model, where="buffers.model")


@dataclass
class MTTConfig:
    tesla: bool = F(False, "TESLA: constant-memory gradient (mtt.tesla_grad) and soft labels (mtt.labels=auto "
                           "-> assign); writes <run>/tesla instead of <run>/mtt")
    ipc: int = F(10, "synthetic images per class", range="[1, inf)")
    iterations: int = F(5000, "distillation iterations (MTT: Iteration 5000)", range="[1, inf)")
    syn_steps: int = F(20, "N: student SGD steps on synthetic data per iteration (MTT: syn_steps)", range="[1, inf)")
    expert_epochs: int = F(3, "M: the student is matched to the expert M epochs after its start (MTT: expert_epochs)",
                           range="[1, inf)")
    max_start_epoch: int = F(25, "start epochs are drawn uniformly from [0, max_start_epoch) (MTT: max_start_epoch, "
                                 "np.random.randint(0, T+))", range="[1, inf)")
    lr_img: float = F(1000.0, "SGD learning rate of the synthetic images, momentum 0.5 (MTT: lr_img)", range="(0, inf)")
    lr_lr: float = F(1e-5, "SGD learning rate of the learnable synthetic step size, momentum 0.5 (MTT: lr_lr)",
                     range="[0, inf)")
    lr_teacher: float = F(0.01, "initial synthetic step size (MTT: lr_teacher)", range="(0, inf)")
    batch_syn: int = F(0, "synthetic images per student step; 0 = all of them (MTT: batch_syn)", range="[0, inf)")
    init: str = F("real", "synthetic image initialisation: real (random real images of the class) | noise "
                          "(MTT: pix_init)", choices=("real", "noise"))
    dsa_strategy: str = F("color_crop_cutout_flip_scale_rotate", "DSA augmentation of each student step's batch; "
                                                                  "none = off")
    labels: str = F("auto", "auto (hard for MTT, assign for TESLA) | hard | assign (TESLA: softmax of the sampled "
                            "expert's target-epoch logits on the current images, every iteration) | learn (logits "
                            "initialised from an expert, then learned with the images)",
                    choices=("auto", "hard", "assign", "learn"))
    lr_label: float = F(2.0, "labels=learn: SGD learning rate of the label logits, momentum 0.5", range="[0, inf)")
    label_expert: int = F(0, "labels=learn: the expert whose logits (at epoch max_start_epoch + expert_epochs) "
                             "initialise the labels", range="[0, inf)")
    tesla_grad: str = F("exact", "tesla: exact (reverse pass through the N steps, recomputing each step: the unrolled "
                                 "gradient with one step's activations) | first_order (TESLA's public code: drops "
                                 "the Hessian terms that couple steps)", choices=("exact", "first_order"))
    max_experts: int = F(0, "use only the first N experts of the buffers; 0 = all", range="[0, inf)")
    buffers_dir: str = F("", "expert buffers to match; empty = <run.out_dir>/buffers")
    ckpt_every: int = F(100, "checkpoint the synthetic set every N iterations (and at the end)", range="[1, inf)")
    keep_checkpoints: int = F(2, "checkpoints kept on disk (the newest)", range="[1, inf)")

    @property
    def label_mode(self) -> str:
        if self.labels == "auto":
            return "assign" if self.tesla else "hard"
        return self.labels


# --------------------------------------------------------------------------- DC and CDA

@dataclass
class DCConfig:
    ipc: int = F(10, "synthetic images per class", range="[1, inf)")
    iterations: int = F(1000, "outer iterations, each from a fresh network theta0 ~ p(theta0) (DC's Iteration, "
                               "Algorithm 1's K)", range="[1, inf)")
    outer_loops: int = F(0, "synthetic-set updates per iteration (DC's outer_loop, Algorithm 1's T); 0 = DC's "
                            "value for the ipc (1: 1, 10: 10, 20: 20, 30: 30, 40: 40, 50: 50)", range="[0, inf)")
    inner_loops: int = F(0, "epochs of network training on the synthetic set between two synthetic updates "
                            "(DC's inner_loop); 0 = DC's value for the ipc (1: 1, 10: 50, 20: 25, 30: 20, 40: 15, 50: 10)",
                         range="[0, inf)")
    lr_img: float = F(0.1, "SGD learning rate of the synthetic images (normalised space)", range="(0, inf)")
    momentum_img: float = F(0.5, "SGD momentum of the synthetic images", range="[0, 1]")
    lr_net: float = F(0.01, "SGD learning rate of the network trained on the synthetic set (no momentum)",
                      range="(0, inf)")
    batch_real: int = F(256, "real images per class per synthetic update", range="[1, inf)")
    batch_train: int = F(256, "batch size of the network training on the synthetic set", range="[1, inf)")
    init: str = F("real", "synthetic images start as random real images of their class (real) or N(0, 1) "
                          "noise in the normalised space (noise)", choices=("real", "noise"))
    dsa: bool = F(False, "differentiable siamese augmentation (DSA) of the real and synthetic batches "
                         "(the same transform for both) and of the network's training batches")
    dsa_strategy: str = F("color_crop_cutout_flip_scale_rotate", "DSA families, one drawn per batch")
    model: str = F("convnet", "network whose gradients are matched (DC/MTT ConvNet)")
    width: int = F(128, "network width", range="[1, inf)")
    depth: int = F(0, "ConvNet depth; 0 = by resolution (3 at 32 px, 4 at 64, 5 at 128)", range="[0, inf)")
    batched: bool = F(True, "compute every class's synthetic-image gradient in one vectorised call "
                            "(torch.func.vmap); false = one class at a time (same maths)")
    ckpt_every: int = F(10, "checkpoint every N iterations (and at the end); a rerun resumes from the newest",
                        range="[1, inf)")

    def validate(self):
        from guardx.data.dsa import DSA
        from guardx.distill.dc import DC_LOOPS
        from guardx.models import MODELS

        if (not self.outer_loops or not self.inner_loops) and self.ipc not in DC_LOOPS:
            raise ConfigError(f"dc.ipc={self.ipc} has no DC loop counts (DC defines them for ipc {sorted(DC_LOOPS)}): "
                              "set dc.outer_loops and dc.inner_loops")
        try:
            DSA(self.dsa_strategy)
        except ValueError as e:
            raise ConfigError(f"dc.dsa_strategy: {e}") from None
        MODELS.get(self.model, where="dc.model")


@dataclass
class CDAConfig:
    schedule: str = F("cosine", "how the lower bound of recover's random-resized-crop scale falls from "
                                "scale_start to scale_end: step | linear | cosine (CDA's easy2hard_mode)",
                      choices=("step", "linear", "cosine"))
    milestone: float = F(1.0, "fraction of the recover iterations over which it falls (then scale_end); "
                              "0 = no curriculum (scale_end throughout: SRe2L's crop)", range="[0, 1]")
    scale_start: float = F(1.0, "lower crop-scale bound at iteration 0 (1.0 = whole image)", range="(0, 1]")
    scale_end: float = F(0.08, "lower crop-scale bound from the milestone on", range="(0, 1]")
    scale_max: float = F(1.0, "upper crop-scale bound throughout", range="(0, 1]")

    def validate(self):
        if not self.scale_end <= self.scale_start <= self.scale_max:
            raise ConfigError("cda: need scale_end <= scale_start <= scale_max, got "
                              f"{self.scale_end}, {self.scale_start}, {self.scale_max}")


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
        item = (typing.get_args(want) or (None,))[0]
        if item is None:
            return [_parse_number(v, float) if isinstance(v, str) and "/" in v else v for v in value]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
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


def _allowed(f, default) -> str:
    """The reference's "allowed" cell: the declared range (per element for lists) and length."""
    meta, parts = f.metadata, []
    if meta.get("length") is not None:
        parts.append(f"{meta['length']} values")
    if meta.get("range") is not None:
        parts.append(("each in " if isinstance(default, list) else "") + str(meta["range"]))
    return ", ".join(parts)


def reference_markdown() -> str:
    """The config reference (every section, key, default, allowed values and meaning) as markdown tables."""
    out = []
    for sec in dataclasses.fields(Config):
        cls = sec.type if isinstance(sec.type, type) else typing.get_type_hints(Config)[sec.name]
        out.append(f"### `{sec.name}`\n\n| key | default | allowed | meaning |\n|---|---|---|---|")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = json.dumps(default) if not isinstance(default, float) else f"{default:g}"
            meaning = f.metadata.get("help", "").replace("|", "\\|")  # a bare | would split the cell
            allowed = _allowed(f, default)
            out.append(f"| `{f.name}` | `{shown}` | {f'`{allowed}`' if allowed else ''} | {meaning} |")
        out.append("")
    return "\n".join(out)
