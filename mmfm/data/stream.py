"""Virtual streams: the unit of data order, resume and elasticity.

A run has one virtual stream per row of the global batch: row i of every global batch comes
from stream i, whatever the number of data-parallel ranks or loader workers. Each stream
reads its share of every source, mixes the sources by weight (weights are shares of tokens:
the next document comes from the source furthest below its share, so the mix is exact at
every point, not just on average), shuffles through a bounded buffer and packs rows. Its whole
state is small JSON: per-source cursors and token counts, the RNG state, and references to
the documents held in its buffers (re-read on restore). Ranks own disjoint sets of streams,
so a checkpoint taken at one data-parallel size resumes at another with no document lost
and none repeated.

The pieces: what each stream reads (settings.py), the shard sizes (sizing.py), each
stream's share of every epoch (deal.py), reading a share's units (units.py, source_reader.py)
and counting what bad data cost (skips.py); odds.py measures the natural curriculum's odds.

Every stream gets about the same share of every epoch, so all run dry at about the
same time (packing pads each differently): a stream done with its share starts its share of
the next epoch (with unlimited epochs, a few rows before the others finish theirs), or, once
every source reached `max_epochs`, gives empty rows until every stream on every rank is dry
(the loader learns it from the step's counters, summed over ranks), so one pass reads every
document.

Memory is bounded in tokens as well as documents (`shuffle_buffer_tokens`, for the shuffle
and the pack buffer each), and a stream never holds two copies of one document: a source's
next epoch starts only once no document of its earlier epochs is left in the buffers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from mmfm.core.errors import DataError
from mmfm.core.types import Document
from mmfm.data.decompose import Decomposer
from mmfm.data.packing import Exhausted, Packer, Pending, RowBuilder, RowStats
from mmfm.data.settings import SourceSpec, StreamSettings
from mmfm.data.skips import Skips
from mmfm.data.source_reader import SourceReader
from mmfm.data.units import read_source_unit


class SourcesExhausted(DataError, Exhausted):
    """Every source reached its max_epochs and every buffered document has gone out."""


class Blocked(Exhausted):
    """No source may give a document now: each waits for its earlier epoch to leave the buffers."""


def _tokens(pending: Sequence[Pending]) -> int:
    return sum(p.remaining for p in pending)


def _pending(docs: dict[tuple, Document], ref: Sequence) -> Pending:
    """A pack-buffer entry from its reference: [*ref, offset] (decompose: [..., size])."""
    pending = Pending(docs[tuple(ref[:4])], tuple(ref[:4]), ref[0], ref[4])
    if len(ref) > 5:
        pending.remaining = ref[5]
    return pending


class VirtualStream:
    def __init__(self, stream: int, sources: Sequence[SourceSpec], settings: StreamSettings):
        self.id, self.sources, self.settings = stream, list(sources), settings
        self.rng = np.random.default_rng([settings.seed, stream, 0xDA7A])
        self.readers = [SourceReader(i, s, settings, stream) for i, s in enumerate(sources)]
        self.skips = Skips(settings.max_error_rate)
        self.drawn = [0] * len(self.readers)
        """Tokens drawn from each source so far (the mixing state)."""
        self.shuffle: list[Pending] = []
        self.steps = 0
        """Steps this stream gave rows for: the curriculum's clock."""
        self.length = settings.seq_len
        """The row length of the latest step."""
        weights = np.asarray(settings.weights, dtype=np.float32)
        if settings.packing == "decompose":
            pieces = settings.pack_buffer * len(settings.buckets)
            self.packer: Packer | Decomposer = Decomposer(
                settings.seq_len, weights, settings.buckets, settings.remainder, pieces,
                settings.shuffle_buffer_tokens,
            )  # fmt: skip
        else:
            self.packer = Packer(
                settings.seq_len,
                weights,
                settings.packing,
                settings.pack_buffer,
                settings.long_docs,
                settings.shuffle_buffer_tokens,
                settings.attention,
            )

    def _holds_earlier_epoch(self, reader: SourceReader) -> bool:
        """Whether a document of an earlier epoch of `reader`'s source is still buffered (its
        next epoch would read a second copy of it)."""
        if reader._epoch_gave:  # the epoch started, so the buffers held none and get none
            return False
        held = (*self.shuffle, *self.packer.buffer)
        return any(p.source == reader.index and p.ref[1] < reader.epoch for p in held)

    def _draw(self) -> Pending:
        """A document from the source furthest below its token share, among those not capped
        and not held back (Blocked when every source left is held back)."""
        while True:
            active = [r for r in self.readers if not r.exhausted]
            if not active:
                raise SourcesExhausted(
                    f"stream {self.id}: every source reached its max_epochs; raise "
                    "data.sources[*].max_epochs or train for fewer steps"
                )
            active = [r for r in active if not self._holds_earlier_epoch(r)]
            if not active:
                raise Blocked
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
        """The next document through the shuffle buffer (bounded in documents and tokens)."""
        size, max_tokens = self.settings.shuffle_buffer, self.settings.shuffle_buffer_tokens
        while len(self.shuffle) < size and _tokens(self.shuffle) < max_tokens:
            try:
                self.shuffle.append(self._draw())
            except Exhausted:
                if not self.shuffle:
                    raise
                break  # the sources ran out or wait for an epoch to leave: drain the buffer
        if size <= 1:
            return self.shuffle.pop()
        i = int(self.rng.random() * len(self.shuffle))
        source = self.shuffle[i].source
        if self.sources[source].ordered:  # its oldest document instead (refs sort as read)
            mine = [j for j, p in enumerate(self.shuffle) if p.source == source]
            i = min(mine, key=lambda j: self.shuffle[j].ref)
        self.shuffle[i], self.shuffle[-1] = self.shuffle[-1], self.shuffle[i]
        return self.shuffle.pop()

    def next_row(self) -> tuple[dict[str, np.ndarray], RowStats, dict[str, int]]:
        """The next packed row (decompose: the step's rows, stacked), its statistics, and the
        skips counted while making it."""
        before = dict(self.skips.counts)
        self.length = self.settings.row_length(self.steps)
        self.steps += 1
        if isinstance(self.packer, Decomposer):  # SourcesExhausted: nothing was left
            row, stats = self.packer.rows(self.length, self._pull)
        else:
            row, stats = self.packer.row(self._pull)
        stats.dry = self._ran_dry()
        skipped = {k: v - before.get(k, 0) for k, v in self.skips.counts.items()}
        return row, stats, {k: v for k, v in skipped.items() if v}

    def empty_rows(self) -> dict[str, np.ndarray]:
        """This step's rows without targets (a stream that ran dry)."""
        s = self.settings
        row = RowBuilder(self.length, np.asarray(s.weights, np.float32)).finish()
        if not isinstance(self.packer, Decomposer):
            return row
        return {k: np.stack([v] * (s.seq_len // self.length)) for k, v in row.items()}

    def _ran_dry(self) -> bool:
        """Whether no later row can hold a document (looks one document ahead if need be)."""
        if self.shuffle or self.packer.buffer:
            return False
        try:
            self.shuffle.append(self._draw())
        except SourcesExhausted:
            return True
        return False

    # -- state -------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        return {
            "readers": [r.state() for r in self.readers],
            "rng": self.rng.bit_generator.state,
            "shuffle": [list(p.ref) for p in self.shuffle],
            "pack": self.packer.refs(),
            "drawn": list(self.drawn),
            "steps": self.steps,
            "good": self.skips.good,
            "skipped": dict(self.skips.counts),
        }

    def restore(self, snap: dict) -> None:
        for reader, (epoch, unit, sample) in zip(self.readers, snap["readers"], strict=True):
            reader.epoch, reader.unit, reader.sample = epoch, unit, sample
            reader._docs = None
        self.rng.bit_generator.state = snap["rng"]
        self.drawn = list(snap["drawn"])
        self.steps = snap.get("steps", 0)
        self.skips.good = snap["good"]
        self.skips.counts.update(snap["skipped"])
        refs = [tuple(r) for r in snap["shuffle"]] + [tuple(r[:4]) for r in snap["pack"]]
        docs = self._reread(refs)
        self.shuffle = [Pending(docs[r], r, r[0]) for r in map(tuple, snap["shuffle"])]
        self.packer.buffer = [_pending(docs, r) for r in snap["pack"]]

    def _reread(self, refs: Sequence[tuple]) -> dict[tuple, Document]:
        """The documents behind buffer references, reading each unit once."""
        wanted: dict[tuple, set[int]] = defaultdict(set)
        for source, epoch, unit, kept in refs:
            wanted[(source, epoch, unit)].add(kept)
        docs: dict[tuple, Document] = {}
        for (source, epoch, unit_index), kept_set in wanted.items():
            reader = self.readers[source]
            unit = reader.units(epoch)[unit_index]
            read = read_source_unit(reader.spec, unit, min(kept_set), Skips(1.0), self.settings)
            for kept, doc in read:
                if kept in kept_set:
                    docs[(source, epoch, unit_index, kept)] = doc
                if kept >= max(kept_set):
                    break
        missing = [r for r in refs if r not in docs]
        if missing:
            raise DataError(f"stream {self.id}: cannot re-read buffered documents {missing[:3]}")
        return docs
