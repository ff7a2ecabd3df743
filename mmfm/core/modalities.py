"""Modalities: the six built in, and those a user registers with one call.

A registered modality is a framed span of codes from a codebook of its own, `<open> codes
<close>`, like DNA's. Its `ModalitySpec` says everything mmfm asks of it: its name (in shards,
manifests, metrics, loss weights and `--modality`), its delimiters and codebook (laid out after
the built-in ones in a vocabulary whose tokenizer recipe lists it under `modalities`), how a
value becomes codes and back, how a prepare source of its kind is read, and how a generated
span is written to a file. Every layer consults this registry instead of a list of its own;
adding a modality edits no mmfm file (docs/adding_a_modality.md).

Ids are per process: the built-in ones keep 0..5, registered ones take 6, 7, ... in
registration order. What is persisted names modalities (shard segments, manifests, vocab.json),
so a spawned worker gets the parent's specs (`restore`) and data naming a modality this
process lacks is refused by name, never read as another. Besides `register_modality`, the
entry points of the group `mmfm.modalities` (each a `ModalitySpec`, in name order) are
registered on first use, so the `mmfm` command and its workers see an installed plugin.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

ENTRY_POINTS = "mmfm.modalities"


class Modality(IntEnum):
    """The built-in modalities; their ids never change (a Megatron sidecar stores them)."""

    TEXT = 0
    IMAGE = 1
    MASK = 2
    DNA = 3
    SVG = 4
    VIDEO = 5


BUILTIN_NAMES = tuple(m.name.lower() for m in Modality)
_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    """Lower-case identifier (`protein`): the modality's name everywhere, and its codebook's."""
    delimiters: tuple[str, str]
    """The special tokens that open and close its spans, e.g. ("<protein>", "</protein>")."""
    codebook: int | tuple[str, ...]
    """Its codes: their readable names (one per code: piece `<protein_A>`), or their number
    (numbered pieces `<audio_0042>`)."""
    encode: Callable[[Any], Sequence[int]]
    """A value (a reader's, or a prompt part) -> its codes in [0, size); raise ValueError on a
    value it refuses (prepare counts the record as a tokenizer_error reject)."""
    decode: Callable[[list[int]], Any]
    """Codes -> the value (what `write` takes)."""
    read: Callable[[Path], Iterable[tuple]] | None = None
    """A raw file of a prepare source of this kind -> (key, value) or (key, value, text)
    tuples, text (or None) coming before the span; None: no prepare kind."""
    write: Callable[[Any, Path], Path] | None = None
    """(decoded value, path stem without suffix) -> the file it wrote (mmfm generate); None:
    `str(value)` in `<stem>.txt`."""
    kind: str = ""
    """The prepare source kind it reads; default: its name."""

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name) or self.name in BUILTIN_NAMES:
            raise ValueError(f"modality name {self.name!r}: a new lower-case identifier")
        if len(self.delimiters) != 2 or not all(_is_token(d) for d in self.delimiters):
            raise ValueError(f"modality {self.name}: delimiters must be two <tokens>")
        if self.size < 1 or len(set(self.pieces)) != len(self.pieces):
            raise ValueError(f"modality {self.name}: an empty codebook or repeated pieces")

    @property
    def size(self) -> int:
        return self.codebook if isinstance(self.codebook, int) else len(self.codebook)

    @property
    def pieces(self) -> tuple[str, ...]:
        return () if isinstance(self.codebook, int) else tuple(self.codebook)

    @property
    def source_kind(self) -> str:
        return self.kind or self.name


def _is_token(name: str) -> bool:
    return isinstance(name, str) and len(name) > 2 and name[0] == "<" and name[-1] == ">"


_REGISTERED: list[ModalitySpec] = []
_NAMES: list[tuple[str, ...]] = [BUILTIN_NAMES]  # cached: read for every shard segment
_LOADED: list[bool] = [False]


def register_modality(spec: ModalitySpec) -> int:
    """Register `spec` in this process and return its id; registering an equal spec again
    returns the same id. A name (or source kind) that is taken by another spec is refused."""
    _load_entry_points()
    return _add(spec)


def _add(spec: ModalitySpec) -> int:
    for i, other in enumerate(_REGISTERED):
        if other == spec:
            return len(Modality) + i
        if spec.name == other.name or spec.source_kind == other.source_kind:
            raise ValueError(f"modality {spec.name}: its name or kind is registered already")
    _REGISTERED.append(spec)
    _NAMES[0] = (*BUILTIN_NAMES, *(s.name for s in _REGISTERED))
    return len(_NAMES[0]) - 1


def unregister_modality(name: str) -> None:
    """Forget the registered modality `name` (tests, notebooks): the ids of those registered
    after it move down by one, so never while documents of theirs are in flight."""
    _REGISTERED[:] = [s for s in _REGISTERED if s.name != name]
    _NAMES[0] = (*BUILTIN_NAMES, *(s.name for s in _REGISTERED))


def registered() -> tuple[ModalitySpec, ...]:
    """The registered specs in id order (what a spawned worker passes to `restore`)."""
    _load_entry_points()
    return tuple(_REGISTERED)


def restore(specs: Sequence[ModalitySpec]) -> None:
    """Register `specs` (a parent's `registered()`) with the parent's ids, in a spawned child
    whose imports may have registered some of them already."""
    for spec in specs:
        register_modality(spec)
    assert registered()[: len(specs)] == tuple(specs), "modality ids differ from the parent's"


def modality_names() -> tuple[str, ...]:
    """Every modality's name by id: the built-in ones, then the registered ones."""
    _load_entry_points()
    return _NAMES[0]


def modality_spec(name: str) -> ModalitySpec | None:
    """The registered spec of `name`; None for a built-in or unknown name."""
    return next((s for s in registered() if s.name == name), None)


def kind_spec(kind: str) -> ModalitySpec | None:
    """The registered spec whose prepare source kind is `kind`, if any."""
    return next((s for s in registered() if s.read is not None and s.source_kind == kind), None)


def _load_entry_points() -> None:
    if _LOADED[0]:
        return
    _LOADED[0] = True
    for point in sorted(entry_points(group=ENTRY_POINTS), key=lambda p: p.name):
        spec = point.load()
        if not isinstance(spec, ModalitySpec):
            raise TypeError(f"entry point {point.name} ({point.value}) is not a ModalitySpec")
        _add(spec)


class ModalityNames(Sequence):
    """`modality_names()` as a sequence read at each use, so that code written against the
    built-in tuple (`len`, `in`, index, iteration) sees registered modalities too."""

    def __getitem__(self, index):
        return modality_names()[index]

    def __len__(self) -> int:
        return len(modality_names())

    def __contains__(self, name) -> bool:
        return name in modality_names()

    def __iter__(self):
        return iter(modality_names())

    def index(self, name, *args) -> int:
        return modality_names().index(name, *args)

    def __repr__(self) -> str:
        return repr(modality_names())


MODALITY_NAMES = ModalityNames()
