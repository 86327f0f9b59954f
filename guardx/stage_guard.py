"""One run owns a stage folder, and a stage resumes only work done with its own settings.

Every stage (and every distiller's stage) runs inside ``with stage_guard(cfg, "<stage>") as guard:``:

1. **lock**: rank 0 takes an exclusive ``flock`` on ``<stage>/.lock`` (:class:`~guardx.utils.lock.FolderLock`);
   a second run on the same folder stops at once with one line naming the holder's pid and host. The
   ranks of one torchrun job share rank 0's lock (they learn the outcome through :meth:`DistContext.on_main`).
2. **temporaries**: the ``.*.tmp`` files of writes that were killed are removed (the lock guarantees
   no live writer owns them).
3. **fingerprint**: the settings that determine the stage's result (:func:`guardx.stages.result_settings`)
   are compared with the ones recorded in ``<stage>/fingerprint.json``. If they differ,
   ``run.on_config_change`` decides: ``error`` (one line listing the keys), ``restart`` (the stage's
   work is deleted and it starts over) or ``resume`` (it continues with the new settings; the change is
   appended to ``fingerprint.json``'s history).

The guard then stamps what the stage writes and checks what it reads back:

* ``guard.stamp()`` goes into every checkpoint (:class:`~guardx.utils.checkpoint.Checkpointer` does it
  when given the guard) and every manifest / final artifact;
* ``guard.accepts(recorded, what)`` applies the same policy to a stamp read from a file;
* ``guard.finished(path)`` is the "is this stage done?" test: the final artifact exists, loads, holds
  only finite numbers and carries an accepted stamp. A file that fails to load is set aside as
  ``<file>.corrupt`` with a one-line warning, and the stage runs again.

Distillers added later use the same three lines as the SRe2L stages::

    with stage_guard(cfg, "dc") as guard:
        if guard.finished(paths.manifest("dc")):
            return ...
        ckpt = Checkpointer(paths.ckpt_dir("dc"), keep=3, ctx=guard.ctx, guard=guard)
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from guardx.errors import ConfigError, GuardxError, warn
from guardx.utils.io import read_json, remove_temp_files, set_aside, write_json
from guardx.utils.lock import LOCK_NAME, FolderLock

FINGERPRINT = "fingerprint.json"
_SHOWN_KEYS = 6  # differing keys named in the one-line error


def digest(settings: dict) -> str:
    """A short hash of a settings dict (key order does not matter)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _normalised(settings: dict) -> dict:
    """What the settings look like after a JSON round trip (tuples become lists), for comparisons."""
    return json.loads(json.dumps(settings, default=str))


def differences(recorded: dict, current: dict) -> list[str]:
    """``["squeeze.lr: 0.1 -> 0.01", ...]`` for every key whose value differs (or exists on one side only)."""
    out = []
    for key in [*current, *(k for k in recorded if k not in current)]:
        old, new = recorded.get(key, "<unset>"), current.get(key, "<unset>")
        if old != new:
            out.append(f"{key}: {_short(old)} -> {_short(new)}")
    return out


def _short(value) -> str:
    if value == "<unset>":
        return value
    text = repr(value) if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class StageGuard:
    """What :func:`stage_guard` yields; see the module docstring."""

    def __init__(self, stage: str, folder: Path, settings: dict, policy: str, ctx):
        self.stage, self.folder, self.policy, self.ctx = stage, Path(folder), policy, ctx
        self.settings = _normalised(settings)
        self.digest = digest(self.settings)
        self._resumed: set = set()  # recorded digests already reported under run.on_config_change=resume

    def stamp(self) -> dict:
        """What checkpoints and manifests record: ``{"digest": ..., "settings": {...}}``."""
        return {"stage": self.stage, "digest": self.digest, "settings": self.settings}

    def mismatch_message(self, recorded: dict, what) -> str:
        diff = differences(recorded, self.settings)
        more = f" and {len(diff) - _SHOWN_KEYS} more" if len(diff) > _SHOWN_KEYS else ""
        return (f"{self.stage}: {what} was made with other settings ({'; '.join(diff[:_SHOWN_KEYS])}{more}); "
                "use another run.out_dir, or set run.on_config_change=restart to start the stage over "
                "(=resume continues it with the new settings)")

    def accepts(self, recorded: dict | None, what) -> bool:
        """Whether work stamped ``recorded`` may be reused: True if it matches (or carries no stamp, from
        before fingerprints) or the policy is ``resume``; False under ``restart`` (the caller discards the
        work); a :class:`ConfigError` under ``error``. Call on rank 0 (inside ``ctx.on_main``)."""
        if not isinstance(recorded, dict) or "settings" not in recorded:
            return True
        if recorded.get("digest") == self.digest or _normalised(recorded["settings"]) == self.settings:
            return True
        if self.policy == "error":
            raise ConfigError(self.mismatch_message(recorded["settings"], what))
        if self.policy == "restart":
            return False
        if recorded.get("digest") not in self._resumed:  # once per earlier configuration, not once per file
            self._resumed.add(recorded.get("digest"))
            warn(f"{self.stage}: continuing {what} with changed settings (run.on_config_change=resume): "
                 + "; ".join(differences(recorded["settings"], self.settings)[:_SHOWN_KEYS]))
        return True

    def finished(self, path: str | Path) -> bool:
        """True when ``path`` (the stage's final artifact: a ``.pt`` model file or a ``.json`` manifest)
        exists, loads, is finite and carries an accepted stamp. A file that does not load is set aside as
        ``.corrupt`` (one-line warning); under ``restart`` a file with another stamp is deleted. Every
        rank gets rank 0's answer."""
        path = Path(path)
        return self.ctx.on_main(lambda: self._finished(path))

    def _finished(self, path: Path) -> bool:
        if not path.is_file():
            return False
        try:
            recorded = _read_stamp(path)
        except GuardxError as e:
            aside = set_aside(path)
            warn(f"{self.stage}: {e}; set aside as {aside.name}, redoing the stage")
            return False
        if self.accepts(recorded, path):
            return True
        path.unlink()
        return False


