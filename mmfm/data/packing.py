"""Packing documents into fixed-length rows whose attention never crosses a document.

`RowBuilder` lays pieces of documents end to end (positions restart, targets stay inside the
document, no-loss spans get weight 0, the rest is padding: one more document without
targets). `Packer` decides what goes in a row from a bounded buffer of pending documents:

- best_fit: a row starts with the oldest pending document (so none waits more than a
  buffer's worth of rows), then takes the largest pending document that fits the space left
  (best fit), so short documents fill the gaps long ones leave;
- greedy: documents in arrival order; one that does not fit starts the next row.

Documents longer than a row are split into row-sized pieces (`long_docs: split`; each piece
still predicts the next token of the document) or dropped and counted (`drop`). The buffer is
bounded in documents and in tokens (`max_tokens`): a few huge documents do not fill it.

`attention: row` (In-Context Pretraining) makes the documents of a row one context: one doc id
for them all (the padding keeps its own) and positions counting on across the row, so every
attention backend and context parallelism attend causally over the whole row without knowing
of the mode. Targets stay per document: a document's last token predicts nothing, as in
`document` mode (under plain LM over the concatenation it would predict the next document's
`<s>`, which teaches nothing), so the loss counts the same targets in both modes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from mmfm.core.types import IGNORE_INDEX, MODALITY_NAMES, Document, Modality

PAD_ID = 0
ATTENTION = ("document", "row")


def modality_weight_table(loss_weights: Mapping[str, float]) -> np.ndarray:
    """Loss weight indexed by `Modality`; unlisted modalities weigh 1."""
    return np.array([loss_weights.get(name, 1.0) for name in MODALITY_NAMES], dtype=np.float32)


class RowBuilder:
    """One row being filled; `add` places a piece of a document, `finish` pads the rest.

    Pieces are only recorded by `add`; `finish` builds all six arrays with a handful of
    vectorised numpy calls, so the per-document cost stays small.
    """

    def __init__(self, seq_len: int, weights: np.ndarray, attention: str = "document"):
        assert attention in ATTENTION, attention
        self.seq_len, self.weights, self.attention = seq_len, weights, attention
        self.pieces: list[tuple[Document, int, int]] = []
        self.used = 0

    @property
    def free(self) -> int:
        return self.seq_len - self.used

    def add(self, doc: Document, start: int, end: int) -> None:
        """Place doc.tokens[start:end]; its targets are the following tokens of the document."""
        self.pieces.append((doc, start, end))
        self.used += end - start

    def finish(self) -> dict[str, np.ndarray]:
        """The row as arrays; padding is one more document with no targets."""
        n, pad = self.seq_len, self.free
        lengths = np.array([end - start for _, start, end in self.pieces] + [pad], dtype=np.int64)
        tokens = [doc.tokens[a:b] for doc, a, b in self.pieces]
        # Targets: tokens[a+1 : b+1]; a document's last token has none (IGNORE_INDEX).
        labels, modality, weights = [], [], []
        for doc, a, b in self.pieces:
            target = doc.tokens[a + 1 : b + 1]
            target_modality = doc.modality[a + 1 : b + 1]
            w = self.weights[target_modality]
            for x, y in doc.no_loss:  # targets inside a no-loss span
                lo, hi = max(x, a + 1), min(y, b + 1)
                if lo < hi:
                    w[lo - a - 1 : hi - a - 1] = 0
            missing = (b - a) - len(target)
            labels += [target, np.full(missing, IGNORE_INDEX)]
            modality += [target_modality, np.zeros(missing, np.uint8)]
            weights += [w, np.zeros(missing, np.float32)]
        tokens.append(np.full(pad, PAD_ID))
        labels.append(np.full(pad, IGNORE_INDEX))
        modality.append(np.full(pad, Modality.TEXT, np.uint8))
        weights.append(np.zeros(pad, np.float32))
        if self.attention == "row" and self.used:  # the documents, then the padding
            lengths = np.array([self.used, pad], dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        return {
            "tokens": np.concatenate(tokens).astype(np.int64),
            "labels": np.concatenate(labels).astype(np.int64),
            "positions": np.arange(n) - np.repeat(starts, lengths),
            "doc_ids": np.repeat(np.arange(len(lengths)), lengths),
            "loss_weights": np.concatenate(weights).astype(np.float32),
            "modality": np.concatenate(modality).astype(np.int64),
        }


class Exhausted(RuntimeError):
    """The documents ran out (every source reached its repetition cap)."""


@dataclass(eq=False)  # compared by identity: the buffer removes this very document
class Pending:
    """A document waiting to be packed, and where it came from (for the loader state)."""

    doc: Document
    ref: tuple
    source: int = 0
    offset: int = 0
    """Tokens already placed (a split document)."""
    remaining: int = -1
    """Tokens still to place (kept as a field: best fit reads it for every candidate)."""

    def __post_init__(self) -> None:
        self.remaining = len(self.doc.tokens) - self.offset


@dataclass
class RowStats:
    docs: int = 0
    pad: int = 0
    split: int = 0
    dropped: int = 0
    dropped_tokens: int = 0
    """Remainders of documents shorter than the smallest bucket, dropped (decompose)."""
    tokens_by_source: dict[int, int] = field(default_factory=dict)
    dry: bool = False
    """The stream has no document left after this row."""
    pieces: list[list[tuple[Document, int, int]]] = field(default_factory=list)
    """(document, start, end) of every piece placed, per row (decompose: per stacked row), in
    row order: which documents a row holds (`mmfm inspect`)."""


class Packer:
    def __init__(
        self, seq_len: int, weights: np.ndarray, mode: str = "best_fit", buffer: int = 32,
        long_docs: str = "split", max_tokens: int = 1 << 62, attention: str = "document",
    ):  # fmt: skip
        self.seq_len, self.weights, self.attention = seq_len, weights, attention
        self.mode, self.long_docs = mode, long_docs
        self.capacity = buffer if mode == "best_fit" else 1
        self.max_tokens = max_tokens
        """The buffer takes no further document once it holds this many tokens."""
        self.buffer: list[Pending] = []

    def row(self, pull: Callable[[], Pending]) -> tuple[dict[str, np.ndarray], RowStats]:
        """Fill one row, pulling documents with `pull` as the buffer empties."""
        row, stats = RowBuilder(self.seq_len, self.weights, self.attention), RowStats()
        while row.free > 0:
            try:
                self._fill(pull, stats)
            except Exhausted:  # the last documents still go out, in a last padded row
                if not self.buffer and row.used == 0:
                    raise
            if not self.buffer:
                break
            choice = self._choose(row)
            if choice is None:
                break
            take = min(choice.remaining, row.free)
            row.add(choice.doc, choice.offset, choice.offset + take)
            counts = stats.tokens_by_source
            counts[choice.source] = counts.get(choice.source, 0) + take
            if take < choice.remaining:
                stats.split += choice.offset == 0
                choice.offset += take
                choice.remaining -= take
            else:
                self.buffer.remove(choice)
                stats.docs += 1
        stats.pad = row.free
        stats.pieces.append(row.pieces)
        return row.finish(), stats

    def _fill(self, pull: Callable[[], Pending], stats: RowStats) -> None:
        while len(self.buffer) < self.capacity and self._held() < self.max_tokens:
            pending = pull()
            if self.long_docs == "drop" and pending.remaining > self.seq_len:
                stats.dropped += 1
                continue
            self.buffer.append(pending)

    def _held(self) -> int:
        return sum(p.remaining for p in self.buffer)

    def _choose(self, row: RowBuilder) -> Pending | None:
        if row.used == 0:  # the oldest document (a piece of it, if longer than a row)
            return self.buffer[0]
        if self.mode == "greedy":
            head = self.buffer[0]
            return head if head.remaining <= row.free else None
        best, best_size, free = None, 0, row.free
        for p in self.buffer:  # the largest that fits (the earliest among equals)
            size = p.remaining
            if best_size < size <= free:
                best, best_size = p, size
        return best

    def refs(self) -> list[list]:
        return [[*p.ref, p.offset] for p in self.buffer]
