"""Crash-safe file output, through one path.

Every artifact is written to a temporary name in the same folder (``.<name>.<random>.tmp``) and renamed
into place, so a reader (or a resumed run) sees either nothing or the complete file. A write that fails
(full disk, read-only or vanished folder, quota) is one line naming the file, the reason and the free
space — ``cannot write runs/x/squeeze/ckpt/step_000000004.pt: no space left on device, 0 MiB free`` —
and leaves no temporary behind. A process killed mid-write (kill -9, power loss) can leave one; the
stage that owns the folder removes them when it starts (:func:`remove_temp_files`, under the folder's
lock, so no live writer is affected).
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from guardx.errors import GuardxError

_UMASK = os.umask(0)
os.umask(_UMASK)

TEMP_GLOB = ".*.tmp"  # what atomic_path's temporaries look like (and nothing guardx writes for good does)


class WriteError(GuardxError):
    """A file could not be written (the message names it, the reason and the free space)."""


def free_mib(path: str | Path) -> int | None:
    """MiB free on the filesystem holding ``path`` (its nearest existing ancestor), or None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free >> 20
    except OSError:
        return None


def _reason(e: BaseException, free: int | None) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        return os.strerror(e.errno).lower()
    # torch.save reports a full disk as a RuntimeError without errno ("unexpected pos 704 vs 598")
    if free is not None and free < 1:
        return "no space left on device"
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def write_error(path: str | Path, e: BaseException) -> WriteError:
    """The one-line error for a failed write of ``path`` (free space measured now)."""
    free = free_mib(path)
    where = f", {free} MiB free" if free is not None else ""
    return WriteError(f"cannot write {path}: {_reason(e, free)}{where}")


def _translatable(e: BaseException) -> bool:
    return isinstance(e, (OSError, RuntimeError)) and not isinstance(e, GuardxError)


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an OSError/RuntimeError raised inside the block into one :class:`WriteError` line about ``path``."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not _translatable(e):
            raise
        raise write_error(path, e) from e


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, else delete it.

    Errors of the write (inside the block) and of the rename become one :class:`WriteError` line."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException as e:
        error = write_error(path, e) if _translatable(e) else None  # free space while the temporary still fills it
        tmp.unlink(missing_ok=True)
        if error is None:
            raise
        raise error from e


def remove_temp_files(folder: str | Path, *, recursive: bool = True) -> list[Path]:
    """Delete the temporaries of writes that were killed (``.*.tmp``) under ``folder``; returns them.

    Call it only while holding the folder's lock (:class:`guardx.utils.lock.FolderLock`): a temporary of
    a live writer would otherwise disappear under it."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = sorted(folder.rglob(TEMP_GLOB) if recursive else folder.glob(TEMP_GLOB))
    for p in found:
        if p.is_file():
            p.unlink(missing_ok=True)
    return found


def set_aside(path: str | Path, suffix: str = ".corrupt") -> Path:
    """Rename a file that cannot be used to ``<path><suffix>`` (``.corrupt.1``, ... if taken); returns the new name."""
    path = Path(path)
    target = path.with_name(path.name + suffix)
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{suffix}.{n}")
    with writing(target):
        os.replace(path, target)
    return target


def save_torch(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class ReadError(GuardxError):
    """A file exists but cannot be loaded (truncated, corrupt, or not a guardx file)."""


def load_torch(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a guardx artifact; ``weights_only=True`` so a checkpoint can never run code. A file that does
    not load is one :class:`ReadError` line (a missing one stays FileNotFoundError)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # torch's weights-only unpickler refused a class or function
            raise ReadError(f"cannot read {path}: it holds objects other than tensors and plain data "
                            "(refused: loading it could run code)") from None
        raise ReadError(f"cannot read {path}: not a PyTorch file, or corrupt") from None
    except Exception as e:  # noqa: BLE001  (truncated zip, bad magic, short read, ...)
        text = str(e).strip().splitlines()[0].split(". ")[0][:160] if str(e).strip() else ""
        raise ReadError(f"cannot read {path}: {'truncated or corrupt' if 'zip archive' in text else type(e).__name__}"
                        f" ({text})" if text else f"cannot read {path}: {type(e).__name__}") from None


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(obj: Any, path: str | Path) -> None:
    write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def is_no_space(e: BaseException) -> bool:
    """True for a full disk or quota (used by callers that want to add advice)."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
