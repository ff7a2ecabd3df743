"""Reading a DCP checkpoint without trusting it.

DCP's own reader unpickles `.metadata` with `pickle.load` and would `torch.load(weights_only=
False)` any non-tensor entry. Here `.metadata` is read by an unpickler that resolves only the
exact (module, name) pairs DCP writes, from a fixed table (no import, no dotted names, no
attribute walks, no attribute set on anything the pickle did not make), and a checkpoint with
a non-tensor entry, a file outside its directory (by its real path) or storage transforms is
refused (`UnsafeCheckpointError`). Damage (garbage or truncated files, a missing shard, a
field of the wrong type, chunks that do not cover their tensor exactly) and a model that does
not fit are one-line `CheckpointError`s naming the file, raised before DCP runs where they can
be seen from the metadata.
"""

from __future__ import annotations

import functools
import math
import pathlib
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.futures import Future

from mmfm.core.errors import CheckpointError
from mmfm.core.torch_compat import DcpStorageInfo, dcp_private_pickle_globals


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


_CHANGING_OPCODES = {
    "BUILD": 2,
    "SETITEM": 3,
    "APPEND": 2,
    "SETITEMS": 0,
    "APPENDS": 0,
    "ADDITEMS": 0,
}
"""The opcodes that change an object on the stack, and where it is (0: under the mark)."""


def _checked(opcode: str, depth: int) -> Callable:
    """The pure-Python unpickler's handler of `opcode`, after a look at what it changes."""
    handler = pickle._Unpickler.dispatch[getattr(pickle, opcode)[0]]

    def checked(self: _MetadataUnpickler) -> None:
        self._target(opcode, depth)
        handler(self)

    return checked


class _MetadataUnpickler(pickle._Unpickler):
    """Resolves only the exact pairs in `_ALLOWED` (and a subclass's `extra`); nothing is
    imported or looked up. BUILD (which sets attributes) and SETITEM, APPEND and ADDITEMS
    (which fill containers) act only on what this pickle made: a fresh instance of a class it
    named (not an enum member) or a dict, list or set; never on a class, a function or a
    singleton, where a change would outlive the load (`_get_layout.cache`, `__qualname__`).

    The pure-Python `pickle._Unpickler`, because the C one has no hook per opcode: 3-4x its
    time (1.3 s for the 2.3 MB metadata of 2000 tensors in 8 shards, against 0.4 s)."""

    extra: ClassVar[dict[tuple[str, str], Any]] = {}

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._classes: set[type] = set()
        """The non-enum classes this pickle named: its fresh instances may be built."""

    def find_class(self, module: str, name: str) -> Any:
        found = self.extra.get((module, name)) or _ALLOWED.get((module, name))
        if found is None:
            raise UnsafeCheckpointError(f"it refers to {module}.{name}")
        if isinstance(found, type) and not issubclass(found, Enum):
            self._classes.add(found)
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("it holds a persistent reference")

    def _made_here(self, obj: Any, opcode: str) -> None:
        if type(obj) not in (dict, list, set, *self._classes):
            raise UnsafeCheckpointError(
                f"it applies {opcode} to {_name_of(obj)}, which it did not make"
            )

    def _target(self, opcode: str, depth: int = 0) -> None:
        """The object `opcode` changes: `depth` from the top of the stack, or the one under
        the mark (the multi-item opcodes). A malformed stack is left to the opcode to fail."""
        stack = self.stack if depth else (self.metastack[-1] if self.metastack else [])
        depth = depth or 1
        if len(stack) >= depth:
            self._made_here(stack[-depth], opcode)

    dispatch: ClassVar[dict] = {
        **pickle._Unpickler.dispatch,
        **{getattr(pickle, op)[0]: _checked(op, depth) for op, depth in _CHANGING_OPCODES.items()},
    }


