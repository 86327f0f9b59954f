"""Child processes for tests/test_faults.py: ``guardx <stage> ...`` run by forking a warm server.

A fork server (``multiprocessing`` "forkserver" context) imports torch and guardx once; every run is a
fresh fork of it that calls :func:`guardx.cli.main` — the code path of the ``guardx`` command — so a
test can SIGKILL it at any moment for milliseconds of start-up instead of seconds. The server runs
torch single-threaded (it never computes in parallel, so forks are safe) and holds the digits data.

``inject`` arranges a moment instead of leaving it to chance: ``("kill_in_write", n)`` SIGKILLs the
child half-way through its n-th atomic file write (a torch.save or a PNG), leaving a temporary;
``("wait_for", path)`` makes squeeze wait, with its folder locked, until ``path`` exists.

(Each fork also re-imports the parent's main module, pytest, as ``__mp_main__``: preloading pytest
keeps that to microseconds.)
"""
from __future__ import annotations

import os
import signal
import sys
import threading

import pytest  # noqa: F401  (see the docstring)
import torch

torch.set_num_threads(1)  # before anything runs: forked children then inherit no OpenMP thread pool

import guardx.cli  # noqa: E402,F401  (the preload: everything a stage needs)
import guardx.evaluate  # noqa: E402,F401
import guardx.recover  # noqa: E402,F401
import guardx.relabel  # noqa: E402,F401
import guardx.squeeze  # noqa: E402,F401
import guardx.train  # noqa: E402,F401
from guardx.data.digits import digits_tensors  # noqa: E402
from tqdm import tqdm  # noqa: E402

LOADED_BY = os.getpid()  # the fork server's pid: a fork that finds another pid here inherited this module
digits_tensors("train"), digits_tensors("test")  # cached in the server, inherited by every fork
# tqdm guards its bars with a multiprocessing lock (a semaphore): a fork killed while holding one shared with
# the server would block every later fork, and one of its own leaks when it is killed; a thread lock does
tqdm.set_lock(threading.RLock())


def _kill_in_write(n: int) -> None:
    """SIGKILL this process half-way through its n-th atomic write (the temporary holds half the bytes)."""
    import guardx.utils.io as io

    real = io.atomic_path
    count = [0]

    from contextlib import contextmanager

    @contextmanager
    def atomic_path(path):
        with real(path) as tmp:
            yield tmp
            count[0] += 1
            if count[0] == n and tmp.exists():
                data = tmp.read_bytes()
                tmp.write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)

    io.atomic_path = atomic_path
    for module in list(sys.modules.values()):  # modules that imported the name directly
        if getattr(module, "atomic_path", None) is real and module is not io:
            module.atomic_path = atomic_path
    # save_torch / write_text look the name up in their own module at call time: covered by io.atomic_path


def _wait_for(path: str) -> None:
    import time

    import guardx.squeeze as stage

    real = stage.fit

    def fit(**kw):
        while not os.path.exists(path):
            time.sleep(0.01)
        return real(**kw)

    stage.fit = fit


def preloaded(queue) -> None:
    """Probe target: tells whether this fork inherited the preloaded modules."""
    queue.put(LOADED_BY != os.getpid())


def run_cli(argv: list[str], log: str, inject: tuple | None = None) -> None:
    """Target of a forked child: ``guardx <argv>`` with stdout and stderr appended to ``log``; exits with
    the command's exit code."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    code = 1
    try:
        if inject and inject[0] == "kill_in_write":
            _kill_in_write(inject[1])
        elif inject and inject[0] == "wait_for":
            _wait_for(inject[1])
        code = guardx.cli.main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
