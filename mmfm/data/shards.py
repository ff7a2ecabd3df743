"""Pre-tokenized documents in WebDataset tar shards.

One sample per document: `<key>.tokens.npy` (token ids, uint16 when the ids fit, else int32)
and `<key>.json` (`{"segments": [[modality, start, end], ...], "source": ..., "id": ...,
"no_loss": [[start, end], ...]}`), where the segments tile the document and name the modality
of each span, `id` is the document's original id and `no_loss` (optional) marks tokens that
are never targets (prompts, instructions). Only these two members are decoded, with
`numpy.load(allow_pickle=False)` and `json`: a shard can never make the reader unpickle.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from mmfm.data.batch import MODALITY_NAMES, Modality


class ShardError(RuntimeError):
    """A shard or one of its samples cannot be read; the message names the shard and key."""


@dataclass(frozen=True)
class Document:
    tokens: np.ndarray
    """Token ids, int32 `[n]`."""
    modality: np.ndarray
    """`Modality` of every token, uint8 `[n]`."""
    key: str
    """The document's original id."""
    source: str = ""
    """Where the document came from (corpus name or file)."""
    no_loss: tuple[tuple[int, int], ...] = ()
    """Token spans `[start, end)` that are never targets (e.g. a prompt)."""

    def segments(self) -> list[list]:
        """Runs of equal modality as `[name, start, end]`."""
        if len(self.modality) == 0:
            return []
        change = np.flatnonzero(np.diff(self.modality)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(self.modality)]])
        return [
            [MODALITY_NAMES[self.modality[s]], int(s), int(e)]
            for s, e in zip(starts, ends, strict=True)
        ]


def encode_sample(doc: Document, sample_key: str | None = None) -> dict:
    """The tar members of `doc`; `sample_key` names them (default: the document id, which
    must then be a safe file name without dots)."""
    buf = io.BytesIO()
    tokens = np.asarray(doc.tokens)
    small = tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < 2**16)
    np.save(buf, tokens.astype(np.uint16 if small else np.int32), allow_pickle=False)
    meta = {"segments": doc.segments(), "source": doc.source, "id": doc.key}
    if doc.no_loss:
        meta["no_loss"] = [list(span) for span in doc.no_loss]
    return {
        "__key__": sample_key or doc.key,
        "tokens.npy": buf.getvalue(),
        "json": json.dumps(meta).encode(),
    }


_NPY_HEADER = re.compile(
    r"\{'descr': '(<u2|<i4|<i8|<u4)', 'fortran_order': False, 'shape': \((\d+),\), \}\s*"
)


def load_tokens(raw: bytes) -> np.ndarray:
    """A 1-D integer .npy array; the common layouts without numpy's general header parser
    (a third of the decode time), anything else through `np.load(allow_pickle=False)`."""
    if raw[:8] == b"\x93NUMPY\x01\x00":
        size = int.from_bytes(raw[8:10], "little")
        match = _NPY_HEADER.fullmatch(raw[10 : 10 + size].decode("latin1"))
        if match:
            count = int(match.group(2))
            return np.frombuffer(raw, np.dtype(match.group(1)), count, offset=10 + size)
    return np.load(io.BytesIO(raw), allow_pickle=False)


_MODALITY = {name: Modality[name.upper()] for name in MODALITY_NAMES}


