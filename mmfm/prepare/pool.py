"""The tokenizing workers of `mmfm prepare`: a process pool that survives workers that die.

Shard jobs run on spawned workers (`concurrent.futures.ProcessPoolExecutor`, which reports a
dead worker as `BrokenProcessPool` instead of waiting for it forever) and their results come
back in job order. Each job marks the record it is on in a file (`Progress`). When a worker
dies (the OOM killer, kill -9, a crash inside a native library) the pool is started afresh
and the jobs it lost run again one at a time, so that the next death names its job and
record. A record on which a worker died twice is left out of its job from then on
(`Job.skip`: counted as `worker_died`); a job whose worker dies twice outside any record
(starting, writing the shard) ends the run with a DataError.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, NamedTuple

from mmfm.core.errors import DataError

log = logging.getLogger("mmfm")

WORKER_DIED = "a prepare worker died on it twice (killed: out of memory, kill -9, or a crash)"
_MARKS: Path | None = None  # a worker's folder of progress marks (set by `_init`)


class Job(NamedTuple):
    """One shard to tokenize: its path, its (where, record) items and the recipe seed."""

    path: str
    items: list
    seed: int
    skip: tuple[int, ...] = ()
    """Items left out and counted as worker_died: a worker died on each of them twice."""


class Progress:
    """Worker side: the item of job `path` its worker is on, kept in a file its parent reads
    after the worker died (a no-op outside a pool). -1: before the first item; len(items):
    after the last (writing the shard)."""

    def __init__(self, path: str):
        self._fd = None
        if _MARKS is not None:
            self._fd = os.open(_mark(_MARKS, path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self(-1)

    def __call__(self, i: int) -> None:
        if self._fd is not None:
            os.pwrite(self._fd, b"%20d" % i, 0)  # fixed width: one write, no truncation

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)


def _mark(folder: Path, path: str) -> Path:
    return folder / f"{Path(path).name}.at"


def _init(marks: str, initializer: Callable, initargs: tuple) -> None:
    global _MARKS
    _MARKS = Path(marks)
    initializer(*initargs)


class _Entry:
    """A job in the order of results: its value (run in the parent), or its future."""

    def __init__(self, job: Any):
        self.job, self.future, self.value, self.careful = job, None, None, False

    def ready(self) -> bool:
        return not isinstance(self.job, Job) or (self.future is not None and self.future.done())


class WorkerPool:
    """`run(job)` of every job, in order: each `Job` on `workers` spawned processes started
    with `initializer(*initargs)` (at the first Job: none when every shard is done), anything
    else in this process. At most 2 x workers jobs wait, so reading stays just ahead of the
    workers (chunks of raw samples hold their pictures' bytes)."""

    def __init__(self, workers: int, run: Callable, initializer: Callable, initargs: tuple):
        self.workers, self.run, self.init = workers, run, (initializer, initargs)
        self._executor: ProcessPoolExecutor | None = None
        self._marks: tempfile.TemporaryDirectory | None = None
        self._deaths: Counter = Counter()  # (shard, item or None) -> deaths there

    def results(self, jobs: Iterable) -> Iterator:
        pending: deque[_Entry] = deque()
        try:
            for job in jobs:
                pending.append(entry := _Entry(job))
                if not isinstance(job, Job):
                    entry.value = self.run(job)
                elif not any(e.careful for e in pending):
                    self._submit(entry)
                while pending and (len(pending) > 2 * self.workers or pending[0].ready()):
                    yield self._next(pending)
            while pending:
                yield self._next(pending)
        except BaseException:
            self._stop(now=True)  # an error or interrupt: the workers stop at once
            raise
        finally:
            self._stop()
            if self._marks is not None:
                self._marks.cleanup()

    def _next(self, pending: deque[_Entry]) -> Any:
        """The result of the first job; after a death, lost jobs run alone until each is done."""
        head = pending[0]
        while isinstance(head.job, Job):
            if head.future is None:
                self._submit(head)  # a careful head runs alone: nothing else is in flight
            try:
                head.value = head.future.result()
                break
            except BrokenProcessPool:
                self._recover(pending)
        pending.popleft()
        if not any(e.careful for e in pending):
            for entry in pending:
                if isinstance(entry.job, Job) and entry.future is None:
                    self._submit(entry)
        return head.value

    def _submit(self, entry: _Entry) -> None:
        if self._executor is None:
            if self._marks is None:
                self._marks = tempfile.TemporaryDirectory(prefix="mmfm-prepare-")
            threads = max(1, len(os.sched_getaffinity(0)) // self.workers)
            self._executor = ProcessPoolExecutor(
                self.workers,
                mp.get_context("spawn"),
                initializer=_init,
                initargs=(self._marks.name, self.init[0], (*self.init[1], threads)),
            )
        _mark(Path(self._marks.name), entry.job.path).unlink(missing_ok=True)
        entry.future = self._executor.submit(self.run, entry.job)

    def _recover(self, pending: deque[_Entry]) -> None:
        """A worker died: every job the pool lost runs again, one at a time; the death counts
        against the item its job was on where only one lost job had started."""
        self._stop()  # waits for the pool to mark every lost future
        lost = [e for e in pending if e.future is not None and _broken(e.future)]
        started = [(e, at) for e in lost if (at := self._position(e)) is not None]
        names = ", ".join(Path(e.job.path).name for e in lost)
        log.warning("a prepare worker died; rerunning %s one at a time in a new pool", names)
        if len(lost) == 1 or len(started) == 1:
            entry, at = started[0] if started else (lost[0], -1)
            self._count_death(entry, at)
        for entry in lost:
            entry.future, entry.careful = None, True

    def _position(self, entry: _Entry) -> int | None:
        """The item its worker was on (-1: before the first), None if it never started."""
        try:
            return int(_mark(Path(self._marks.name), entry.job.path).read_bytes())
        except (OSError, ValueError):
            return None

    def _count_death(self, entry: _Entry, at: int) -> None:
        job = entry.job
        inside = 0 <= at < len(job.items)
        self._deaths[job.path, at if inside else None] += 1
        if self._deaths[job.path, at if inside else None] < 2:
            return
        if not inside:
            raise DataError(
                f"{job.path}: a prepare worker died twice on this shard outside any record "
                "(starting or writing it): see the messages above and the system log (dmesg: "
                "out of memory?)"
            )
        entry.job = job._replace(skip=(*job.skip, at))

    def _stop(self, now: bool = False) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        if now:  # Python < 3.14 has no public way to end busy workers
            for process in list((getattr(executor, "_processes", None) or {}).values()):
                process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)


def _broken(future: Future) -> bool:
    return future.done() and isinstance(future.exception(), BrokenProcessPool)
