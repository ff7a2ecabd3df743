"""Atomic, resumable checkpoints with `torch.distributed.checkpoint` (DCP).

`<run_dir>/checkpoints/step_<N>/` holds the DCP files (tensors only: model, optimizer state,
RNG), `train_state.json` (step, scheduler, loader cursor, optimizer hyper-parameters,
counters) and `config.yaml`. A checkpoint is written as `.step_<N>.tmp` and renamed when
complete, so a crash mid-write never leaves a directory that `resume=auto` would pick.

Loading never unpickles arbitrary objects: DCP's `.metadata` is read by an unpickler that
admits only DCP's own metadata classes, and a checkpoint whose entries are not all tensors
(DCP would `torch.load(weights_only=False)` them) is refused.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
CONFIG_FILE = "config.yaml"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, unsafe or does not match the run."""


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP writes into `.metadata`; anything else is refused unimported."""

    _ALLOWED = frozenset(
        {
            ("torch", "Size"),
            ("torch.serialization", "_get_layout"),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"),
            ("pathlib", "WindowsPath"),
            ("pathlib", "PureWindowsPath"),
            ("collections", "OrderedDict"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        dcp_metadata = module == "torch.distributed.checkpoint.metadata"
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dcp_metadata or dtype or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}; refusing to load")


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` without arbitrary unpickling (see the module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} is not DCP metadata")
        for key, item in metadata.state_dict_metadata.items():
            if not isinstance(item, TensorStorageMetadata):
                raise CheckpointError(f"{path}: entry {key!r} is not a tensor; refusing to load")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


@contextmanager
def _single_process_quiet():
    """DCP warns on every call that it runs without a process group; in one process that is
    the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / ".metadata").is_file()


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))  # type: ignore[union-attr]


class Checkpointer:
    """Saves, finds, loads and prunes the checkpoints of one run.

    In a multi-process job every rank writes its shards with DCP; the main rank then writes
    the JSON state and renames the directory, between barriers.
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

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.iterdir()
            if _STEP_DIR.match(p.name)
            and (p / STATE_FILE).is_file()
            and (p / ".metadata").is_file()
        ]
        return sorted(found, key=step_of)

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
        with _single_process_quiet():
            dcp.save(tensors, checkpoint_id=tmp)
        if self.is_main:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
            (tmp / CONFIG_FILE).write_text(config_yaml)
            for path in self.extra_files:
                shutil.copyfile(path, tmp / path.name)
            self._publish(tmp, final)
            self._prune()
        self.barrier()
        return final

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
        for path in self.complete()[: -self.keep]:
            log.info("removing old checkpoint %s (checkpoint.keep=%d)", path, self.keep)
            shutil.rmtree(path)
        for path in self.root.glob(".step_*"):  # leftovers of crashed writes
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def load_model(path: str | Path, model_state: dict) -> None:
        """Fill a model state dict in place from checkpoint `path` (its "model." entries only:
        no optimizer, no training state), after checking every name and shape."""
        path = Path(path)
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"{path} is not a checkpoint directory (no .metadata)")
        reader = SafeFileSystemReader(path)
        stored = reader.read_metadata().state_dict_metadata
        for name, tensor in model_state.items():
            entry = stored.get(f"model.{name}")
            if entry is None:
                raise CheckpointError(f"{path} has no weight {name!r}: a different model")
            if tuple(entry.size) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(entry.size)}, the model wants "
                    f"{tuple(tensor.shape)}: make the model section match the checkpoint's"
                )
        with _single_process_quiet():
            dcp.load(
                {"model": model_state},
                storage_reader=reader,
                planner=DefaultLoadPlanner(allow_partial_load=True),
            )

    @staticmethod
    def load(path: str | Path, tensors: dict) -> dict:
        """Fill `tensors` (a state dict of the right structure) in place; return the JSON state."""
        path = Path(path)
        if not is_complete(path):
            raise CheckpointError(
                f"{path} is not a complete mmfm checkpoint (needs .metadata and {STATE_FILE})"
            )
        reader = SafeFileSystemReader(path)
        reader.read_metadata()  # DCP would wrap our refusal in a generic CheckpointException
        with _single_process_quiet():
            dcp.load(tensors, storage_reader=reader)
        return json.loads((path / STATE_FILE).read_text())


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model, config) of a checkpoint in one process, whatever layout saved it."""
    from mmfm.config import load_config
    from mmfm.model import build_model

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} has no {CONFIG_FILE}: not an mmfm checkpoint")
    cfg = load_config(path / CONFIG_FILE, ["parallel.tp=1", "parallel.pp=1", "parallel.cp=1"])
    model = build_model(cfg.model, device)
    model.to_empty(device=device)
    state = model.state_dict()
    Checkpointer.load_model(path, state)
    model.load_state_dict(state)
    return model.eval(), cfg
