"""Dataset Decomposition (Pouransari et al., 2024): one document per row, variable row length.

Every document is cut into pieces whose lengths are bucket lengths (consecutive powers of two,
`data.buckets`): as many of the largest as fit, then one of each smaller bucket by the binary
digits of what is left; a remainder below the smallest bucket is dropped (counted) or kept as
one padded row (`data.remainder`). A row holds one piece, so attention never needs a document
mask and its cost follows the documents. Each step has one length L for every row (the
curriculum's, a pure function of the step), and each stream gives `seq_len / L` rows of it:
the step's token budget (`global_batch_size x seq_len`) never changes, only its shape.

A stream holds the pieces it cut but has not given out (bounded in pieces and tokens). A row
of length L takes, in order of preference: the oldest held piece of length L; the oldest of
the shortest longer pieces, cut again (L, then the rest by its binary digits: still bucket
lengths, still one document); a new document; and only when the buffer is full or the data
ran out, the longest shorter piece, padded (counted as padding). So any curriculum runs with
bounded memory, and one that asks for lengths the data lacks shows up as padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mmfm.data.packing import Exhausted, Pending, RowBuilder, RowStats


def bucket_pieces(
    length: int, buckets: Sequence[int], remainder: str = "drop"
) -> tuple[list[tuple[int, int]], int]:
    """((start, size) of every piece of a document of `length` tokens, in document order;
    tokens dropped). Sizes are bucket lengths, but for a padded remainder (`pad`)."""
    pieces, start, top = [], 0, buckets[-1]
    while length - start >= top:
        pieces.append((start, top))
        start += top
    for size in reversed(buckets[:-1]):
        if length - start >= size:
            pieces.append((start, size))
            start += size
    rest = length - start
    if rest and remainder == "pad":
        pieces.append((start, rest))
        rest = 0
    return pieces, rest


LENGTH_DIGITS = 48
"""Binary digits of a document length that `length_digits` counts (lengths below 2**48)."""


def length_digits(lengths: Sequence[int]) -> list[int]:
    """Entry b: the tokens 2**b contributes to the documents whose length has binary digit b
    set. Enough to know the token share of every bucket of every power-of-two `data.buckets`
    (`bucket_mass`) without the lengths themselves: `mmfm prepare` writes it per shard."""
    n = np.asarray(lengths, np.int64)
    return [int(((n >> b) & 1).sum()) << b for b in range(LENGTH_DIGITS)]


def bucket_mass(digits: Sequence[int], buckets: Sequence[int], remainder: str) -> np.ndarray:
    """Tokens per bucket, as `bucket_pieces` cuts the documents whose `length_digits` these
    are: digits at or above the largest bucket fill it, each digit between the smallest and
    the largest its own bucket, and the ones below the smallest are dropped or (`pad`) count
    to the smallest (the padded remainder rows)."""
    low, top = int(buckets[0]).bit_length() - 1, int(buckets[-1]).bit_length() - 1
    mass = np.zeros(len(buckets))
    for b, tokens in enumerate(digits):
        if b >= top:
            mass[-1] += tokens
        elif b >= low:
            mass[b - low] += tokens
        elif remainder == "pad":
            mass[0] += tokens
    return mass


def step_length(
    step: int, buckets: Sequence[int], curriculum: str, cycles: int = 1, steps: int = 1,
    odds: Sequence[float] = (), seed: int = 0,
) -> int:  # fmt: skip
    """The row length of `step`: a function of the step alone, the same on every stream.

    natural: drawn from (seed, step) with `odds`, each bucket's share of the tokens (see
    `natural_odds` in stream.py), so the buckets are used up at the rate the data fills them.
    grow_p2: the run (`steps`) is cut into `cycles` cycles; each walks the buckets from the
    shortest to the longest, an equal share of its steps each (the paper's Grow-P2 samples
    lengths by odds that grow through each cycle; this staircase keeps its order, short
    first, and is exact per step); past `steps` the cycles go on. fixed: the largest bucket.
    """
    if curriculum == "fixed" or len(buckets) == 1:
        return buckets[-1]
    if curriculum == "natural":
        rng = np.random.default_rng([seed, step, 0xB0C7])
        return buckets[int(rng.choice(len(buckets), p=np.asarray(odds) / np.sum(odds)))]
    period = max(1, steps // max(1, cycles))
    return buckets[(step % period) * len(buckets) // period]


class Decomposer:
    """The held pieces of one stream and the rows of one step made from them."""

    def __init__(
        self, seq_len: int, weights: np.ndarray, buckets: Sequence[int], remainder: str,
        max_pieces: int, max_tokens: int,
    ):  # fmt: skip
        self.seq_len, self.weights = seq_len, weights
        self.buckets, self.remainder = tuple(buckets), remainder
        self.max_pieces, self.max_tokens = max_pieces, max_tokens
        self.ran_out: Exhausted | None = None
        self.buffer: list[Pending] = []
        """Pieces not yet given out: `offset` is where each starts, `remaining` its size."""

    def rows(self, length: int, pull: Callable[[], Pending]):
        """`seq_len / length` rows of `length` tokens, stacked, and their statistics;
        Exhausted when the documents ran out before the first."""
        stats, rows = RowStats(), []
        for _ in range(self.seq_len // length):
            row = RowBuilder(length, self.weights)
            piece = self._piece(length, pull, stats)
            if piece is None and not rows:
                raise self.ran_out or Exhausted()
            if piece is not None:
                row.add(piece.doc, piece.offset, piece.offset + piece.remaining)
                counts = stats.tokens_by_source
                counts[piece.source] = counts.get(piece.source, 0) + piece.remaining
                stats.docs += 1
            stats.pad += row.free
            stats.pieces.append(row.pieces)
            rows.append(row.finish())
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, stats

    def _piece(self, length: int, pull: Callable[[], Pending], stats: RowStats) -> Pending | None:
        while True:
            exact = next((p for p in self.buffer if self._bucket(p) == length), None)
            if exact is not None:
                self.buffer.remove(exact)
                return exact
            longer = [p for p in self.buffer if p.remaining > length]
            if longer:
                return self._cut(min(longer, key=lambda p: p.remaining), length, stats)
            if not self._pull(pull, stats):
                break
        shorter = [p for p in self.buffer if p.remaining < length]
        if not shorter:
            return None
        best = max(shorter, key=lambda p: p.remaining)  # the earliest among equals
        self.buffer.remove(best)
        return best

    def _bucket(self, piece: Pending) -> int:
        """The row length a piece is for (a padded remainder: the smallest)."""
        return max(piece.remaining, self.buckets[0])

    def _pull(self, pull: Callable[[], Pending], stats: RowStats) -> bool:
        """Cut one more document into held pieces; False when full or the data ran out."""
        held = sum(p.remaining for p in self.buffer)
        if len(self.buffer) >= self.max_pieces or held >= self.max_tokens:
            return False
        try:
            doc = pull()
        except Exhausted as e:  # the sources ran out, or wait for an epoch to leave
            self.ran_out = e
            return False
        pieces, dropped = bucket_pieces(doc.remaining, self.buckets, self.remainder)
        stats.dropped_tokens += dropped
        stats.split += len(pieces) > 1
        self.buffer += [self._held(doc, doc.offset + start, size) for start, size in pieces]
        return True

    def _cut(self, piece: Pending, length: int, stats: RowStats) -> Pending:
        """The first `length` tokens of a longer piece; its rest goes back as bucket pieces
        (a bucket piece's rest always splits exactly; a document held by another packing
        before a stage change may leave a remainder)."""
        self.buffer.remove(piece)
        rest, dropped = bucket_pieces(piece.remaining - length, self.buckets, self.remainder)
        stats.dropped_tokens += dropped
        start = piece.offset + length
        self.buffer += [self._held(piece, start + a, size) for a, size in rest]
        return self._held(piece, piece.offset, length)

    @staticmethod
    def _held(of: Pending, offset: int, size: int) -> Pending:
        piece = Pending(of.doc, of.ref, of.source, offset)
        piece.remaining = size
        return piece

    def refs(self) -> list[list]:
        return [[*p.ref, p.offset, p.remaining] for p in self.buffer]
