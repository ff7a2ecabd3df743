"""Megatron-LM indexed datasets (`.bin` + `.idx`) as a training source, read by megatron-core.

A source of `kind: megatron` names prefixes of `.bin`/`.idx` pairs, as Megatron-LM's
`tools/preprocess_data.py` writes them. megatron-core's `IndexedDataset` reads them (no
reader of the `.idx` layout of our own); it is imported only here, and only when such a
source is read, so the rest of mmfm never needs it (the extra `mmfm[megatron]`).

For the stream (stream.py) a prefix is cut into units of consecutive documents of its index
(`BLOCK_DOCS` documents, halved while they hold more than `BLOCK_TOKENS` tokens), each a URL
`megatron:<prefix>#<first>:<end>`. A unit's size comes from two document boundaries, two
sequence pointers and one length in the index (the `.bin` is contiguous), so every rank reads
a few entries of the index per unit to deal, not one per document, and then only the entries
and tokens of its own documents, as it reads only its own WebDataset shards. The deal, mixing
by token share, packing, exact and elastic resume and skip counts work as for shards with a
manifest (a slice of a unit is estimated as its share of the unit's documents). A document is
the index's document (its sequences, concatenated); all of it is text, unless the dataset
was written by `mmfm prepare` (`format: megatron`), whose sidecar `<prefix>.spans` (an
indexed dataset too, one item per document) gives each document's modality spans and no-loss
spans back. Bad data is counted as in shards: a document whose bytes lie past the end of the
`.bin` (`truncated_shard`), ids outside the vocabulary, boundaries that fall or run past
the sequences or a negative sequence length (`bad_sample`), an empty document (`empty`); an
index that cannot be read at all, whose dtype is not an integer type, or whose units'
boundaries are out of range, is one error naming the file.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from mmfm.core.errors import DataError, InputNotFound, LaunchError
from mmfm.core.types import Document, Modality
from mmfm.data.shards import file_kind

log = logging.getLogger("mmfm.data")

SCHEME = "megatron:"
BLOCK_DOCS = 1024
"""Documents per unit at most (a WebDataset shard of `mmfm prepare` holds 1000)."""
BLOCK_TOKENS = 1 << 22
"""Tokens per unit at most (a unit of one document may hold more)."""
SPANS = ".spans"
"""Suffix of the sidecar prefix: `<prefix>.spans.bin/.idx`, one int32 item per document:
`[n, modality_1, end_1, ..., modality_n, end_n, no_loss_start_1, no_loss_end_1, ...]`."""


def megatron_indexed():
    """megatron-core's `indexed_dataset` module; LaunchError naming the extra when missing."""
    try:
        with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed"
            warnings.simplefilter("ignore")
            from megatron.core.datasets import indexed_dataset
    except ImportError as e:
        raise LaunchError(
            f"Megatron indexed datasets are read by megatron-core, which is not installed "
            f"({e}): pip install 'mmfm[megatron]' (in a checkout: pip install -e '.[megatron]'; "
            "megatron-core>=0.16, of which 0.16 is the last for Python 3.11)"
        ) from None
    logging.getLogger("megatron.core.datasets.indexed_dataset").setLevel(logging.WARNING)
    return indexed_dataset


def _strip(path: str) -> str:
    return path[:-4] if path.endswith((".bin", ".idx")) else path


def expand_prefixes(paths: Sequence[str]) -> list[str]:
    """Prefixes of `.bin`/`.idx` pairs from prefixes (with or without `.bin`/`.idx`),
    directories (every pair inside) and globs; sidecars of spans are not data."""
    prefixes: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "*.idx")))
        elif any(c in path for c in "*?["):
            found = sorted(glob.glob(path))
        else:
            found = [path]
        found = [_strip(p) for p in found if not _strip(p).endswith(SPANS)]
        for prefix in dict.fromkeys(found):
            kinds = {prefix + e: file_kind(prefix + e) for e in (".bin", ".idx")}
            if odd := [
                f"{p} is {kind}" for p, kind in kinds.items() if kind not in ("", "missing")
            ]:
                raise InputNotFound(
                    f"data.sources paths {path!r}: {', '.join(odd)}, not a regular file"
                )
            if missing := [p for p, kind in kinds.items() if kind]:
                raise InputNotFound(
                    f"data.sources paths {path!r}: no {' or '.join(missing)} "
                    "(a megatron source names the prefix of a .bin/.idx pair)"
                )
            prefixes.append(prefix)
        if not found:
            raise InputNotFound(f"data.sources paths {path!r}: no .bin/.idx pair matches")
    return prefixes


def _version(prefix: str) -> tuple:
    """What the caches below are keyed on besides the prefix: the files' size and mtime."""
    stats = [os.stat(prefix + e) for e in (".bin", ".idx")]
    return tuple((s.st_size, s.st_mtime_ns) for s in stats)


