"""Atomic, resumable checkpoints with `torch.distributed.checkpoint` (DCP).

`<run_dir>/checkpoints/step_<N>/` holds the DCP files (tensors only: model, optimizer state,
RNG), `train_state.json` (step, scheduler, loader cursor, optimizer hyper-parameters,
counters), `config.yaml` and, written last, the marker `COMPLETE`. A checkpoint is written as
`.step_<N>.tmp` and renamed when complete, and pruning removes the marker first, so neither a
crash mid-write nor one mid-prune leaves a directory that `resume=auto` would pick. A write
that fails (disk full) removes its temporary directory and leaves the previous checkpoints
as they were.

Loading goes through `mmfm.train.dcp_reader`: nothing in a checkpoint is unpickled or
executed beyond DCP's own metadata classes, and every name, shape and file is checked first.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from mmfm.config import Config, load_config
from mmfm.config.schema import SAMPLES_OFF
from mmfm.core.errors import CheckpointError
from mmfm.model import build_model
from mmfm.train.callbacks import Callback
from mmfm.train.dcp_reader import (
    DamagedCheckpointError,
    SafeFileSystemReader,
    UnsafeCheckpointError,
    _single_process_quiet,
    check_entries,
    entry_problems,
    error_line,
    listed,
    load_tensors,
)

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "DamagedCheckpointError",
    "SafeFileSystemReader",
    "UnsafeCheckpointError",
    "load_checkpoint_model",
    "load_tensors",
]

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
CONFIG_FILE = "config.yaml"
COMPLETE_FILE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def is_complete(path: Path) -> bool:
    """Written to the end (the marker is written last and removed first)."""
    return all((path / name).is_file() for name in (COMPLETE_FILE, STATE_FILE, ".metadata"))


def require_checkpoint(path: Path, model_only: bool = False) -> None:
    """The files a load reads first, checked without reading them (so that `mmfm train`
    refuses a bad start before it creates its run dir): the metadata, and unless
    `model_only` (the weights alone, train.init_from) the state and the marker."""
    if model_only:
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"{path} is not a checkpoint directory (no .metadata)")
        return
    if not is_complete(path):
        have = (path / STATE_FILE).is_file() and (path / ".metadata").is_file()
        raise CheckpointError(
            f"{path} has no {COMPLETE_FILE} marker: it was not written to the end or was "
            "being removed; use another checkpoint"
            if have
            else f"{path} is not a complete mmfm checkpoint (needs .metadata, {STATE_FILE} "
            f"and {COMPLETE_FILE})"
        )


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))  # type: ignore[union-attr]


def _read_state(path: Path) -> dict:
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DamagedCheckpointError(
            f"{file} is not readable JSON ({error_line(e)}): the checkpoint is damaged; use "
            "another checkpoint"
        ) from None
    if not isinstance(state, dict):
        raise DamagedCheckpointError(
            f"{file} holds a {type(state).__name__}, not an object: the checkpoint is damaged; "
            "use another checkpoint"
        )
    return state


def _quiet_writer_thread() -> None:
    """DCP's warning that it saves without a process group, which a background save in one
    process gives from its writer thread, where `_single_process_quiet` (warning filters are
    per process, and not thread-safe to change) cannot reach: ignored for the process."""
    warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)


@dataclass
class _InFlight:
    """A background save: DCP writes the tensors; the rest waits for `Checkpointer.finish`."""

    step: int
    tmp: Path
    final: Path
    state: dict
    config: str
    future: Future


class Checkpointer:
    """Saves, finds, loads and prunes the checkpoints of one run.

    In a multi-process job every rank writes its shards with DCP; the main rank then writes
    the JSON state, the marker, and renames the directory, between barriers.
    """

    def __init__(
        self,
        root: str | Path,
        keep: int,
        is_main: bool = True,
        barrier=lambda: None,
        extra_files: tuple[Path, ...] = (),
        async_group=None,
    ):
        self.root = Path(root)
        self.keep = keep
        self.is_main, self.barrier = is_main, barrier
        self.extra_files = extra_files
        """Files copied into every checkpoint (the vocabulary)."""
        self.async_group = async_group
        """The process group of background writes' collectives (`ParallelEnv.checkpoint_group`:
        not the training's own); None in one process."""
        self._in_flight: _InFlight | None = None

    def step_dirs(self) -> list[Path]:
        """Every `step_<N>` directory, complete or not, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if _STEP_DIR.match(p.name)), key=step_of)

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return [p for p in self.step_dirs() if is_complete(p)]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(
        self, step: int, tensors: dict, state: dict, config_yaml: str, background: bool = False
    ) -> Path:
        """Checkpoint `step`; every rank calls it. With `background`, return once `tensors`
        are copied (DCP's async_save stages them before it returns, so the caller may change
        them at once): a thread writes the files, and `finish` marks the checkpoint complete.
        A save still in flight is finished first (at most one)."""
        self.finish()
        if background and not dist.is_initialized():
            _quiet_writer_thread()
        final = self.root / f"step_{step}"
        tmp = self.root / f".step_{step}.tmp"
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        try:
            with _single_process_quiet():
                if not background:
                    dcp.save(tensors, checkpoint_id=tmp)
                else:
                    future = dcp.async_save(
                        tensors,
                        storage_writer=self.storage_writer(tmp),
                        process_group=self.async_group,
                        no_dist=not dist.is_initialized(),  # one process: as dcp.save infers
                    )
                    self._in_flight = _InFlight(step, tmp, final, state, config_yaml, future)
                    return final
        except (OSError, CheckpointException) as e:
            raise self._write_failed(final, tmp, e) from None
        self._complete(step, tmp, final, state, config_yaml)
        return final

    def storage_writer(self, path: Path) -> FileSystemWriter:
        """DCP's writer of a background save's directory (each file fsynced before the write
        returns, as `dcp.save`'s own)."""
        return FileSystemWriter(path, sync_files=True)

    def writing(self) -> bool:
        """Whether this rank's background write is still running (not done nor failed)."""
        return self._in_flight is not None and not self._in_flight.future.done()

    @property
    def in_flight(self) -> Path | None:
        """The checkpoint a background write is making, until `finish` completes it."""
        return None if self._in_flight is None else self._in_flight.final

    def finish(self) -> None:
        """Wait for the background write (if any) on this rank, then, once every rank's files
        are durable (a barrier), write the JSON state and the marker: the checkpoint is
        complete. A failed write raises `CheckpointError` here, on every rank (DCP hands each
        rank the failure), after removing its temporary directory."""
        pending, self._in_flight = self._in_flight, None
        if pending is None:
            return
        try:
            with _single_process_quiet():
                pending.future.result()
        except (OSError, CheckpointException) as e:
            raise self._write_failed(pending.final, pending.tmp, e) from None
        self.barrier()
        self._complete(pending.step, pending.tmp, pending.final, pending.state, pending.config)

    def abandon(self) -> None:
        """On the way out of a failing run: let this rank's background write end (its thread
        holds the process group) and leave it unmarked, so the previous checkpoint stays the
        newest complete one. No collective: the other ranks may be gone."""
        pending, self._in_flight = self._in_flight, None
        if pending is not None:
            # The run's own error is the one to report.
            with contextlib.suppress(Exception, CheckpointException):
                pending.future.result()
            log.warning(
                "checkpoint %s was being written when the run failed: left incomplete",
                pending.final,
            )

    def _complete(self, step: int, tmp: Path, final: Path, state: dict, config_yaml: str) -> None:
        """After every rank's tensors are written: the JSON state, the config, the extra files
        and, last, the marker; the directory is published and old ones pruned."""
        try:
            if self.is_main:
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
                (tmp / CONFIG_FILE).write_text(config_yaml)
                for path in self.extra_files:
                    shutil.copyfile(path, tmp / path.name)
                (tmp / COMPLETE_FILE).write_text(f"{step}\n")  # last: the rest is on disk
        except OSError as e:
            raise self._write_failed(final, tmp, e) from None
        if self.is_main:
            self._publish(tmp, final)
            self._prune()
        self.barrier()

    def _write_failed(self, final: Path, tmp: Path, e: BaseException) -> CheckpointError:
        if isinstance(e, CheckpointException):  # DCP's wrapper: the first rank's own error
            e = next(iter(e.failures.values()))[0]
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space it took
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = "no space left on the device" if full else error_line(e)
        previous = self.latest()
        kept = f"the previous checkpoint {previous} is intact" if previous else "none before it"
        return CheckpointError(
            f"cannot write checkpoint {final} ({reason}); {kept}: free space in {self.root} "
            "(or lower checkpoint.keep), then continue with train.resume=auto"
        )

    def _publish(self, tmp: Path, final: Path) -> None:
        if final.exists():  # the same step saved again, e.g. a signal right after a save
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)

    def _prune(self) -> None:
        done = self.complete()
        for path in done[: -self.keep]:
            log.info("removing old checkpoint %s (checkpoint.keep=%d)", path, self.keep)
            (path / COMPLETE_FILE).unlink()  # first: a crash mid-removal leaves no checkpoint
            shutil.rmtree(path)
        newest = step_of(done[-1]) if done else -1
        for path in self.step_dirs():  # older, unmarked: leftovers of an interrupted prune
            if step_of(path) < newest and not is_complete(path):
                shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(".step_*"):  # leftovers of crashed writes
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def load_model(path: str | Path, model_state: dict, whole_model: bool = False) -> None:
        """Fill a model state dict in place from checkpoint `path` (its "model." entries only:
        no optimizer, no training state), after checking every name and shape; with
        `whole_model` (not one pipeline stage's share), also that the checkpoint holds no
        weight the model lacks."""
        path = Path(path)
        require_checkpoint(path, model_only=True)
        reader = SafeFileSystemReader(path)
        stored = reader.read_metadata().state_dict_metadata
        check_entries(path, stored, {"model": model_state}, whole_model)
        load_tensors({"model": model_state}, reader, partial=True)

    @staticmethod
    def load_state(path: str | Path) -> dict:
        """The JSON state of checkpoint `path` alone (step, scheduler, data streams)."""
        return _read_state(Path(path))

    @staticmethod
    def load(
        path: str | Path,
        tensors: dict,
        whole_model: bool = False,
        check_state: Callable[[Path, dict], None] | None = None,
    ) -> dict:
        """Fill `tensors` (a state dict of the right structure) in place; return the JSON state.

        Everything that can be checked without reading the tensors is checked first: the
        marker, the metadata (safely), the JSON state (`check_state(file, state)`), the data
        files, every name and shape (`whole_model`: as in `load_model`).
        """
        path = Path(path)
        require_checkpoint(path)
        reader = SafeFileSystemReader(path)
        stored = reader.read_metadata().state_dict_metadata
        state = _read_state(path)
        if check_state is not None:
            check_state(path / STATE_FILE, state)
        check_entries(path, stored, tensors, whole_model)
        load_tensors(tensors, reader)
        return state