def _read_stamp(path: Path) -> dict | None:
    """The fingerprint stamp of a final artifact after checking that it loads and is finite."""
    from guardx.utils.checkpoint import all_finite
    from guardx.utils.io import load_torch

    if path.suffix == ".json":
        try:
            blob = read_json(path)
        except (OSError, ValueError) as e:
            raise GuardxError(f"cannot read {path}: {type(e).__name__}: {str(e)[:200]}") from None
    else:
        blob = load_torch(path)  # a one-line ReadError for a truncated or foreign file
        if not all_finite(blob):
            raise GuardxError(f"{path} holds non-finite values")
    if not isinstance(blob, dict):
        raise GuardxError(f"{path} is not a guardx file (no mapping at its top level)")
    return blob.get("fingerprint")


@contextmanager
def own_folder(folder: str | Path, ctx, *, recursive: bool = True, also=()) -> Iterator[list[Path]]:
    """Hold ``folder``'s lock for the block (rank 0; the other ranks wait for its outcome) after removing
    the temporaries of killed writes in it (``recursive``: in its sub-folders too; ``also``: in these
    sub-folders, recursively). Yields the removed temporaries. Used by :func:`stage_guard`, by the
    pipeline (its output folder) and by evaluate (a results folder that may hold other things)."""
    folder = Path(folder)
    lock = FolderLock(folder)

    def take() -> list[str]:
        lock.acquire()
        try:
            removed = remove_temp_files(folder, recursive=recursive)
            for sub in also:
                removed += remove_temp_files(sub)
            return [str(p) for p in removed]
        except BaseException:
            lock.release()
            raise

    try:
        removed = ctx.on_main(take)
        yield [Path(p) for p in removed]
    finally:
        lock.release()


@contextmanager
def stage_guard(cfg, stage: str, *, ctx=None, folder: str | Path | None = None) -> Iterator[StageGuard]:
    """Own ``stage``'s folder for the block and check its fingerprint (see the module docstring).

    ``folder`` defaults to the stage's folder in the run layout; ``ctx`` to :func:`init_distributed`'s."""
    from guardx.distributed import init_distributed
    from guardx.paths import layout
    from guardx.stages import result_settings

    ctx = ctx or init_distributed(cfg)
    folder = Path(folder) if folder is not None else layout(cfg).stage(stage)
    guard = StageGuard(stage, folder, result_settings(cfg, stage), cfg.run.on_config_change, ctx)
    with own_folder(folder, ctx):
        ctx.on_main(lambda: _check_folder(guard))
        yield guard


_NOT_WORK = {LOCK_NAME, FINGERPRINT, "config.yaml"}


def _holds_work(folder: Path) -> bool:
    """True when ``folder`` holds anything a stage made (beyond its lock, fingerprint and config copy)."""
    return any(p.is_file() and p.name not in _NOT_WORK for p in folder.rglob("*"))


def _check_folder(guard: StageGuard) -> None:
    """Compare ``fingerprint.json`` with the guard's settings and apply the policy (rank 0, lock held)."""
    record_path = guard.folder / FINGERPRINT
    record = None
    if record_path.is_file():
        try:
            record = read_json(record_path)
        except (OSError, ValueError):
            aside = set_aside(record_path)
            warn(f"{guard.stage}: {record_path} is unreadable; set aside as {aside.name}")
    if record is not None and record.get("digest") != guard.digest and not _holds_work(guard.folder):
        record = None  # nothing to resume (e.g. the last attempt stopped on a bad path): just take the new settings
    if record is not None and record.get("digest") != guard.digest:
        what = f"the work in {guard.folder}"
        if not guard.accepts(record, what):  # restart: the stage's work goes, the lock stays
            for p in guard.folder.iterdir():
                if p.name != LOCK_NAME:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            warn(f"{guard.stage}: settings changed ({'; '.join(differences(record['settings'], guard.settings)[:3])}"
                 f"); run.on_config_change=restart: deleted the stage's previous work in {guard.folder}")
            record = None
        else:  # resume: keep the work, note the change
            history = list(record.get("history", [])) + [{
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "from": record.get("digest"),
                "changed": differences(record["settings"], guard.settings)}]
            record = {**guard.stamp(), "history": history}
            write_json(record, record_path)
            return
    if record is None:
        write_json({**guard.stamp(), "history": []}, record_path)
