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


def stage_module(name: str):
    """The module that runs stage ``name`` (imported on first use)."""
    from guardx.errors import ConfigError, did_you_mean

    if name not in STAGE_MODULES:
        raise ConfigError(f"unknown stage {name!r}{did_you_mean(name, STAGE_MODULES)}; known: {', '.join(STAGES)}")
    return importlib.import_module(STAGE_MODULES[name])
