"""Pre-tokenized documents in WebDataset tar shards.

One sample per document: `<key>.tokens.npy` (int32 token ids) and `<key>.json`
(`{"segments": [[modality, start, end], ...], "source": ...}`), where the segments tile the
document and name the modality of each span. Only these two members are decoded, with
`numpy.load(allow_pickle=False)` and `json`: a shard can never make the reader unpickle.
"""

from __future__ import annotations

import io
import json
import os
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
    """The sample's key in its shard (its original id)."""
    source: str = ""
    """Where the document came from (corpus name or file)."""

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


def encode_sample(doc: Document) -> dict:
    buf = io.BytesIO()
    np.save(buf, np.asarray(doc.tokens, dtype=np.int32), allow_pickle=False)
    meta = {"segments": doc.segments(), "source": doc.source}
    return {"__key__": doc.key, "tokens.npy": buf.getvalue(), "json": json.dumps(meta).encode()}


def decode_sample(sample: dict, url: str) -> Document:
    key = sample.get("__key__", "?")
    where = f"shard {url}, sample {key!r}"
    if "tokens.npy" not in sample or "json" not in sample:
        raise ShardError(f"{where}: needs members tokens.npy and json, has {sorted(sample)}")
    try:
        tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
        meta = json.loads(sample["json"])
    except (ValueError, OSError) as e:
        raise ShardError(f"{where}: cannot decode: {e}") from e
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ShardError(f"{where}: tokens.npy must be a 1-D integer array, got {tokens.dtype}")
    modality = np.full(len(tokens), 255, dtype=np.uint8)
    for name, start, end in meta.get("segments", []):
        if name not in MODALITY_NAMES or not 0 <= start <= end <= len(tokens):
            raise ShardError(f"{where}: bad segment {[name, start, end]}")
        modality[start:end] = Modality[name.upper()]
    if (modality == 255).any():
        raise ShardError(f"{where}: segments do not cover all {len(tokens)} tokens")
    return Document(tokens.astype(np.int64), modality, key, meta.get("source", ""))


def write_shard(path: str | Path, docs: Sequence[Document]) -> None:
    """Write `docs` to one tar, atomically (temporary name, then rename).

    The temporary name is per process, so ranks that write the same shard at once (e.g. a
    generated corpus) never rename each other's half-written file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with wds.TarWriter(str(tmp), encoder=False) as sink:
        for doc in docs:
            sink.write(encode_sample(doc))
    os.replace(tmp, path)


def check_tar_end(path: str) -> None:
    """Raise if a local tar does not end with the end-of-archive blocks.

    Python's tarfile (and so webdataset) treats a header cut off by truncation as the end of
    the archive and silently drops the rest; the two zero blocks every writer appends at the
    end are what tells a complete shard from a truncated one.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        tail = f.read()
    if size % 512 or tail != bytes(1024):
        raise ShardError(
            f"shard {path} is truncated or not a tar file ({size} bytes, no end-of-archive "
            "blocks); rewrite or remove it"
        )


def read_shard(url: str, skip: int = 0) -> Iterator[Document]:
    """Documents of one shard (local path, `http(s)://` or `pipe:`), after the first `skip`.

    Local shards are checked for truncation first; streamed ones cannot be checked here.
    """
    if os.path.isfile(url):
        check_tar_end(url)
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
