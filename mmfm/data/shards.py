"""Pre-tokenized documents in WebDataset tar shards.

One sample per document: `<key>.tokens.npy` (token ids, uint16 when the ids fit, else int32)
and `<key>.json` (`{"segments": [[modality, start, end], ...], "source": ..., "id": ...,
"no_loss": [[start, end], ...]}`), where the segments tile the document and name the modality
of each span, `id` is the document's original id and `no_loss` (optional) marks tokens that
are never targets (prompts, instructions). Only these two members are decoded: the token array
as a view of the member's bytes after numpy's .npy header reader (a shard can never make the
reader unpickle, nor allocate what a header claims beyond the member's bytes) and the json with
`json`. The json ends with `"crc32"`, a CRC-32 of both members, so a damaged sample is
counted, not trained on.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import stat
import tokenize
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.lib.format as npy_format
import webdataset as wds

from mmfm.core.errors import DataError
from mmfm.core.types import MODALITY_NAMES, Document
from mmfm.data.tario import Damage, read_tar

log = logging.getLogger("mmfm.data")


class ShardError(DataError):
    """A shard or one of its samples cannot be read; the message names the shard and key."""

    reason = "bad_sample"
    """The skip reason (skips.py) a stream counts it under."""


class MissingMembers(ShardError):
    """A sample without the members of a prepared document (tokens.npy and json)."""

    reason = "missing_field"


def encode_sample(doc: Document, sample_key: str | None = None) -> dict:
    """The tar members of `doc`; `sample_key` names them (default: the document id, which
    must then be a safe file name without dots). The json ends with a CRC-32 of both members,
    so a damaged sample is told from a good one."""
    buf = io.BytesIO()
    tokens = np.asarray(doc.tokens)
    small = tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < 2**16)
    np.save(buf, tokens.astype(np.uint16 if small else np.int32), allow_pickle=False)
    meta = {"segments": doc.segments(), "source": doc.source, "id": doc.key}
    if doc.no_loss:
        meta["no_loss"] = [list(span) for span in doc.no_loss]
    body = json.dumps(meta).encode()
    crc = zlib.crc32(body, zlib.crc32(buf.getvalue()))
    return {
        "__key__": sample_key or doc.key,
        "tokens.npy": buf.getvalue(),
        "json": body[:-1] + b', "crc32": "%08x"}' % crc,
    }


_CRC_TAIL = re.compile(rb', "crc32": "([0-9a-f]{8})"\}$')


def _check_crc(raw_tokens: bytes, raw_meta: bytes) -> None:
    """Raise ValueError when the sample's CRC-32 (if it has one) does not match."""
    match = _CRC_TAIL.search(raw_meta)
    if match is None:
        return  # written before samples carried one
    body = raw_meta[: match.start()] + b"}"
    if zlib.crc32(body, zlib.crc32(raw_tokens)) != int(match.group(1), 16):
        raise ValueError("its CRC-32 does not match (the sample is damaged)")


_NPY_HEADER = re.compile(
    r"\{'descr': '(<u2|<i4|<i8|<u4)', 'fortran_order': False, 'shape': \((\d+),\), \}\s*"
)


def load_tokens(raw: bytes) -> np.ndarray:
    """A 1-D integer .npy array, as a view of `raw`: nothing is allocated from what the header
    claims, and a header that claims other than the bytes after it is a ValueError (a shape of
    10^13 would otherwise be an 18 TiB allocation)."""
    dtype, count, offset = _npy_header(raw)
    if dtype.kind not in "iu":
        raise ValueError(f"tokens.npy must be a 1-D integer array, its header says {dtype}")
    if count < 0 or count * dtype.itemsize != len(raw) - offset:
        raise ValueError(
            f"the tokens.npy header claims {count} values of {dtype}, the member holds "
            f"{len(raw) - offset} bytes after it"
        )
    return np.frombuffer(raw, dtype, count, offset)