def decode_sample(sample: dict, url: str) -> Document:
    try:
        raw_tokens, raw_meta = sample["tokens.npy"], sample["json"]
    except KeyError:
        key = sample.get("__key__", "?")
        raise ShardError(
            f"shard {url}, sample {key!r}: needs members tokens.npy and json, has {sorted(sample)}"
        ) from None
    try:
        tokens = load_tokens(raw_tokens)
        meta = json.loads(raw_meta)
    except (ValueError, OSError) as e:
        raise ShardError(
            f"shard {url}, sample {sample.get('__key__')!r}: cannot decode: {e}"
        ) from e
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise ShardError(
            f"shard {url}, sample {sample.get('__key__')!r}: tokens.npy must be a 1-D integer "
            f"array, got {tokens.dtype}"
        )
    n = len(tokens)
    segments = meta.get("segments", [])
    covered = 0
    modality = np.empty(n, dtype=np.uint8)
    for name, start, end in segments:
        if name not in _MODALITY or start != covered or not start <= end <= n:
            raise ShardError(
                f"shard {url}, sample {sample.get('__key__')!r}: bad segment {[name, start, end]} "
                f"(segments must tile the document in order)"
            )
        modality[start:end] = _MODALITY[name]
        covered = end
    if covered != n:
        raise ShardError(
            f"shard {url}, sample {sample.get('__key__')!r}: segments do not cover all {n} tokens"
        )
    no_loss = tuple((int(a), int(b)) for a, b in meta.get("no_loss", ()))
    doc_id = meta.get("id", sample.get("__key__", "?"))
    return Document(tokens.astype(np.int64), modality, doc_id, meta.get("source", ""), no_loss)


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
    """A local shard that tarfile would silently cut short; `reason` says how."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _header_size(block: bytes, path: str, offset: int) -> int:
    """The member size of a 512-byte tar header, after checking its checksum."""
    stored = block[148:156].split(b"\0", 1)[0].strip()
    computed = sum(block) - sum(block[148:156]) + 8 * 32  # the checksum field counts as spaces
    try:
        ok = stored and int(stored, 8) == computed
        raw = block[124:136]
        size = (
            int.from_bytes(raw[1:], "big") if raw[0] & 0x80 else int(raw.strip(b"\0 ") or b"0", 8)
        )
    except ValueError:
        ok = False
    if not ok:
        raise DamagedShard(
            f"shard {path} has a damaged tar header at byte {offset}; rewrite it", "corrupt_shard"
        )
    return size


def check_tar(path: str) -> None:
    """Raise DamagedShard unless every header of a local tar is valid up to the end blocks.

    Python's tarfile (and so webdataset) treats a truncated file or a damaged header after the
    first as the end of the archive and silently drops the rest; walking the headers (512
    bytes each, checksums checked, the data skipped) tells a complete shard from a damaged one.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        offset = 0
        while True:
            block = f.read(512)
            if len(block) < 512:
                raise DamagedShard(
                    f"shard {path} is truncated at byte {offset} of {size} (no end-of-archive "
                    "blocks); rewrite or remove it",
                    "truncated_shard",
                )
            if block == bytes(512):
                return
            offset += 512 + -(-_header_size(block, path, offset) // 512) * 512
            f.seek(offset)


def read_shard(url: str, skip: int = 0) -> Iterator[Document]:
    """Documents of one shard (local path, `http(s)://` or `pipe:`), after the first `skip`.

    Local shards are checked for truncation first; streamed ones cannot be checked here.
    """
    if os.path.isfile(url):
        check_tar(url)
    stream = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())
    try:
        for index, sample in enumerate(stream):
            if index >= skip:
                yield decode_sample(sample, url)
    except ShardError:
        raise
    except Exception as e:  # tarfile, gzip, IO errors: name the shard
        raise ShardError(f"shard {url}: {type(e).__name__}: {e}") from e


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """Shard URLs from files, directories (every *.tar inside), brace patterns and URLs."""
    urls: list[str] = []
    for pattern in patterns:
        for url in wds.shardlists.expand_urls(pattern):
            if "://" in url or url.startswith("pipe:"):
                urls.append(url)
            elif Path(url).is_dir():
                found = sorted(str(p) for p in Path(url).glob("*.tar"))
                if not found:
                    raise ShardError(f"data.paths: directory {url} holds no *.tar shards")
                urls.extend(found)
            elif Path(url).is_file():
                urls.append(url)
            else:
                raise ShardError(f"data.paths: shard {url} (from {pattern!r}) does not exist")
    return urls
