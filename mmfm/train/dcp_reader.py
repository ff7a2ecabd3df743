"""Reading a DCP checkpoint without trusting it.

DCP's own reader unpickles `.metadata` with `pickle.load` and would `torch.load(weights_only=
False)` any non-tensor entry. Here `.metadata` is read by an unpickler that resolves only the
exact (module, name) pairs DCP writes, from a fixed table (no import, no dotted names, no
attribute walks; attributes a pickle sets on those classes are undone and refused), and a
checkpoint with a non-tensor entry, a data file outside its directory or storage transforms
is refused (`UnsafeCheckpointError`). Damage (garbage or truncated files, a missing shard)
and a model that does not fit are one-line `CheckpointError`s naming the file, raised before
DCP runs where they can be seen from the metadata.
"""

from __future__ import annotations

import pathlib
import pickle
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.futures import Future

from mmfm.core.errors import CheckpointError
from mmfm.core.torch_compat import DcpMemoryFormat, DcpStorageInfo, dcp_private_pickle_globals


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that refers to code or files it has no business with: never loaded, and
    `resume=auto` does not fall back past it."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files cannot be read (truncated, garbage, missing): `resume=auto`
    falls back to the previous complete checkpoint."""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Every (module, name) a DCP `.metadata` pickle refers to (torch 2.13, read with
    pickletools from real checkpoints), and the object each stands for."""
    m = dcp_metadata
    classes = (
        m.Metadata,
        m.TensorStorageMetadata,
        m.BytesStorageMetadata,
        m.ChunkStorageMetadata,
        m.TensorProperties,
        m.StorageMeta,
        m.MetadataIndex,
    )
    allowed: dict[tuple[str, str], Any] = {(m.__name__, c.__name__): c for c in classes}
    allowed.update(dcp_private_pickle_globals())
    allowed[("torch", "Size")] = torch.Size
    allowed.update(
        {("torch", name): v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}
    )
    # The path the checkpoint was saved at is a record only: pure paths on any system.
    for module in ("pathlib", "pathlib._local"):  # Python >= 3.13 pickles pathlib._local
        for flavour, pure in (
            ("Posix", pathlib.PurePosixPath),
            ("Windows", pathlib.PureWindowsPath),
        ):
            allowed[(module, f"{flavour}Path")] = allowed[(module, f"Pure{flavour}Path")] = pure
    allowed[("collections", "OrderedDict")] = OrderedDict
    return allowed