def _npy_header(raw: bytes) -> tuple[np.dtype, int, int]:
    """(dtype, length, data offset) of a 1-D .npy array's header: the common layouts by a
    match (numpy's parser takes a third of the decode time), the rest by numpy's reader, its
    every error a ValueError (an unterminated header raises tokenize's TokenError there)."""
    if raw[:8] == b"\x93NUMPY\x01\x00":
        size = int.from_bytes(raw[8:10], "little")
        match = _NPY_HEADER.fullmatch(raw[10 : 10 + size].decode("latin1"))
        if match:
            return np.dtype(match.group(1)), int(match.group(2)), 10 + size
    source = io.BytesIO(raw)
    try:
        version = npy_format.read_magic(source)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(source)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(source)
        else:
            raise ValueError(f"tokens.npy is .npy version {version}, not 1.0 or 2.0")
    except (SyntaxError, tokenize.TokenError, RecursionError) as e:
        raise ValueError(f"the tokens.npy header cannot be parsed ({type(e).__name__})") from e
    if len(shape) != 1:
        raise ValueError(f"tokens.npy must be a 1-D integer array, its header says shape {shape}")
    return dtype, shape[0], source.tell()


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _modality(meta: dict, n: int) -> np.ndarray:
    """The modality of every token from the segments; ValueError unless they tile [0, n)."""
    segments = meta.get("segments", [])
    if not isinstance(segments, list):
        raise ValueError(f"segments must be a list, got {type(segments).__name__}")
    covered = 0
    modality = np.empty(n, dtype=np.uint8)
    ids = {name: i for i, name in enumerate(MODALITY_NAMES)}  # with the registered ones
    for segment in segments:
        ok = isinstance(segment, list) and len(segment) == 3
        name, start, end = segment if ok else (None, None, None)
        if ok and isinstance(name, str) and name not in ids:
            raise ValueError(
                f"segment of modality {name!r}, which is not registered in this process: "
                "import the module that registers it (register_modality)"
            )
        if not (ok and name in ids and _int(start) and _int(end)) or not (
            start == covered and start <= end <= n
        ):
            raise ValueError(f"bad segment {segment!r} (segments must tile the document in order)")
        modality[start:end] = ids[name]
        covered = end
    if covered != n:
        raise ValueError(f"segments do not cover all {n} tokens")
    return modality


def _no_loss(meta: dict, n: int) -> tuple[tuple[int, int], ...]:
    spans = meta.get("no_loss", [])
    if not isinstance(spans, list) or not all(
        isinstance(s, list) and len(s) == 2 and all(map(_int, s)) and 0 <= s[0] <= s[1] <= n
        for s in spans
    ):
        raise ValueError(f"no_loss must be a list of [start, end] token spans, got {spans!r}")
    return tuple((a, b) for a, b in spans)


