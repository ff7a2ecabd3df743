"""Virtual streams: the unit of data order, resume and elasticity.

A run has one virtual stream per row of the global batch: row i of every global batch comes
from stream i, whatever the number of data-parallel ranks or loader workers. Each stream
reads its own share of every source's shards (each epoch the shards are shuffled from the
seed and dealt out; when there are fewer shards than streams, a shard is shared by taking
every k-th sample), mixes the sources by weight (weights are shares of tokens: the next
document comes from the source furthest below its share, so the mix is exact at every
point, not just on average), shuffles through a bounded buffer and packs rows. Its whole
state is small JSON: per-source cursors and token counts, the RNG state, and references to
the documents held in its buffers (re-read on restore). Ranks own disjoint sets of streams,
so a checkpoint taken at one data-parallel size resumes at another with no document lost
and none repeated.

Bad data never stops a stream silently: an undecodable sample, a missing member, an empty
document, a corrupt or truncated shard is skipped, counted by reason, and logged once with
its shard and key; past `max_error_rate` the stream raises `DataError`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import webdataset as wds

from mmfm.data.packing import Exhausted, Packer, Pending, RowStats
from mmfm.data.shards import DamagedShard, Document, ShardError, check_tar, decode_sample

log = logging.getLogger("mmfm.data")

SKIP_REASONS = ("corrupt_shard", "truncated_shard", "bad_sample", "missing_field", "empty")


class DataError(RuntimeError):
    """The data cannot go on: too many bad samples, or every source reached its cap."""


class SourcesExhausted(DataError, Exhausted):
    """Every source reached its max_epochs and every buffered document has gone out."""


@dataclass(frozen=True)
class SourceSpec:
    name: str
    urls: tuple[str, ...]
    weight: float
    max_epochs: int = 0
    """Repetition cap: epochs a stream reads of this source; 0 means no cap."""


@dataclass(frozen=True)
class StreamSettings:
    n_streams: int
    seq_len: int
    seed: int
    weights: tuple[float, ...]
    """Loss weight per modality."""
    shuffle_buffer: int = 64
    packing: str = "best_fit"
    pack_buffer: int = 32
    long_docs: str = "split"
    max_error_rate: float = 0.01


@dataclass(frozen=True)
class Unit:
    """Samples `j, j + k, j + 2k, ...` of one shard."""

    url: str
    k: int
    j: int


def epoch_units(
    urls: Sequence[str], n_streams: int, stream: int, epoch: int, seed: int
) -> list[Unit]:
    """The units `stream` reads in `epoch`: the shards in a seeded order, dealt round-robin."""
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(urls))
    k = math.ceil(n_streams / len(urls))
    units = [Unit(urls[i], k, j) for i in order for j in range(k)]
    return units[stream::n_streams]


class Skips:
    """Counts skipped items by reason; logs the first of each (reason, shard)."""

    def __init__(self, max_error_rate: float):
        self.max_error_rate = max_error_rate
        self.counts: dict[str, int] = defaultdict(int)
        self.good = 0
        self._logged: set[tuple[str, str]] = set()

    def skip(self, reason: str, url: str, key: str, detail: str) -> None:
        self.counts[reason] += 1
        if (reason, url) not in self._logged:
            self._logged.add((reason, url))
            log.warning("skipped (%s) in %s, sample %s: %s", reason, url, key, detail)
        bad = sum(self.counts.values())
        seen = bad + self.good
        if seen >= 100 and bad > self.max_error_rate * seen:
            raise DataError(
                f"{bad} of {seen} documents were bad ({dict(self.counts)}), over "
                f"data.max_error_rate={self.max_error_rate}; last: {url}, sample {key}: "
                f"{detail}. Fix the shards or raise data.max_error_rate"
            )


def _reason(error: ShardError) -> str:
    return "missing_field" if "needs members" in str(error) else "bad_sample"


@functools.lru_cache(maxsize=4096)
def _damage(url: str, size: int, mtime_ns: int) -> DamagedShard | None:
    """check_tar once per version of a local shard (size and mtime in the cache key)."""
    try:
        check_tar(url)
    except DamagedShard as e:
        return e  # read what precedes the damage, then count it
    return None


def read_unit(unit: Unit, skip: int, skips: Skips) -> Iterator[tuple[int, Document]]:
    """(kept index, document) of a unit from the `skip`-th kept sample on; bad ones counted."""
    damage = None
    if os.path.isfile(unit.url):
        stat = os.stat(unit.url)
        damage = _damage(unit.url, stat.st_size, stat.st_mtime_ns)
    stream = wds.DataPipeline(wds.SimpleShardList([unit.url]), wds.tarfile_to_samples())
    index = 0
    try:
        for index, sample in enumerate(stream):
            if index % unit.k != unit.j or index // unit.k < skip:
                continue
            key = sample.get("__key__", "?")
            try:
                doc = decode_sample(sample, unit.url)
            except ShardError as e:
                skips.skip(_reason(e), unit.url, key, str(e))
                continue
            if len(doc.tokens) == 0:
                skips.skip("empty", unit.url, key, "a document without tokens")
                continue
            skips.good += 1
            yield index // unit.k, doc
    except DataError:
        raise
    except Exception as e:  # tarfile, gzip, IO, http: the rest of the shard is lost
        skips.skip("corrupt_shard", unit.url, f"after #{index}", f"{type(e).__name__}: {e}")
        return
    if damage is not None:
        skips.skip(damage.reason, unit.url, f"after #{index}", str(damage))


EMPTY_EPOCHS_LIMIT = 8
"""Epochs in a row without a document for a stream before its source is called too small."""


class SourceReader:
    """One stream's documents of one source, epoch after epoch (until `max_epochs`)."""

    def __init__(self, index: int, spec: SourceSpec, settings: StreamSettings, stream: int):
        self.index, self.spec, self.settings, self.stream = index, spec, settings, stream
        self.epoch = self.unit = self.sample = 0
        self._docs: Iterator | None = None
        self._empty_epochs = 0
        self._epoch_gave = False

    @property
    def exhausted(self) -> bool:
        return bool(self.spec.max_epochs) and self.epoch >= self.spec.max_epochs

    def units(self, epoch: int) -> list[Unit]:
        s = self.settings
        return epoch_units(self.spec.urls, s.n_streams, self.stream, epoch, s.seed + self.index)

    def next(self, skips: Skips) -> Pending | None:
        """The next document, or None when the cap is reached."""
        while not self.exhausted:
            if self._docs is None:
                units = self.units(self.epoch)
                if self.unit >= len(units):
                    self._end_epoch()
                    continue
                self._docs = read_unit(units[self.unit], self.sample, skips)
            item = next(self._docs, None)
            if item is None:
                self._docs = None
                self.unit, self.sample = self.unit + 1, 0
                continue
            kept, doc = item
            self.sample = kept + 1
            self._epoch_gave = True
            return Pending(doc, (self.index, self.epoch, self.unit, kept), self.index)
        return None

    def _end_epoch(self) -> None:
        """Next epoch; a source that keeps giving this stream nothing would loop forever."""
        self._empty_epochs = 0 if self._epoch_gave else self._empty_epochs + 1
        if self._empty_epochs >= EMPTY_EPOCHS_LIMIT:
            raise DataError(
                f"source '{self.spec.name}' gave stream {self.stream} no document in "
                f"{EMPTY_EPOCHS_LIMIT} epochs in a row: its {len(self.spec.urls)} shard(s) hold "
                f"too few readable documents for {self.settings.n_streams} streams (one per row "
                "of the global batch; a shard's documents are dealt out across the streams). "
                "Add documents, lower train.global_batch_size, or drop the source"
            )
        self._epoch_gave = False
        self.epoch, self.unit, self.sample = self.epoch + 1, 0, 0

    def state(self) -> list[int]:
        return [self.epoch, self.unit, self.sample]


