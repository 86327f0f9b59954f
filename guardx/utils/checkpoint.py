"""Resumable stage state: numbered checkpoint files, written atomically by rank 0, newest ``keep`` kept."""
from __future__ import annotations

import re
from pathlib import Path

from guardx.utils.io import load_torch, save_torch

_NAME = re.compile(r"^step_(\d{9})\.pt$")


class Checkpointer:
    def __init__(self, folder: str | Path, *, keep: int = 3, ctx=None):
        self.folder = Path(folder)
        self.keep = max(int(keep), 1)
        self.ctx = ctx
        self.last_saved: Path | None = self.latest()

    def _all(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def latest(self) -> Path | None:
        found = self._all()
        return found[-1][1] if found else None

    def load(self) -> dict | None:
        """The newest checkpoint's contents (every rank reads the same file), or None on a fresh start."""
        path = self.latest()
        return None if path is None else load_torch(path)

    def save(self, state: dict, step: int) -> Path:
        path = self.folder / f"step_{step:09d}.pt"
        if self.ctx is None or self.ctx.is_main:
            save_torch(state, path)
            for _, old in self._all()[:-self.keep]:
                old.unlink(missing_ok=True)
        if self.ctx is not None:
            self.ctx.barrier()
        self.last_saved = path
        return path
