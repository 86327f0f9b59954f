"""The run layout: every artifact path of every stage, in one place. No stage imports another stage;
each asks this module where its inputs and outputs live.

    <run.out_dir>/
      squeeze/  ckpt/step_*.pt  teacher.pt  metrics.json  config.yaml
      recover/  images/<class>/<class>_<ipc>.png  manifest.json        (SRe2L and CDA's distilled set)
      relabel/  epoch_XXXX.pt  manifest.json
      <distiller stage>/  images/...  manifest.json  [soft_labels.pt]   (DC, MTT, TESLA: their own folder)
      train/    ckpt/step_*.pt  student.pt  metrics.json  config.yaml
      evaluate/ <label>.json  results.{md,json,csv}                     (or evaluate.out_dir)

The distilled set a student trains on is ``images/`` + ``manifest.json`` in the folder of the run's
distiller's output stage (``run.distiller``; the registry entry names the stage).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DISTILLED_IMAGES = "images"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class RunLayout:
    root: Path
    distilled_stage: str = "recover"   # the stage folder holding the distilled set
    evaluate_out: str = ""            # evaluate.out_dir, if set

    # ------------------------------------------------------------------ any stage
    def stage(self, name: str) -> Path:
        return self.root / name

    def ckpt_dir(self, stage: str) -> Path:
        return self.stage(stage) / "ckpt"

    def config_file(self, stage: str) -> Path:
        return self.stage(stage) / "config.yaml"

    def metrics(self, stage: str) -> Path:
        return self.stage(stage) / "metrics.json"

    def manifest(self, stage: str) -> Path:
        return self.stage(stage) / MANIFEST

    # ------------------------------------------------------------------ artifacts
    @property
    def teacher(self) -> Path:
        return self.stage("squeeze") / "teacher.pt"

    @property
    def recover_images(self) -> Path:
        return self.stage("recover") / DISTILLED_IMAGES

    def relabel_epoch(self, epoch: int) -> Path:
        return self.stage("relabel") / f"epoch_{epoch:04d}.pt"

    @property
    def distilled(self) -> Path:
        """The folder of the distilled set: ``images/`` + ``manifest.json`` (+ ``soft_labels.pt``)."""
        return self.stage(self.distilled_stage)

    @property
    def distilled_images(self) -> Path:
        return self.distilled / DISTILLED_IMAGES

    @property
    def distilled_manifest(self) -> Path:
        return self.distilled / MANIFEST

    @property
    def student(self) -> Path:
        return self.stage("train") / "student.pt"

    @property
    def evaluate(self) -> Path:
        return Path(self.evaluate_out) if self.evaluate_out else self.stage("evaluate")


def layout(cfg) -> RunLayout:
    """The layout of ``cfg``'s run (``run.out_dir``, its distiller, ``evaluate.out_dir``)."""
    from guardx.distill import DISTILLERS

    output = DISTILLERS.get(cfg.run.distiller, where="run.distiller").output
    return RunLayout(Path(cfg.run.out_dir), distilled_stage=output, evaluate_out=cfg.evaluate.out_dir)