class VirtualStream:
    def __init__(self, stream: int, sources: Sequence[SourceSpec], settings: StreamSettings):
        self.id, self.sources, self.settings = stream, list(sources), settings
        self.rng = np.random.default_rng([settings.seed, stream, 0xDA7A])
        self.readers = [SourceReader(i, s, settings, stream) for i, s in enumerate(sources)]
        self.skips = Skips(settings.max_error_rate)
        self.drawn = [0] * len(self.readers)
        """Tokens drawn from each source so far (the mixing state)."""
        self.shuffle: list[Pending] = []
        self.packer = Packer(
            settings.seq_len,
            np.asarray(settings.weights, dtype=np.float32),
            settings.packing,
            settings.pack_buffer,
            settings.long_docs,
        )

    def _draw(self) -> Pending:
        """A document from the source furthest below its token share, among those not capped."""
        while True:
            active = [r for r in self.readers if not r.exhausted]
            if not active:
                raise SourcesExhausted(
                    f"stream {self.id}: every source reached its max_epochs; raise "
                    "data.sources[*].max_epochs or train for fewer steps"
                )
            total_weight = sum(r.spec.weight for r in active)
            total = sum(self.drawn[r.index] for r in active) + 1
            reader = max(
                active, key=lambda r: r.spec.weight / total_weight * total - self.drawn[r.index]
            )
            pending = reader.next(self.skips)
            if pending is not None:
                self.drawn[reader.index] += len(pending.doc.tokens)
                return pending

    def _pull(self) -> Pending:
        """The next document through the shuffle buffer."""
        size = self.settings.shuffle_buffer
        while len(self.shuffle) < size:
            try:
                self.shuffle.append(self._draw())
            except SourcesExhausted:
                if not self.shuffle:
                    raise
                break  # the sources ran out: drain the buffer
        if size <= 1:
            return self.shuffle.pop()
        i = int(self.rng.random() * len(self.shuffle))
        self.shuffle[i], self.shuffle[-1] = self.shuffle[-1], self.shuffle[i]
        return self.shuffle.pop()

    def next_row(self) -> tuple[dict[str, np.ndarray], RowStats, dict[str, int]]:
        """The next packed row, its statistics, and the skips counted while making it."""
        before = dict(self.skips.counts)
        row, stats = self.packer.row(self._pull)
        skipped = {k: v - before.get(k, 0) for k, v in self.skips.counts.items()}
        return row, stats, {k: v for k, v in skipped.items() if v}

    # -- state -------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        return {
            "readers": [r.state() for r in self.readers],
            "rng": self.rng.bit_generator.state,
            "shuffle": [list(p.ref) for p in self.shuffle],
            "pack": self.packer.refs(),
            "drawn": list(self.drawn),
            "good": self.skips.good,
            "skipped": dict(self.skips.counts),
        }

    def restore(self, snap: dict) -> None:
        for reader, (epoch, unit, sample) in zip(self.readers, snap["readers"], strict=True):
            reader.epoch, reader.unit, reader.sample = epoch, unit, sample
            reader._docs = None
        self.rng.bit_generator.state = snap["rng"]
        self.drawn = list(snap["drawn"])
        self.skips.good = snap["good"]
        self.skips.counts.update(snap["skipped"])
        refs = [tuple(r) for r in snap["shuffle"]] + [tuple(r[:4]) for r in snap["pack"]]
        docs = self._reread(refs)
        self.shuffle = [Pending(docs[r], r, r[0]) for r in map(tuple, snap["shuffle"])]
        self.packer.buffer = [
            Pending(docs[tuple(r[:4])], tuple(r[:4]), r[0], r[4]) for r in snap["pack"]
        ]

    def _reread(self, refs: Sequence[tuple]) -> dict[tuple, Document]:
        """The documents behind buffer references, reading each unit once."""
        wanted: dict[tuple, set[int]] = defaultdict(set)
        for source, epoch, unit, kept in refs:
            wanted[(source, epoch, unit)].add(kept)
        docs: dict[tuple, Document] = {}
        for (source, epoch, unit_index), kept_set in wanted.items():
            unit = self.readers[source].units(epoch)[unit_index]
            for kept, doc in read_unit(unit, min(kept_set), Skips(1.0)):
                if kept in kept_set:
                    docs[(source, epoch, unit_index, kept)] = doc
                if kept >= max(kept_set):
                    break
        missing = [r for r in refs if r not in docs]
        if missing:
            raise DataError(f"stream {self.id}: cannot re-read buffered documents {missing[:3]}")
        return docs
