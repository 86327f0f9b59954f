"""The stages guardx runs, by name: ``guardx <stage>`` on the command line, ``pipeline.stages`` in a config.

Each stage is a module with ``run(cfg)``; this table is the one list of them (the CLI builds its
sub-commands from it without importing torch, the pipeline runs them by name, the config validates
names against it). A distiller's own stages are listed here and named by its registry entry.
"""
from __future__ import annotations

import importlib

STAGE_MODULES = {
    "squeeze": "guardx.squeeze",        # teacher on real data (SRe2L, CDA)
    "recover": "guardx.recover",        # images from the teacher's BN statistics (SRe2L, CDA)
    "relabel": "guardx.relabel",        # teacher soft labels on stored crops (SRe2L, CDA)
    "dc": "guardx.distill.dc",          # gradient matching (DC, GUARD(DC))
    "buffers": "guardx.distill.buffers",  # expert trajectories on real data (MTT, TESLA)
    "mtt": "guardx.distill.mtt",        # trajectory matching (mtt.tesla: TESLA)
    "train": "guardx.train",            # student on any distilled set
    "evaluate": "guardx.evaluate",      # clean and robust accuracy
}

STAGE_HELP = {
    "squeeze": "train the teacher on real data with the configured objective",
    "recover": "synthesise images from the teacher's BatchNorm statistics (SRe2L/CDA)",
    "relabel": "store the teacher's soft labels on random crops of the distilled images",
    "dc": "distil with DC's gradient matching (objective.*: GUARD(DC), the paper's Algorithm 1)",
    "buffers": "train the expert trajectories MTT and TESLA match (objective.*: GUARD(MTT))",
    "mtt": "distil with MTT (mtt.tesla=true: TESLA) from the expert buffers",
    "train": "train a student on the distilled set",
    "evaluate": "clean and adversarial accuracy of the teacher/student or given checkpoints",
}

STAGES = tuple(STAGE_MODULES)

# The config keys that determine each stage's result: its *fingerprint*, recorded in the stage folder
# (fingerprint.json), in every checkpoint and in every manifest, and compared when the stage resumes
# (guardx/stage_guard.py). They live here, beside the stage table, because they are a property of each
# stage — what it reads — which neither the config (it knows no stages) nor the run layout (it knows
# paths) can say. Left out on purpose: what changes only speed or presentation (run.progress,
# data.workers, checkpoint frequency and retention, relabel.batch_size), where files go (run.out_dir,
# evaluate.out_dir) and the world size and backend (distributed.* but grad_accum and precision):
# checkpoints are consolidated and resume on any number of ranks with any backend.
#   "section.*": every key of the section; "-section.key": except this one; "objective": the chosen
#   objective's name and parameters; "evaluate.attack_params": the chosen attacks' parameters.
# A stage's fingerprint also covers the stages it consumes (recover: squeeze's keys; train: its
# distiller's stages'), so changing a teacher setting stops the stages built on the old teacher too.
RESULT_KEYS = {
    "squeeze": ("run.seed", "data.dataset", "data.backend", "data.train_dir", "data.ffcv_train", "data.num_classes",
                "data.resolution", "data.rrc_scale", "data.flip", "data.mean", "data.std", "data.ffcv_order",
                "data.holdout", "model.*", "objective", "squeeze.*", "-squeeze.keep_checkpoints", "-squeeze.ckpt_every_steps",
                "distributed.grad_accum", "distributed.precision"),
    "recover": ("run.seed", "recover.*", "cda.*"),
    "relabel": ("run.seed", "relabel.*", "-relabel.batch_size"),
    "train": ("run.seed", "run.distiller", "model.name", "model.width", "train.*", "-train.keep_checkpoints",
              "relabel.rrc_scale", "relabel.flip", "distributed.grad_accum", "distributed.precision"),
    # evaluate resumes nothing: each model's result is cached under these settings plus the checkpoint file's
    # identity, and other settings simply evaluate again (guardx/evaluate.py)
    "evaluate": ("run.seed", "evaluate.attacks", "evaluate.eps", "evaluate.attack_params", "evaluate.batch_size",
                 "evaluate.max_samples", "evaluate.fold_bn", "evaluate.split", "data.dataset", "data.backend",
                 "data.val_dir", "data.ffcv_val", "data.val_crop_ratio", "data.val_labels", "data.val_label_map",
                 "data.holdout"),
    # the distillers beyond SRe2L: what they read of the real data, their objective, their own section
    "dc": ("run.seed", "data.dataset", "data.backend", "data.train_dir", "data.num_classes", "data.resolution",
           "data.mean", "data.std", "data.holdout", "objective", "dc.*", "-dc.ckpt_every", "-dc.batched"),
    "buffers": ("run.seed", "data.dataset", "data.backend", "data.train_dir", "data.num_classes", "data.resolution",
                "data.mean", "data.std", "data.holdout", "objective", "buffers.*"),
    "mtt": ("run.seed", "mtt.*", "-mtt.ckpt_every", "-mtt.keep_checkpoints"),
}


def upstream(cfg, stage: str) -> tuple[str, ...]:
    """The stages whose output ``stage`` consumes, for the run's distiller (evaluate: none, see above)."""
    from guardx.distill import DISTILLERS

    chain = tuple(DISTILLERS.get(cfg.run.distiller, where="run.distiller").stages)
    if stage in chain:
        return chain[:chain.index(stage)]
    return chain if stage == "train" else ()


def result_settings(cfg, stage: str) -> dict:
    """``{"section.key": value}`` for every key in ``RESULT_KEYS`` of ``stage`` and the stages it consumes."""
    import dataclasses

    from guardx.errors import ConfigError

    out: dict = {}
    for s in (*upstream(cfg, stage), stage):
        if s not in RESULT_KEYS:
            raise ConfigError(f"stage {s!r} declares no result keys: add it to guardx.stages.RESULT_KEYS")
        for key in RESULT_KEYS[s]:
            if key.startswith("-"):
                out.pop(key[1:], None)
            elif key == "objective":
                out["objective.name"] = cfg.objective.name
                out.update({f"objective.{k}": v for k, v in cfg.objective.params().items()})
            elif key == "evaluate.attack_params":
                out[key] = {spec: cfg.evaluate.attack_params(spec) for spec in cfg.evaluate.attacks}
            elif key.endswith(".*"):
                section = key[:-2]
                values = getattr(cfg, section)
                out.update({f"{section}.{f.name}": getattr(values, f.name) for f in dataclasses.fields(values)})
            else:
                section, name = key.split(".")
                out[key] = getattr(getattr(cfg, section), name)
    return out


def stage_module(name: str):
    """The module that runs stage ``name`` (imported on first use)."""
    from guardx.errors import ConfigError, did_you_mean

    if name not in STAGE_MODULES:
        raise ConfigError(f"unknown stage {name!r}{did_you_mean(name, STAGE_MODULES)}; known: {', '.join(STAGES)}")
    return importlib.import_module(STAGE_MODULES[name])
