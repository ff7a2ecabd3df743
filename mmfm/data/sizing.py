"""Shard sizes, known before reading: the tokens of every shard of a source, so the deal
(deal.py) can give every stream the same share. From the `manifest.json` of `mmfm prepare`,
else one pass over a local tar's headers; shards whose size cannot be known cheaply
(`http://`, `pipe:` or `.tar.gz` without a manifest) count as equal; raw shards tokenized in
the stream (raw_stream.py) by the bytes of the members read, from local uncompressed tars'
headers; Megatron indexed datasets from their index."""

from __future__ import annotations

import functools
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmfm.data.manifest import shard_record
from mmfm.data.megatron import is_unit, unit_sizes
from mmfm.data.raw_stream import raw_sizes


def _key(name: str) -> str:
    """The sample a tar member belongs to, as webdataset groups them (up to the first dot)."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}"


@dataclass(frozen=True, eq=False)
class ShardSize:
    """What is known of a shard before reading it."""

    samples: int
    """-1 where unknown."""
    tokens: float
    """In one unit for the whole source (tokens, or bytes of token arrays)."""
    per_sample: np.ndarray | None = None
    """Each sample's size, where the tar headers were read."""

    def slice(self, k: int, j: int) -> float:
        """The size of samples j, j + k, j + 2k, ..."""
        if self.per_sample is not None:
            return float(self.per_sample[j::k].sum())
        if self.samples > 0:
            return self.tokens * len(range(j, self.samples, k)) / self.samples
        return self.tokens / k


COMPRESSED = (".gz", ".tgz")
"""Shards the tar reader decompresses (gzip, by the name)."""


@functools.lru_cache(maxsize=4096)
def _tar_size(path: str, size: int, mtime_ns: int) -> ShardSize:
    """Bytes of every sample's token array of a local tar, from its headers alone (the data
    is skipped); a damaged tar gives what precedes the damage (the reader counts the rest)."""
    sizes: list[int] = []
    last = None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key = _key(member.name)
                if key != last:
                    sizes.append(0)
                    last = key
                if member.name.endswith(".tokens.npy"):
                    sizes[-1] += member.size
    except (tarfile.TarError, OSError, EOFError):
        pass
    per_sample = np.asarray(sizes, dtype=np.float64)
    return ShardSize(len(sizes), float(per_sample.sum()), per_sample)


def _listed(url: str) -> ShardSize | None:
    """The size of a shard by the manifest beside it, None where it lists none."""
    entry = shard_record(url)
    try:
        return ShardSize(int(entry["samples"]), float(entry["tokens"]))
    except (KeyError, TypeError, ValueError):
        return None


def shard_sizes(urls: Sequence[str], members: tuple[str, ...] = ()) -> list[ShardSize]:
    """The size of every shard of a source, in one unit for the whole source: tokens from the
    manifests beside the shards if they list them all, else bytes of token arrays from the
    headers of local tars, else unknown (every shard counts as one). Raw shards (`members`:
    the extensions read): bytes of those members, from the headers of local tars. Compressed
    shards' headers lie all through their compressed bytes (walking them decompresses the
    shard, in every process that deals): unknown without a manifest."""
    if urls and is_unit(urls[0]):  # a Megatron indexed dataset: sizes from its index
        return [ShardSize(docs, float(tokens)) for docs, tokens in unit_sizes(urls)]
    unknown = [ShardSize(-1, 1.0)] * len(urls)
    compressed = any(u.endswith(COMPRESSED) for u in urls)
    if not all(os.path.isfile(u) for u in urls):
        return unknown
    if members and compressed:
        return unknown
    if members:
        return [ShardSize(len(s), float(s.sum()), s) for s in raw_sizes(urls, members)]
    listed = []
    for url in urls:
        entry = _listed(url)
        if entry is None:
            break
        listed.append(entry)
    else:
        return listed
    if compressed:
        return unknown
    return [_tar_size(u, os.stat(u).st_size, os.stat(u).st_mtime_ns) for u in urls]