class Checkpointing(Callback):
    """Saves the trainer's state every `every` steps (not at the last step: `at_end` decides),
    after a stop signal, and with `at_end` when the run ends; never twice at one step (the
    best checkpoint may have written it, `save_once`).

    With `background` (checkpoint.async_save) the periodic saves are written while training
    goes on: the step after every rank's write ended (the trainer's `StepFlags` say so, in
    the all_reduce the step makes anyway) completes the checkpoint, or reports its failure;
    the next save, the end of the run and a stop signal wait for it."""

    def __init__(self, every: int, at_end: bool, background: bool = False):
        self.every, self.at_end, self.background = every, at_end, background
        self._saved: tuple[int, Path] | None = None

    def on_fit_start(self, start_step: int, total_steps: int) -> None:
        self.total = total_steps

    def save_once(self, background: bool = False) -> Path:
        """A checkpoint of this step, unless one was already written; complete when it
        returns unless `background`."""
        step = self.trainer.step
        if self._saved is None or self._saved[0] != step:
            self._saved = step, self.trainer.save(background)
        if not background:
            self.trainer.checkpointer.finish()
        return self._saved[1]

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        checkpointer = self.trainer.checkpointer
        if checkpointer.in_flight is not None and not self.trainer.writes_pending:
            checkpointer.finish()  # every rank's write ended before this step's all_reduce
        if self.every and step % self.every == 0 and step < self.total:
            self.save_once(self.background)

    def on_train_end(self, stopped_by: str | None) -> None:
        if stopped_by is not None:
            path = self.save_once()
            log.info(
                "%s received: saved %s at step %d, exiting", stopped_by, path, self.trainer.step
            )
        elif self.at_end:
            self.save_once()
        self.trainer.checkpointer.finish()

    def on_fit_end(self) -> None:
        """A run that failed leaves a write in flight incomplete (finished runs have none)."""
        self.trainer.checkpointer.abandon()