def decode_sample(sample: dict, url: str, vocab_size: int = 0) -> Document:
    """The document of one sample; ShardError naming the shard and key if it is bad in any
    way, including token ids outside `[0, vocab_size)` when `vocab_size` is given."""
    key = sample.get("__key__", "?")
    try:
        raw_tokens, raw_meta = sample["tokens.npy"], sample["json"]
    except KeyError:
        raise MissingMembers(
            f"shard {url}, sample {key!r}: needs members tokens.npy and json, has "
            f"{sorted(k for k in sample if k != '__key__')}"
        ) from None
    try:
        _check_crc(raw_tokens, raw_meta)
        tokens = load_tokens(raw_tokens)
        meta = json.loads(raw_meta)
        if not isinstance(meta, dict):
            raise ValueError(f"the json must be an object, got {type(meta).__name__}")
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"tokens.npy must be a 1-D integer array, got {tokens.dtype}")
        n = len(tokens)
        modality, no_loss = _modality(meta, n), _no_loss(meta, n)
        doc_id, source = meta.get("id", key), meta.get("source", "")
        if not isinstance(doc_id, (str, int)) or not isinstance(source, str):
            raise ValueError("id and source must be strings")
        if vocab_size and n and (tokens.min() < 0 or tokens.max() >= vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
            raise ValueError(
                f"{len(bad)} token id(s) outside the vocabulary (first {int(bad[0])}, "
                f"model.vocab_size={vocab_size}): the shard was made with another vocabulary"
            )
    except (ValueError, OSError, TypeError, RecursionError) as e:
        raise ShardError(f"shard {url}, sample {key!r}: cannot decode: {e}") from e
    return Document(tokens.astype(np.int64), modality, str(doc_id), source, no_loss)


def write_shard(path: str | Path, docs: Sequence[Document]) -> None:
    """Write `docs` to one tar, atomically (temporary name, then rename), byte-reproducibly
    (fixed modification times; sample keys are ordinals, the ids live in the json).

    The temporary name is per process, so ranks that write the same shard at once (e.g. a
    generated corpus) never rename each other's half-written file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with wds.TarWriter(str(tmp), encoder=False, mtime=0) as sink:
        for i, doc in enumerate(docs):
            sink.write(encode_sample(doc, f"{i:07d}"))
    os.replace(tmp, path)


class DamagedShard(ShardError):
    """A shard cut short or damaged; `reason` is the skip reason it is counted under."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def read_shard(url: str, skip: int = 0, timeout_s: float = 300.0) -> Iterator[Document]:
    """Documents of one shard (local path, `http(s)://` or `pipe:`), after the first `skip`;
    ShardError at the first bad sample and DamagedShard where the shard is damaged or cut."""
    for index, sample in enumerate(_strict(url, timeout_s)):
        if index >= skip:
            yield decode_sample(sample, url)


def _strict(url: str, timeout_s: float) -> Iterator[dict]:
    """The samples, one behind, so that damage is named before the sample it cut short."""
    held = None
    for item in read_tar(url, timeout_s):
        if isinstance(item, Damage):
            raise DamagedShard(item.detail, item.reason)
        if held is not None:
            yield held
        held = item
    if held is not None:
        yield held


@functools.lru_cache(maxsize=64)
def _warn_once(message: str) -> None:
    log.warning("%s", message)


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """Shard URLs from files, directories (every *.tar inside), brace patterns and URLs.

    Only regular files (or links to them) are shards: a FIFO or a device would block or never
    end (opening a FIFO blocks in the kernel, where no signal reaches), so one named as a
    shard is refused and those in a directory are skipped, each named in a warning."""
    urls: list[str] = []
    for pattern in patterns:
        for url in wds.shardlists.expand_urls(pattern):
            if "://" in url or url.startswith("pipe:"):
                urls.append(url)
            elif Path(url).is_dir():
                urls.extend(_directory_shards(url))
            elif (kind := file_kind(url)) == "":
                urls.append(url)
            elif kind == "missing":
                raise ShardError(f"data.paths: shard {url} (from {pattern!r}) does not exist")
            else:
                raise ShardError(
                    f"data.paths: shard {url} (from {pattern!r}) is {kind}, not a regular file: "
                    "name tar files (or a pipe: command)"
                )
    return urls


def _directory_shards(directory: str) -> list[str]:
    """The regular *.tar files of a directory; the others are named in a warning."""
    found, others = [], []
    for path in sorted(str(p) for p in Path(directory).glob("*.tar")):
        kind = file_kind(path)
        if kind == "":
            found.append(path)
        else:
            others.append(f"{path} ({kind})")
    if not found:
        also = f" (skipped, not regular files: {', '.join(others)})" if others else ""
        raise ShardError(f"data.paths: directory {directory} holds no *.tar shards{also}")
    if others:  # once: the paths are expanded more than once (vocabulary checks, the loader)
        _warn_once(
            f"data.paths: skipped {len(others)} entries of {directory} that are not regular "
            f"files: {', '.join(others)}"
        )
    return found


_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def file_kind(path: str) -> str:
    """ "" for a regular file (or a link to one), "missing", else what it is ("a FIFO", ...);
    from `os.stat`, which never opens it (opening a FIFO blocks)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return "missing"
    if stat.S_ISREG(mode):
        return ""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")
