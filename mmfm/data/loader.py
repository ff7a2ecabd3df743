"""The minimal streaming loader: shards -> documents -> packed rows -> per-rank micro-batches.

The stream visits the shards in a seeded order that changes each epoch and reads samples in
shard order. Every data-parallel rank reads the same stream and keeps its slice of each
global batch, so the global batches do not depend on the layout; a context-parallel rank
then keeps its zigzag chunks of every row. The whole loader state is
the cursor of the next token to place (epoch, shard, sample, offset), saved as JSON.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mmfm.config.schema import Config
from mmfm.data.batch import Batch
from mmfm.data.packing import RowBuilder, collate, modality_weight_table
from mmfm.data.shards import Document, ShardError, expand_paths, read_shard
from mmfm.data.zigzag import zigzag_slice


@dataclass(frozen=True)
class Cursor:
    """Position of the next token to place in a row."""

    epoch: int = 0
    shard: int = 0
    """Index into this epoch's shard order."""
    sample: int = 0
    """Index of the document inside that shard."""
    offset: int = 0
    """Tokens of that document already placed (a document longer than a row is split)."""


class DocumentStream:
    """Documents of all shards, forever, each epoch in a new seeded shard order."""

    def __init__(self, urls: Sequence[str], seed: int):
        if not urls:
            raise ShardError("data.paths matched no shards")
        self.urls = list(urls)
        self.seed = seed

    def shard_order(self, epoch: int) -> list[str]:
        rng = np.random.default_rng([self.seed, epoch])
        return [self.urls[i] for i in rng.permutation(len(self.urls))]

    def documents(self, cursor: Cursor) -> Iterator[tuple[Document, Cursor]]:
        """(document, cursor at its start) from `cursor` on; the first may be partly placed."""
        epoch, shard, sample = cursor.epoch, cursor.shard, cursor.sample
        while True:
            order = self.shard_order(epoch)
            found_any = False
            for shard_index in range(shard, len(order)):
                first = sample if shard_index == shard else 0
                docs = read_shard(order[shard_index], skip=first)
                for index, doc in enumerate(docs, start=first):
                    found_any = True
                    yield doc, Cursor(epoch, shard_index, index)
            if not found_any and shard == 0 and sample == 0:
                raise ShardError(f"no documents in any of the {len(self.urls)} shards")
            epoch, shard, sample = epoch + 1, 0, 0


def pack_rows(
    stream: DocumentStream, cursor: Cursor, seq_len: int, weights: np.ndarray
) -> Iterator[tuple[dict[str, np.ndarray], Cursor]]:
    """Packed rows, each with the cursor just after it."""
    docs = stream.documents(cursor)
    doc, at = next(docs)
    offset = cursor.offset
    while True:
        row = RowBuilder(seq_len, weights)
        while True:
            remaining = len(doc.tokens) - offset
            if remaining > row.free and row.used > 0:
                break  # starts the next row
            take = min(remaining, row.free)
            if take > 0:
                row.add(doc.tokens, doc.modality, offset, offset + take)
            offset += take
            if offset == len(doc.tokens):
                doc, at = next(docs)
                offset = 0
            if row.free == 0:
                break
        yield row.finish(), dataclasses.replace(at, offset=offset)


class PackedLoader:
    """Global batches of packed rows; `next_step()` returns this rank's micro-batches."""

    def __init__(
        self,
        stream: DocumentStream,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        loss_weights: Mapping[str, float],
        dp_rank: int = 0,
        dp_size: int = 1,
        cp_rank: int = 0,
        cp_size: int = 1,
    ):
        assert global_batch_size % (micro_batch_size * dp_size) == 0
        self.stream = stream
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.weights = modality_weight_table(loss_weights)
        self.cursor = Cursor()
        self._rows: Iterator | None = None

    def next_step(self) -> list[Batch]:
        """This rank's share of the next global batch, split into micro-batches."""
        if self._rows is None:
            self._rows = pack_rows(self.stream, self.cursor, self.seq_len, self.weights)
        rows = []
        for _ in range(self.global_batch_size):
            row, self.cursor = next(self._rows)
            rows.append(row)
        per_rank = self.global_batch_size // self.dp_size
        mine = rows[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        mbs = self.micro_batch_size
        return [
            zigzag_slice(collate(mine[i : i + mbs]), self.cp_size, self.cp_rank)
            for i in range(0, per_rank, mbs)
        ]

    def state_dict(self) -> dict:
        return {"cursor": dataclasses.asdict(self.cursor), "urls": self.stream.urls}

    def load_state_dict(self, state: dict) -> None:
        if state["urls"] != self.stream.urls:
            raise ShardError(
                "the checkpoint's loader state was saved for other shards "
                f"({len(state['urls'])} shards, first {state['urls'][:1]}) than data.paths "
                f"gives now ({len(self.stream.urls)} shards, first {self.stream.urls[:1]}); "
                "resume with the same data.paths"
            )
        self.cursor = Cursor(**state["cursor"])
        self._rows = None


def resolve_paths(paths: Sequence[str], cache_dir: str) -> list[str]:
    """Shard URLs of `data.paths`; `builtin:<name>` entries are generated on first use."""
    from mmfm.data.demo import ensure_demo_shards

    builtin = {"builtin:demo": ensure_demo_shards}
    urls: list[str] = []
    for path in paths:
        if path.startswith("builtin:"):
            if path not in builtin:
                raise ShardError(
                    f"data.paths: unknown built-in dataset {path!r}; have {sorted(builtin)}"
                )
            urls.extend(builtin[path](cache_dir))
        else:
            urls.extend(expand_paths([path]))
    return urls


def build_loader(
    cfg: Config, dp_rank: int = 0, dp_size: int = 1, cp_rank: int = 0, cp_size: int = 1
) -> PackedLoader:
    urls = resolve_paths(cfg.data.paths, cfg.data.cache_dir)
    return PackedLoader(
        DocumentStream(urls, cfg.train.seed),
        seq_len=cfg.data.seq_len,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        loss_weights=cfg.data.loss_weights,
        dp_rank=dp_rank,
        dp_size=dp_size,
        cp_rank=cp_rank,
        cp_size=cp_size,
    )
