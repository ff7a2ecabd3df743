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

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
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
    ):
        self.root = Path(root)
        self.keep = keep
        self.is_main, self.barrier = is_main, barrier
        self.extra_files = extra_files
        """Files copied into every checkpoint (the vocabulary)."""

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

    def save(self, step: int, tensors: dict, state: dict, config_yaml: str) -> Path:
        final = self.root / f"step_{step}"
        tmp = self.root / f".step_{step}.tmp"
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        try:
            with _single_process_quiet():
                dcp.save(tensors, checkpoint_id=tmp)
            if self.is_main:
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
                (tmp / CONFIG_FILE).write_text(config_yaml)
                for path in self.extra_files:
                    shutil.copyfile(path, tmp / path.name)
                (tmp / COMPLETE_FILE).write_text(f"{step}\n")  # last: the rest is on disk
        except (OSError, CheckpointException) as e:
            raise self._write_failed(final, tmp, e) from None
        if self.is_main:
            self._publish(tmp, final)
            self._prune()
        self.barrier()
        return final

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
    best checkpoint may have written it, `save_once`)."""

    def __init__(self, every: int, at_end: bool):
        self.every, self.at_end = every, at_end
        self._saved: tuple[int, Path] | None = None

    def on_fit_start(self, start_step: int, total_steps: int) -> None:
        self.total = total_steps

    def save_once(self) -> Path:
        """A checkpoint of this step, unless one was already written."""
        step = self.trainer.step
        if self._saved is None or self._saved[0] != step:
            self._saved = step, self.trainer.save()
        return self._saved[1]

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if self.every and step % self.every == 0 and step < self.total:
            self.save_once()

    def on_train_end(self, stopped_by: str | None) -> None:
        if stopped_by is not None:
            path = self.save_once()
            log.info(
                "%s received: saved %s at step %d, exiting", stopped_by, path, self.trainer.step
            )
        elif self.at_end:
            self.save_once()


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