def checkpoint_config(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config saved with checkpoint `path`, checked against its weights first: the model it
    describes, built on the meta device (no memory), must have the checkpoint's tensor names
    and shapes, so a damaged `config.yaml` (`dim: 4194304`) is refused before 70 TB are
    allocated for it. (Without weights there is nothing to compare: `require_checkpoint` refuses
    the directory before a model is made.)"""
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} has no {CONFIG_FILE}: not an mmfm checkpoint")
    cfg = load_config(path / CONFIG_FILE, [*SAMPLES_OFF, *overrides])
    if not (path / ".metadata").is_file():
        return cfg
    stored = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    model = build_model(cfg.model, "meta")
    found = entry_problems(stored, {"model": model.state_dict()}, whole_model=True).get("model")
    if found:
        raise CheckpointError(
            f"{path / CONFIG_FILE} does not describe the weights in {path} ({listed(found)}): "
            f"the file was changed or damaged; restore the {CONFIG_FILE} saved with them"
        )
    return cfg


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model, config) of a checkpoint in one process, whatever layout saved it."""
    path = Path(path)
    cfg = checkpoint_config(path, ["parallel.tp=1", "parallel.pp=1", "parallel.cp=1"])
    require_checkpoint(path, model_only=True)
    model = build_model(cfg.model, device)
    model.to_empty(device=device)
    state = model.state_dict()
    Checkpointer.load_model(path, state, whole_model=True)
    model.load_state_dict(state)
    return model.eval(), cfg
