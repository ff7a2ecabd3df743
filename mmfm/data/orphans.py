"""Child processes that die with the process that started them.

A loader worker (or a `pipe:` command) outlives a trainer killed with SIGKILL unless it is
told otherwise: on Linux the kernel sends it SIGKILL when its parent exits
(`prctl(PR_SET_PDEATHSIG)`), and a thread that watches `os.getppid()` covers the rest. A
worker gets SIGTERM, which it turns into `SystemExit` so that its open `pipe:` commands are
ended too. This module imports nothing heavy, so a worker is guarded before it spends seconds
importing torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import pickle
import signal
import threading
import time

PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Ask Linux to send `signum` to this process when its parent exits (a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(1)  # unwinds the readers, whose `finally` ends their pipe commands


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5.0)
    os._exit(1)


def run(parent: int, target: str, payload: bytes, *more) -> None:
    """Call `module:function` with the pickled arguments (this process's own, from its
    parent) and then `more`, as a process that exits when `parent` does."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # it died before the guard was in place
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), daemon=True).start()
    module, name = target.split(":")
    getattr(importlib.import_module(module), name)(*pickle.loads(payload), *more)