@functools.lru_cache(maxsize=64)
def _open(prefix: str, version: tuple):
    """megatron-core's dataset of `prefix`, once per process; DataError if its index cannot
    be read or does not hang together."""
    if version[0][0] == 0:  # numpy cannot map it, and megatron-core's reader then fails twice
        raise DataError(f"Megatron dataset {prefix}.bin is empty: rebuild {prefix}.bin/.idx")
    try:
        dataset = _construct(megatron_indexed().IndexedDataset, prefix)
        ends = dataset.document_indices  # the ends only: a rank reads its own documents
        if len(ends) < 1 or ends[0] != 0 or ends[-1] != len(dataset):
            raise ValueError("its document indices do not run from 0 to its sequences")
        if not np.issubdtype(dataset.index.dtype, np.integer):  # ids read as floats: all 0
            raise ValueError(f"its dtype code says {dataset.index.dtype.__name__}, not token ids")
    except (AssertionError, ValueError, OSError, TypeError, KeyError, OverflowError) as e:
        raise DataError(
            f"Megatron index {prefix}.idx cannot be read ({type(e).__name__}: {e}): it is "
            "damaged or not an MMIDIDX index; rebuild it (tools/preprocess_data.py or mmfm "
            "prepare with format: megatron)"
        ) from None
    _check_bin(prefix, dataset, version[0][0])
    return dataset


def _construct(cls, prefix: str):
    """`cls(prefix, mmap=True)`; if that fails, the half-built object gets the attributes its
    `__del__` deletes, which would otherwise print a second traceback after mmfm's one line."""
    dataset = cls.__new__(cls)
    try:
        dataset.__init__(prefix, mmap=True)
    except BaseException:
        for name in ("bin_reader", "index"):
            if not hasattr(dataset, name):
                setattr(dataset, name, None)
        raise
    return dataset


def _check_bin(prefix: str, dataset, bin_bytes: int) -> None:
    """Warn when the `.bin` holds more than its index points at (a cut `.bin`, the other
    mismatch, costs the documents past its end: counted when they are read)."""
    index = dataset.index
    if not len(index):
        return
    end = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
    if bin_bytes > end:
        log.warning(
            "%s.bin holds %d bytes past the last document of %s.idx: are they a pair?",
            prefix,
            bin_bytes - end,
            prefix,
        )


def open_dataset(prefix: str):
    return _open(prefix, _version(prefix))


