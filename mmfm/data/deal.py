"""The deal: which units of a source's shards each stream reads in an epoch.

An epoch is global: in epoch e the streams together read every document of a source once.
Streams live on different ranks and workers and never talk, so the deal is a pure function
of (seed, source, epoch, number of streams) and the shard sizes (sizing.py): the epoch's
shards are shuffled and dealt largest first to the stream with the fewest tokens so far, and
while the shares differ by more than 2% the largest units are halved into every-k-th-sample
slices (each unit is one read of its shard; at most 8 units per stream more than there are
shards) and dealt again. Every stream gets about the same number of tokens, so all run dry
at about the same time.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmfm.data.sizing import ShardSize, shard_sizes


@dataclass(frozen=True)
class Unit:
    """Samples `j, j + k, j + 2k, ...` of one shard."""

    url: str
    k: int
    j: int


BALANCE = 0.02
"""Deal until every stream's share of an epoch is within this fraction of the mean..."""
EXTRA_UNITS = 8
"""... or the units of an epoch number the shards + this many per stream (each unit is one
read of its shard)."""


@dataclass(frozen=True)
class _Piece:
    size: float
    position: int
    """Of its shard in the epoch's shuffled order."""
    unit: Unit
    shard: ShardSize

    def halves(self) -> list[_Piece]:
        """Samples j mod k as j mod 2k and j + k mod 2k."""
        k, j = 2 * self.unit.k, self.unit.j
        return [
            _Piece(self.shard.slice(k, i), self.position, Unit(self.unit.url, k, i), self.shard)
            for i in (j, j + self.unit.k)
        ]

    @property
    def splittable(self) -> bool:
        """Whether both halves hold a sample."""
        return self.shard.samples < 0 or self.unit.j + self.unit.k < self.shard.samples


def _lpt(pieces: Sequence[_Piece], n_streams: int) -> tuple[list[list[_Piece]], list[float]]:
    """Pieces, largest first (ties in the given order), each to the stream with the fewest
    tokens so far (ties: the lowest id): (every stream's pieces, every stream's tokens)."""
    loads = [(0.0, stream) for stream in range(n_streams)]
    dealt: list[list[_Piece]] = [[] for _ in range(n_streams)]
    for piece in sorted(pieces, key=lambda p: -p.size):
        load, stream = heapq.heappop(loads)
        dealt[stream].append(piece)
        heapq.heappush(loads, (load + piece.size, stream))
    return dealt, [load for load, _ in sorted(loads, key=lambda x: x[1])]


@functools.lru_cache(maxsize=16)
def deal(
    urls: tuple[str, ...], n_streams: int, epoch: int, seed: int, members: tuple[str, ...] = ()
) -> tuple[tuple[Unit, ...], ...]:
    """Every stream's units of one epoch of the source `urls`; together they hold every sample
    once, and every stream about the same number of tokens.

    The shards are shuffled from (seed, epoch) and dealt largest first to the stream with the
    fewest tokens so far; while the shares differ by more than `BALANCE` (and the budget of
    `EXTRA_UNITS` allows), the largest eighth of the units are halved (samples j mod k become
    j mod 2k and j + k mod 2k; shards stay whole where they balance already) and dealt again.
    Each stream reads its units in shuffled order. A function of its arguments and the
    shards' sizes only, so every rank and worker computes the same deal (`members`: of raw
    shards, see `shard_sizes`).
    """
    sizes = shard_sizes(urls, members)
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(urls)).tolist()
    pieces = [
        _Piece(sizes[i].tokens, p, Unit(urls[i], 1, 0), sizes[i]) for p, i in enumerate(order)
    ]
    budget = len(urls) + EXTRA_UNITS * n_streams
    while True:
        dealt, loads = _lpt(pieces, n_streams)
        balanced = max(loads) - min(loads) <= BALANCE * sum(loads) / n_streams
        largest = sorted((p for p in pieces if p.splittable), key=lambda p: -p.size)
        if balanced or not largest or len(pieces) >= budget:
            break
        chosen = set(map(id, largest[: min(max(1, len(pieces) // 8), budget - len(pieces))]))
        pieces = [h for p in pieces for h in (p.halves() if id(p) in chosen else [p])]
    return tuple(
        tuple(p.unit for p in sorted(share, key=lambda p: (p.position, p.unit.j)))
        for share in dealt
    )
