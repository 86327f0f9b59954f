"""An exclusive lock on a run folder, so one run owns it: ``fcntl.flock`` on ``<folder>/.lock``.

The kernel releases the lock when its holder exits, however it exits (kill -9 included), so a stale lock
never blocks a rerun. The holder writes ``pid host`` into the file for the message a second run gets:
``runs/x/squeeze is in use by another guardx run (pid 4242 on node017); wait for it to finish or stop it``.
On NFS, Linux maps flock to POSIX byte-range locks, which the server arbitrates across nodes.

Under torchrun only rank 0 takes a folder's lock (ranks of one job must not lock each other out); it
hands the outcome to the other ranks (see :func:`guardx.stage_guard.own_folder`).
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from guardx.errors import GuardxError
from guardx.utils.io import writing

LOCK_NAME = ".lock"


class FolderInUseError(GuardxError):
    """Another process holds the folder's lock."""


class FolderLock:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        """Take the lock now or raise :class:`FolderInUseError` naming the holder (never waits)."""
        if self._fd is not None:
            return self
        with writing(self.path):
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderInUseError(f"{self.folder} is in use by another guardx run ({holder}); wait for it to "
                                   "finish or stop it, or give this run another run.out_dir") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            with writing(self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except BaseException:
            os.close(fd)  # closing the descriptor releases the lock
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # no stale holder in the file once released
            except OSError:
                pass
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace").split()
    except OSError:
        text = []
    if len(text) >= 2:
        return f"pid {text[0]} on {text[1]}"
    return "holder unknown: it has not written its pid yet"
