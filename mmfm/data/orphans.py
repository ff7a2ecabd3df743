"""Child processes that die with the process that started them.

A loader worker (or a `pipe:` command) outlives a trainer killed with SIGKILL unless it is
told otherwise: on Linux the kernel sends it SIGTERM when its parent exits
(`prctl(PR_SET_PDEATHSIG)`), and a thread that watches `os.getppid()` covers the rest. A
worker turns SIGTERM into `SystemExit(0)`, so that its open `pipe:` commands are ended too and
it exits cleanly when a scheduler sends SIGTERM to every process (the loader finds a worker
that died otherwise at its next wait for it, loader.py; torch's SIGCHLD handler, which would
raise in whatever the trainer is doing, is not kept).

`GUARDED_SPAWN` is a spawn context whose processes unpickle their target and arguments only
after the guard is in place: a DataLoader worker's arguments import torch (seconds), and a
trainer killed in those seconds must not leave the worker behind. This module imports nothing
heavy.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal
import sys
import threading
import time
from multiprocessing import context, reduction

PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Ask Linux to send `signum` to this process when its parent exits (a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)


_SHELL_THAT_DIES_WITH_PARENT = """
import ctypes, os, sys
ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
if os.getppid() != int(sys.argv[1]):
    os._exit(1)  # the parent died before the death signal was set
os.execv("/bin/sh", ["/bin/sh", "-c", sys.argv[2]])
"""


def shell_that_dies_with_parent(command: str) -> list[str]:
    """The argv that runs `command` with `/bin/sh -c`, killed (SIGKILL) when this process
    exits (a no-op for the death signal where Linux's prctl is missing).

    A small Python sets the death signal and then execs the shell; not `preexec_fn`, which
    runs Python in a child forked from this process: with many threads that child can hang
    before its exec (it frees the other threads' thread-locals, and a PyAV reformatter's
    `sws_freeContext` waits forever on a condition of slice threads the child does not have).
    """
    return [
        sys.executable,
        "-I",
        "-S",
        "-c",
        _SHELL_THAT_DIES_WITH_PARENT,
        str(os.getpid()),
        command,
    ]


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(0)  # unwinds the readers, whose `finally` ends their pipe commands


def exit_on_sigterm() -> None:
    """SIGTERM ends this process through `SystemExit` (torch's worker handler `_exit`s)."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5.0)
    os._exit(1)


def guard(parent: int) -> None:
    """Make this process exit when `parent` does (or exit now if it already has)."""
    exit_on_sigterm()
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # it died before the guard was in place
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), daemon=True).start()


class GuardedProcess(context.SpawnProcess):
    """A spawned process that is guarded before it unpickles (and imports) its target."""

    def __getstate__(self) -> dict:
        # Pickled while spawning, so queues and events among the arguments may be pickled.
        state = dict(self.__dict__)
        call = (self._target, self._args, self._kwargs)
        state["_call"] = bytes(reduction.ForkingPickler.dumps(call))
        state["_target"], state["_args"], state["_kwargs"] = None, (), {}
        return state

    def run(self) -> None:
        guard(self._parent_pid)
        try:
            target, args, kwargs = pickle.loads(self.__dict__.pop("_call"))
            target(*args, **kwargs)
        except SystemExit:  # SIGTERM, once the `finally`s ended the pipe commands
            sys.stderr.flush()
            os._exit(0)  # nothing left to hand over: skip seconds of torch's teardown


class GuardedSpawnContext(context.SpawnContext):
    Process = GuardedProcess


GUARDED_SPAWN = GuardedSpawnContext()