def _name_of(obj: Any) -> str:
    """What an untrusted object is, without its repr (which could recurse without end)."""
    if isinstance(obj, type) or callable(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"
    return f"a {type(obj).__name__}"


def _unpickle_metadata(
    path: Path, unpickler: type[_MetadataUnpickler] = _MetadataUnpickler
) -> Metadata:
    """`unpickler`: this one or a subclass resolving more pairs (its `extra`)."""
    _inside(path.parent, path)
    try:
        with open(path, "rb") as f:
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
    if not isinstance(metadata, Metadata):
        raise DamagedCheckpointError(f"{path} is not DCP metadata: use another checkpoint")
    return metadata


def _inside(folder: Path, file: Path) -> None:
    """`file` by its real path in `folder` (no link out of the checkpoint)."""
    real = file.resolve()
    if real.parent != folder.resolve():
        raise UnsafeCheckpointError(
            f"{file}: {file.name} links to {real}, outside the checkpoint directory; refusing "
            "to load (copy the file into the checkpoint)"
        )


def _damaged(path: Path, what: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(
        f"{path / '.metadata'}: {what}: the checkpoint is damaged; use another checkpoint"
    )


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_shape(value: Any, rank: int | None = None) -> bool:
    """A tuple of non-negative ints (of `rank` of them)."""
    return (
        isinstance(value, tuple)
        and (rank is None or len(value) == rank)
        and all(_is_count(d) for d in value)
    )


def _check_tensor(path: Path, key: str, item: TensorStorageMetadata) -> None:
    """Typed fields, and chunks inside the tensor that cover each element exactly once (else
    DCP leaves the uncovered elements as the allocator had them)."""
    if not isinstance(item.properties, TensorProperties) or not isinstance(
        item.properties.dtype, torch.dtype
    ):
        raise _damaged(path, f"{key} has no tensor properties")
    if not _is_shape(item.size):
        raise _damaged(path, f"{key} has size of type {type(item.size).__name__}, not a shape")
    size, chunks = tuple(item.size), item.chunks
    if not isinstance(chunks, list) or not all(
        isinstance(c, ChunkStorageMetadata)
        and _is_shape(c.offsets, len(size))
        and _is_shape(c.sizes, len(size))
        for c in chunks
    ):
        raise _damaged(path, f"{key} has chunks that are not {len(size)}-d offsets and sizes")
    for c in chunks:
        if any(o + n > d for o, n, d in zip(c.offsets, c.sizes, size, strict=True)):
            raise _damaged(path, f"{key} has a chunk at {tuple(c.offsets)} past its size {size}")
    covered, total = sum(math.prod(c.sizes) for c in chunks), math.prod(size)
    if covered != total or _overlap(chunks):
        raise _damaged(
            path,
            f"{key} chunks cover {covered} of {total} elements"
            + (" (they overlap)" if covered == total else ""),
        )


def _overlap(chunks: list[ChunkStorageMetadata]) -> bool:
    """Whether two chunks share an element: a sweep along the dimension where their offsets
    differ most (a sharded dimension), comparing only chunks whose spans there meet."""
    if len(chunks) < 2 or not chunks[0].sizes:
        return len(chunks) > 1
    dim = max(range(len(chunks[0].sizes)), key=lambda d: len({c.offsets[d] for c in chunks}))
    ordered = sorted((c for c in chunks if math.prod(c.sizes)), key=lambda c: c.offsets[dim])
    active: list[ChunkStorageMetadata] = []
    for c in ordered:
        active = [a for a in active if a.offsets[dim] + a.sizes[dim] > c.offsets[dim]]
        for a in active:
            if all(
                max(ao, co) < min(ao + an, co + cn)
                for ao, an, co, cn in zip(a.offsets, a.sizes, c.offsets, c.sizes, strict=True)
            ):
                return True
        active.append(c)
    return False


def _check_storage(path: Path, metadata: Metadata) -> None:
    """Every entry a tensor whose chunks cover it, every chunk stored, every data file a plain
    name whose real path is in `path`, present and long enough; every field of its type."""
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict) or not all(isinstance(k, str) for k in entries):
        raise _damaged(path, "state_dict_metadata is not a dict of names")
    for key, item in entries.items():
        if not isinstance(item, TensorStorageMetadata):
            raise UnsafeCheckpointError(
                f"{path / '.metadata'}: entry {key!r} is not a tensor; refusing to load"
            )
        _check_tensor(path, key, item)
    if not isinstance(storage, dict) or not all(
        isinstance(k, MetadataIndex) and isinstance(k.fqn, str) for k in storage
    ):
        raise _damaged(path, f"storage_data is a {type(storage).__name__}, not a dict of chunks")
    if not (metadata.storage_meta is None or isinstance(metadata.storage_meta, StorageMeta)):
        raise _damaged(path, f"storage_meta is a {type(metadata.storage_meta).__name__}")
    for key, item in entries.items():
        for c in item.chunks:
            if MetadataIndex(key, c.offsets) not in storage:
                raise _damaged(path, f"{key}'s chunk at {tuple(c.offsets)} is not in storage_data")
    needed: dict[str, int] = {}
    for info in storage.values():
        if not isinstance(info, DcpStorageInfo):
            raise _damaged(path, f"storage_data holds a {type(info).__name__}")
        name = info.relative_path
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise UnsafeCheckpointError(
                f"{path / '.metadata'}: data file "
                f"{name if isinstance(name, str) else _name_of(name)!r} lies outside the "
                "checkpoint directory; refusing to load"
            )
        if info.transform_descriptors:  # mmfm never writes them; DCP would run extensions
            raise UnsafeCheckpointError(
                f"{path / '.metadata'}: {name} has storage transforms; refusing to load"
            )
        if not (_is_count(info.offset) and _is_count(info.length)):
            raise _damaged(path, f"storage_data of {name} has an offset or length not a count")
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise DamagedCheckpointError(
                f"{file} is missing: the checkpoint is incomplete (copy it again, or use "
                "another checkpoint)"
            )
        _inside(path, file)
        if file.stat().st_size < size:
            raise DamagedCheckpointError(
                f"{file} is truncated ({file.stat().st_size} bytes, the metadata expects at "
                f"least {size}): copy it again, or use another checkpoint"
            )


@functools.lru_cache(maxsize=2)
def _checked_metadata(path: Path, version: tuple | None) -> Metadata:
    """The checked metadata of checkpoint `path`, read once per version of the file: a
    command reads it for the config check, then to load (the pure-Python unpickler is slow)."""
    metadata = _unpickle_metadata(path / ".metadata")
    _check_storage(path, metadata)
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` without arbitrary unpickling, and with errors that name the file
    (see the module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = getattr(self, "_checked_metadata", None)
        if metadata is None:
            path = Path(self.path)
            try:
                stat = (path / ".metadata").stat()
                version = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
            except OSError:
                version = None  # missing: _unpickle_metadata says so
            metadata = _checked_metadata(path, version)
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


def entry_problems(stored: dict, tensors: dict, whole_model: bool) -> dict[str, list[str]]:
    """What differs between the stored entries and `tensors` (nested as DCP flattens it), by
    part (model, optim, ...): a name missing or of another shape; with `whole_model`, a
    stored model weight left over too."""
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
        if extra:
            problems.setdefault("model", []).extend(f"{k} is not in this model" for k in extra)
    return dict(sorted(problems.items(), key=lambda p: p[0] != "model"))  # a model change first


def listed(found: list[str]) -> str:
    """The first three problems, and how many more."""
    more = f"; and {len(found) - 3} more" if len(found) > 3 else ""
    return f"{'; '.join(found[:3])}{more}"


def check_entries(path: Path, stored: dict, tensors: dict, whole_model: bool) -> None:
    """Every tensor of `tensors` (nested as DCP flattens it) stored under its name with its
    shape; with `whole_model`, no stored model weight left over either."""
    for part, found in entry_problems(stored, tensors, whole_model).items():
        fix = {
            "model": "make the model section match the checkpoint's config.yaml",
            "optim": f"the optimizer differs: take only the weights with train.init_from={path}",
        }.get(part, "the run does not match the checkpoint")
        raise CheckpointError(
            f"{path} does not fit this {'model' if part == 'model' else 'run'} "
            f"({listed(found)}): {fix}"
        )


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