def _tokens_between(dataset, first: int, end: int) -> int:
    """Tokens of documents [first, end) from two boundaries and two pointers: sequences are
    contiguous in the `.bin`, so no length of a document in between is read."""
    index = dataset.index
    s0, s1 = int(index.document_indices[first]), int(index.document_indices[end])
    if not (0 <= s0 <= len(index) and 0 <= s1 <= len(index)):
        raise ValueError(f"documents {first}:{end} span sequences {s0}:{s1} of {len(index)}")
    if s1 <= s0:
        return 0
    start, last = int(index.sequence_pointers[s0]), int(index.sequence_pointers[s1 - 1])
    return max(0, (last - start) // index.dtype_size + int(index.sequence_lengths[s1 - 1]))


def _cut(dataset, first: int, end: int) -> list[tuple[int, int, int]]:
    """(first, end, tokens) of the units of documents [first, end): halved while a unit of
    more than one document holds more than `BLOCK_TOKENS` tokens."""
    tokens = _tokens_between(dataset, first, end)
    if tokens <= BLOCK_TOKENS or end - first == 1:
        return [(first, end, tokens)]
    middle = (first + end) // 2
    return _cut(dataset, first, middle) + _cut(dataset, middle, end)


@functools.lru_cache(maxsize=64)
def _units(prefix: str, version: tuple) -> tuple[tuple[int, int, int], ...]:
    """(first, end, tokens) of every unit of `prefix`."""
    dataset = _open(prefix, version)
    n = len(dataset.document_indices) - 1
    blocks = [(a, min(a + BLOCK_DOCS, n)) for a in range(0, n, BLOCK_DOCS)]
    try:
        return tuple(unit for a, b in blocks for unit in _cut(dataset, a, b))
    except ValueError as e:
        raise DataError(
            f"Megatron index {prefix}.idx cannot be read ({e}): it is damaged; rebuild it"
        ) from None


def unit_urls(paths: Sequence[str]) -> list[str]:
    """The units of the prefixes `paths` name (see the module docstring)."""
    return [
        f"{SCHEME}{prefix}#{first}:{end}"
        for prefix in expand_prefixes(paths)
        for first, end, _ in _units(prefix, _version(prefix))
    ]


def is_unit(url: str) -> bool:
    return url.startswith(SCHEME)


def _parse(url: str) -> tuple[str, int, int]:
    prefix, _, span = url[len(SCHEME) :].rpartition("#")
    first, end = span.split(":")
    return prefix, int(first), int(end)


def unit_sizes(urls: Sequence[str]) -> list[tuple[int, int]]:
    """(documents, tokens) of every unit (the deal's sizes), from their boundaries alone."""
    sizes, known = [], {}
    for url in urls:
        prefix, first, end = _parse(url)
        if prefix not in known:
            known[prefix] = {(a, b): n for a, b, n in _units(prefix, _version(prefix))}
        tokens = known[prefix].get((first, end))
        if tokens is None:  # not a unit of today's index: size it all the same
            tokens = _tokens_between(open_dataset(prefix), first, end)
        sizes.append((end - first, tokens))
    return sizes


class Counter(Protocol):
    """What the reader reports skips to (stream.Skips)."""

    good: int

    def skip(self, reason: str, url: str, key: str, detail: str, n: int = 1) -> None: ...


def read_unit(
    url: str, k: int, j: int, skip: int, skips: Counter, vocab_size: int = 0
) -> Iterator[tuple[int, Document]]:
    """(position in the unit, document) of documents j, j + k, ... of unit `url` from
    position `skip` on; bad ones are counted in `skips` and not given."""
    prefix, first, end = _parse(url)
    dataset = open_dataset(prefix)
    sidecar = all(os.path.isfile(prefix + SPANS + e) for e in (".bin", ".idx"))
    spans = open_dataset(prefix + SPANS) if sidecar else None
    name = Path(prefix).name
    for index in range(first + j + skip * k, end, k):
        key = f"{name}:{index}"
        try:
            doc = _document(dataset, spans, index, key, name, vocab_size)
        except _Bad as e:
            skips.skip(e.reason, url, key, str(e))
            continue
        skips.good += 1
        yield (index - first) // k, doc


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _tokens(dataset, index: int) -> np.ndarray:
    s0, s1 = dataset.document_indices[index : index + 2].tolist()
    if not 0 <= s0 <= s1 <= len(dataset):
        raise _Bad(
            "bad_sample",
            f"its boundaries in the index, sequences {s0}:{s1} of {len(dataset)}, fall or run "
            "past the end (a damaged .idx)",
        )
    lengths = dataset.index.sequence_lengths[s0:s1]
    if s1 > s0 and int(lengths.min()) < 0:
        # megatron-core would read a length of -1 as "the rest of the .bin"
        raise _Bad("bad_sample", "a negative sequence length in the index (a damaged .idx)")
    try:
        if s1 == s0 + 1:  # one sequence, the common case: no split
            return dataset[s0].astype(np.int64)
        parts = dataset[s0:s1] if s1 > s0 else []
    except ValueError as e:  # numpy: the index points past the end of the .bin
        raise _Bad("truncated_shard", f"the .bin ends before this document ({e})") from None
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _document(dataset, spans, index: int, key: str, name: str, vocab_size: int) -> Document:
    tokens = _tokens(dataset, index)
    if len(tokens) == 0:
        raise _Bad("empty", "a document without tokens")
    if vocab_size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
        raise _Bad(
            "bad_sample",
            f"{len(bad)} token id(s) outside the vocabulary (first {int(bad[0])}, "
            f"model.vocab_size={vocab_size}): the dataset was tokenized with another vocabulary",
        )
    if spans is None:
        return Document(tokens, np.full(len(tokens), Modality.TEXT, np.uint8), key, name)
    modality, no_loss = _spans(spans, index, len(tokens))
    return Document(tokens, modality, key, name, no_loss)


def _spans(spans, index: int, n: int) -> tuple[np.ndarray, tuple[tuple[int, int], ...]]:
    """The modality of every token and the no-loss spans of document `index` (sidecar); the
    entries are a few numbers each, checked in plain Python (numpy costs more per call)."""
    try:
        item = spans[index].tolist()
    except (IndexError, ValueError) as e:
        raise _Bad("bad_sample", f"its {SPANS} sidecar entry is unreadable ({e})") from None
    runs = item[0] if item else 0
    pairs, rest = item[1 : 1 + 2 * runs], item[1 + 2 * runs :]
    codes, ends = pairs[0::2], pairs[1::2]
    no_loss = tuple(zip(rest[0::2], rest[1::2], strict=False))
    lengths = [b - a for a, b in zip([0, *ends], ends, strict=False)]
    ok = runs > 0 and len(pairs) == 2 * runs and len(rest) % 2 == 0 and ends[-1] == n
    ok = ok and min(lengths) > 0
    ok = ok and all(c in _CODES for c in codes) and all(0 <= a <= b <= n for a, b in no_loss)
    if not ok:
        raise _Bad("bad_sample", f"its {SPANS} sidecar entry does not tile its {n} tokens")
    return np.repeat(np.asarray(codes, np.uint8), lengths), no_loss


_CODES = frozenset(int(m) for m in Modality)


def spans_item(doc: Document) -> np.ndarray:
    """The sidecar item of `doc` (`SPANS`): its modality runs, then its no-loss spans."""
    change = np.flatnonzero(np.diff(doc.modality)) + 1
    ends = np.append(change, len(doc.modality))
    runs = np.stack([doc.modality[ends - 1].astype(np.int64), ends], axis=1).ravel()
    no_loss = np.asarray(doc.no_loss, dtype=np.int64).ravel()
    return np.concatenate([[len(ends)], runs, no_loss]).astype(np.int32)