_ALLOWED = _allowed_globals()
# A pickle can set attributes on what it names or builds (BUILD): on an allowed class, or on
# an enum member (a singleton). Those are watched, restored, and the checkpoint refused.
_WATCHED = [v for v in _ALLOWED.values() if isinstance(v, type)]
_WATCHED += list(DcpMemoryFormat)
_MISSING = object()


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the exact pairs in `_ALLOWED`; nothing is imported or looked up."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UnsafeCheckpointError(f"it refers to {module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("it holds a persistent reference")


@contextmanager
def _watched_untouched(extra: list | tuple = ()):
    before = [(obj, dict(vars(obj))) for obj in [*_WATCHED, *extra]]
    try:
        yield
    finally:
        changed = [obj for obj, attrs in before if not _same_attrs(vars(obj), attrs)]
        for obj, attrs in before:
            if obj in changed:
                for name in set(vars(obj)) - set(attrs):
                    delattr(obj, name)
                for name, value in attrs.items():
                    if vars(obj).get(name, _MISSING) is not value:
                        setattr(obj, name, value)
        if changed:
            raise UnsafeCheckpointError(f"it sets attributes of {changed[0]!r}")


def _same_attrs(now, before: dict) -> bool:
    return now.keys() == before.keys() and all(now[k] is v for k, v in before.items())


def _unpickle_metadata(
    path: Path, unpickler: type[_MetadataUnpickler] = _MetadataUnpickler
) -> Metadata:
    """`unpickler`: this one or a subclass resolving more pairs (its `watched`: their
    classes and enum members, watched as `_WATCHED` is)."""
    try:
        with open(path, "rb") as f, _watched_untouched(getattr(unpickler, "watched", ())):
            metadata = unpickler(f).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{path}: {e}; refusing to load") from None
    except FileNotFoundError:
        raise DamagedCheckpointError(f"{path} is missing: not a complete DCP checkpoint") from None
    except Exception as e:  # any malformed pickle: truncated, garbage, wrong types
        raise DamagedCheckpointError(
            f"{path} is not readable DCP metadata ({error_line(e)}): the checkpoint is damaged; "
            "use another checkpoint"
        ) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise DamagedCheckpointError(f"{path} is not DCP metadata: use another checkpoint")
    return metadata


def _check_storage(path: Path, metadata: Metadata) -> None:
    """Every entry a tensor, every data file a plain name in `path`, present and long enough."""
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            raise UnsafeCheckpointError(
                f"{path / '.metadata'}: entry {key!r} is not a tensor; refusing to load"
            )
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        if not isinstance(info, DcpStorageInfo):
            raise DamagedCheckpointError(
                f"{path / '.metadata'} is not DCP metadata (storage entry {info!r}): the "
                "checkpoint is damaged; use another checkpoint"
            )
        name = info.relative_path
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise UnsafeCheckpointError(
                f"{path / '.metadata'}: data file {name!r} lies outside the checkpoint "
                "directory; refusing to load"
            )
        if info.transform_descriptors:  # mmfm never writes them; DCP would run extensions
            raise UnsafeCheckpointError(
                f"{path / '.metadata'}: {name} has storage transforms "
                f"{info.transform_descriptors}; refusing to load"
            )
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise DamagedCheckpointError(
                f"{file} is missing: the checkpoint is incomplete (copy it again, or use "
                "another checkpoint)"
            )
        if file.stat().st_size < size:
            raise DamagedCheckpointError(
                f"{file} is truncated ({file.stat().st_size} bytes, the metadata expects at "
                f"least {size}): copy it again, or use another checkpoint"
            )


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` without arbitrary unpickling, and with errors that name the file
    (see the module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = getattr(self, "_checked_metadata", None)
        if metadata is None:
            path = Path(self.path)
            metadata = _unpickle_metadata(path / ".metadata")
            _check_storage(path, metadata)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            self._checked_metadata = metadata
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner) -> Future[None]:
        """DCP's read, one data file at a time, so that a failure names its file."""
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in by_file.items():
            try:
                super().read_data(replace(plan, items=items), planner).wait()
            except Exception as e:
                raise DamagedCheckpointError(
                    f"{Path(self.path) / name} is not readable DCP tensor data "
                    f"({error_line(e)}): the checkpoint is damaged; use another checkpoint"
                ) from None
        done: Future[None] = Future()
        done.set_result(None)
        return done


def error_line(e: BaseException) -> str:
    """`Type: the first sentence` of an error, for a one-line message."""
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > 100:
        first = first.split(". ")[0][:100]
    return f"{type(e).__name__}: {first}"


@contextmanager
def _single_process_quiet():
    """DCP warns on every call that it runs without a process group; in one process that is
    the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def load_tensors(tensors: dict, reader: SafeFileSystemReader, partial: bool = False) -> None:
    """`dcp.load` through `reader`, with our one-line errors unwrapped from DCP's
    `CheckpointException` (a BaseException that prints every rank's traceback)."""
    try:
        with _single_process_quiet():
            dcp.load(
                tensors,
                storage_reader=reader,
                planner=DefaultLoadPlanner(allow_partial_load=partial),
            )
    except CheckpointException as e:
        errors = [exc for exc, _ in e.failures.values()]
        ours = next((x for x in errors if isinstance(x, CheckpointError)), None)
        if ours is not None:
            raise ours from None
        raise DamagedCheckpointError(
            f"{reader.path}: DCP could not load it ({error_line(errors[0])})"
        ) from None


def check_entries(path: Path, stored: dict, tensors: dict, whole_model: bool) -> None:
    """Every tensor of `tensors` (nested as DCP flattens it) stored under its name with its
    shape; with `whole_model`, no stored model weight left over either."""
    wanted = dict(_flatten(tensors))
    problems: dict[str, list[str]] = {}
    for name, tensor in wanted.items():
        entry = stored.get(name)
        if entry is None:
            problems.setdefault(name.split(".")[0], []).append(f"{name} is not in the checkpoint")
        elif tuple(entry.size) != tuple(tensor.shape):
            problems.setdefault(name.split(".")[0], []).append(
                f"{name} has shape {tuple(entry.size)} there, {tuple(tensor.shape)} here"
            )
    if whole_model:
        extra = [k for k in stored if k.startswith("model.") and k not in wanted]
        problems.setdefault("model", []).extend(f"{k} is not in this model" for k in extra)
    for part in sorted(problems, key=lambda p: p != "model"):  # a model change first
        found = problems[part]
        if not found:
            continue
        more = f"; and {len(found) - 3} more" if len(found) > 3 else ""
        fix = {
            "model": "make the model section match the checkpoint's config.yaml",
            "optim": f"the optimizer differs: take only the weights with train.init_from={path}",
        }.get(part, "the run does not match the checkpoint")
        raise CheckpointError(
            f"{path} does not fit this {'model' if part == 'model' else 'run'} "
            f"({'; '.join(found[:3])}{more}): {fix}"
        )


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
