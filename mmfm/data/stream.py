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

An epoch is global: in epoch e the streams together read every document of a source once.
Streams live on different ranks and workers and never talk, so the deal is a pure function
of (seed, source, epoch, number of streams) and the shard sizes, known before reading (the
`manifest.json` of `mmfm prepare`, else one pass over a local tar's headers; shards whose
size cannot be known cheaply, `http://`, `pipe:` or `.tar.gz` without a manifest, count as
equal; raw shards tokenized in the stream, raw_stream.py, by the bytes of the members read,
from local uncompressed tars' headers): the epoch's shards
are shuffled and dealt largest first to the stream with the fewest tokens so far, and while
the shares differ by more than 2% the largest units are halved into every-k-th-sample slices
(each unit is one read of its shard; at most 8 units per stream more than there are shards)
and dealt again. Every stream gets about the same number of tokens, so all run dry at about the
same time (packing pads each differently): a stream done with its share starts its share of
the next epoch (with unlimited epochs, a few rows before the others finish theirs), or, once
every source reached `max_epochs`, gives empty rows until every stream on every rank is dry
(the loader learns it from the step's counters, summed over ranks), so one pass reads every
document.

Memory is bounded in tokens as well as documents (`shuffle_buffer_tokens`, for the shuffle
and the pack buffer each), and a stream never holds two copies of one document: a source's
next epoch starts only once no document of its earlier epochs is left in the buffers.

Bad data never stops a stream silently: an undecodable sample (or one whose CRC, segments or
token ids are wrong), a missing member, an empty document, a corrupt, truncated or stalled
shard is skipped, counted by reason in documents lost, and logged once with its shard and
key; past `max_error_rate` the stream raises `DataError`.
"""

from __future__ import annotations

import functools
import heapq
import json
import logging
import os
import tarfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from mmfm.config.schema import RawFields
from mmfm.core.errors import DataError
from mmfm.core.types import Document
from mmfm.data.decompose import (
    LENGTH_DIGITS,
    Decomposer,
    bucket_mass,
    length_digits,
    step_length,
)
from mmfm.data.megatron import is_unit, unit_sizes
from mmfm.data.megatron import read_unit as read_megatron_unit
from mmfm.data.packing import Exhausted, Packer, Pending, RowBuilder, RowStats
from mmfm.data.raw_stream import POSITIONS, RawTokenizer, raw_sizes
from mmfm.data.shards import ShardError, decode_sample, held_samples, shard_record
from mmfm.data.tario import MAX_MEMBER, Damage, read_tar
from mmfm.tokenization.shaping import Shaping

log = logging.getLogger("mmfm.data")

SKIP_REASONS = (
    "corrupt_shard",
    "truncated_shard",
    "timeout_shard",
    "bad_sample",
    "missing_field",
    "empty",
    "too_large",
)
"""Why documents were lost; each counts documents (a damaged shard: those it lost, at least one)."""


class SourcesExhausted(DataError, Exhausted):
    """Every source reached its max_epochs and every buffered document has gone out."""


class Blocked(Exhausted):
    """No source may give a document now: each waits for its earlier epoch to leave the buffers."""


def _tokens(pending: Sequence[Pending]) -> int:
    return sum(p.remaining for p in pending)


@dataclass(frozen=True)
class SourceSpec:
    name: str
    urls: tuple[str, ...]
    weight: float
    max_epochs: int = 0
    """Repetition cap: passes over this source (each stream reads its share of each); 0: none."""
    tokenize: str = ""
    """Tokenizer recipe of raw shards, tokenized as they are read (raw_stream.py); empty:
    shards of `mmfm prepare`."""
    fields: RawFields | None = None
    """Raw shards: which members make which record."""
    tokenize_batch: int = 16
    """Raw shards: samples tokenized together (their pictures in one batched call); the
    windows are fixed in the unit (samples 0-15, 16-31, ...), so a resumed read encodes the
    same batches and gives the same codes."""
    tokenize_device: str = "cpu"
    """Raw shards: where the visual tokenizers run."""
    max_length: int = 0
    """Raw DNA: windows of at most this many bases (as mmfm prepare's max_length)."""
    shaping: Shaping | None = None
    """Raw shards: condition dropout, caption order and completion-only of the records, as
    mmfm prepare's sources shape them (drawn from the settings' seed, the name and the key)."""
    ordered: bool = False
    """Give this source's documents out of the shuffle buffer oldest first (`_pull`)."""

    @property
    def members(self) -> tuple[str, ...]:
        """The member extensions a raw source reads; () for prepared shards."""
        return (self.fields or RawFields()).members() if self.tokenize else ()


@dataclass(frozen=True)
class StreamSettings:
    n_streams: int
    seq_len: int
    seed: int
    weights: tuple[float, ...]
    """Loss weight per modality."""
    shuffle_buffer: int = 64
    shuffle_buffer_tokens: int = 1 << 20
    """Tokens the shuffle buffer may hold (and the pack buffer: each at least one document)."""
    packing: str = "best_fit"
    pack_buffer: int = 32
    long_docs: str = "split"
    max_error_rate: float = 0.01
    vocab_size: int = 0
    """Token ids must lie in [0, vocab_size) (0: not checked); others are bad samples."""
    read_timeout_s: float = 300.0
    """A streamed shard that sends no byte for this long is counted (timeout_shard) and left."""
    max_member: int = MAX_MEMBER
    """Bytes of the largest tar member read; a sample with a larger one is `too_large`."""
    attention: str = "document"
    """Rows as documents or as one context (`data.attention`, packing.py)."""
    buckets: tuple[int, ...] = ()
    """packing=decompose: the row lengths (decompose.py)."""
    remainder: str = "drop"
    curriculum: str = "grow_p2"
    num_cycles: int = 8
    curriculum_steps: int = 1
    """The run's length in steps (`train.steps`), which grow_p2 cuts into its cycles."""
    bucket_odds: tuple[float, ...] = ()
    """The natural curriculum's odds per bucket (`natural_odds`)."""

    def row_length(self, step: int) -> int:
        """The row length of `step` (seq_len but under decompose)."""
        if self.packing != "decompose":
            return self.seq_len
        return step_length(
            step, self.buckets, self.curriculum, self.num_cycles, self.curriculum_steps,
            self.bucket_odds, self.seed,
        )  # fmt: skip


@dataclass(frozen=True)
class Unit:
    """Samples `j, j + k, j + 2k, ...` of one shard."""

    url: str
    k: int
    j: int


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


@functools.lru_cache(maxsize=256)
def _manifest_sizes(path: str, mtime_ns: int) -> dict[str, ShardSize]:
    """{shard file name: size} of a `manifest.json` written by `mmfm prepare`."""
    try:
        shards = json.loads(Path(path).read_bytes())["shards"]
        return {s["file"]: ShardSize(int(s["samples"]), float(s["tokens"])) for s in shards}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


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
        manifest = os.path.join(os.path.dirname(url), "manifest.json")
        if not os.path.isfile(manifest):
            break
        entry = _manifest_sizes(manifest, os.stat(manifest).st_mtime_ns).get(os.path.basename(url))
        if entry is None:
            break
        listed.append(entry)
    else:
        return listed
    if compressed:
        return unknown
    return [_tar_size(u, os.stat(u).st_size, os.stat(u).st_mtime_ns) for u in urls]


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


class Skips:
    """Counts documents lost by reason; logs the first of each (reason, shard)."""

    def __init__(self, max_error_rate: float):
        self.max_error_rate = max_error_rate
        self.counts: dict[str, int] = defaultdict(int)
        self.good = 0
        self._logged: set[tuple[str, str]] = set()

    def skip(self, reason: str, url: str, key: str, detail: str, n: int = 1) -> None:
        """Count `n` documents lost for `reason`."""
        self.counts[reason] += n
        if (reason, url) not in self._logged:
            self._logged.add((reason, url))
            lost = f" ({n} documents)" if n != 1 else ""
            log.warning("skipped (%s)%s in %s, sample %s: %s", reason, lost, url, key, detail)
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


def read_unit(
    unit: Unit, skip: int, skips: Skips, settings: StreamSettings | None = None
) -> Iterator[tuple[int, Document]]:
    """(kept index, document) of a unit from the `skip`-th kept sample on; bad ones counted.

    Every document of the unit is either delivered or counted: a bad sample as itself, a
    damaged, cut or stalled shard by the documents it lost (the shard's `manifest.json` says
    how many it holds; without one, at least one each time).
    """
    vocab_size = settings.vocab_size if settings else 0
    timeout_s = settings.read_timeout_s if settings else 300.0
    max_member = settings.max_member if settings else MAX_MEMBER
    seen, damage = 0, []  # samples read (all units of the shard), damage reports
    for item in read_tar(unit.url, timeout_s, max_member=max_member):
        if _shard_damage(item):
            damage.append(item)
            continue
        index, seen = seen, seen + 1
        if index % unit.k != unit.j or index // unit.k < skip:
            continue
        if isinstance(item, Damage):  # one sample skipped unread: counted by its own unit
            skips.skip(item.reason, unit.url, f"#{index}", item.detail)
            continue
        key = item.get("__key__", "?")
        try:
            doc = decode_sample(item, unit.url, vocab_size)
        except ShardError as e:
            skips.skip(_reason(e), unit.url, key, str(e))
            continue
        if len(doc.tokens) == 0:
            skips.skip("empty", unit.url, key, "a document without tokens")
            continue
        skips.good += 1
        yield index // unit.k, doc
    _count_lost(unit, seen, damage, skips)


def read_raw_unit(
    unit: Unit, skip: int, skips: Skips, spec: SourceSpec, settings: StreamSettings
) -> Iterator[tuple[int, Document]]:
    """(position, document) of a unit of raw shards from position `skip` on (see
    raw_stream.py: samples are decoded and tokenized here, `spec.tokenize_batch` at a time);
    counted as `read_unit` counts them, each sample's skips when its turn comes."""
    tokenizer = RawTokenizer(
        spec.tokenize,
        spec.fields or RawFields(),
        spec.name,
        settings.seed,
        settings.vocab_size,
        spec.tokenize_device,
        spec.max_length,
        spec.shaping,
    )
    first, first_document = divmod(skip, POSITIONS)
    batch = max(1, spec.tokenize_batch)
    start = first - first % batch  # the window `first` lies in, read whole (same codes)
    seen, damage, window = 0, [], []
    for item in read_tar(unit.url, settings.read_timeout_s, spec.members, settings.max_member):
        if _shard_damage(item):
            damage.append(item)
            continue
        index, seen = seen, seen + 1
        sample = index // unit.k
        if index % unit.k != unit.j or sample < start:
            continue
        if isinstance(item, Damage):  # skipped unread; counted once, as `_window` counts
            if sample >= first:
                skips.skip(item.reason, unit.url, f"#{index}", item.detail)
            continue
        window.append((sample, item))
        if sample % batch == batch - 1:
            yield from _window(tokenizer, unit.url, window, first, first_document, skips)
            window = []
    yield from _window(tokenizer, unit.url, window, first, first_document, skips)
    _count_lost(unit, seen, damage, skips)


def _window(
    tokenizer: RawTokenizer,
    url: str,
    window: Sequence[tuple[int, dict]],
    first: int,
    first_document: int,
    skips: Skips,
) -> Iterator[tuple[int, Document]]:
    """The documents of a window of samples from sample `first`'s document `first_document`
    on; the skips of a sample before them were counted when it was read before."""
    if not window:
        return
    results = tokenizer.window(url, [item for _, item in window])
    for (sample, _), (docs, skipped) in zip(window, results, strict=True):
        if sample < first:
            continue
        again = sample == first and first_document > 0  # partly read before: counted then
        for reason, key, detail in [] if again else skipped:
            skips.skip(reason, url, key, detail)
        for i, doc in enumerate(docs):
            if not again or i >= first_document:
                skips.good += 1
                yield sample * POSITIONS + i, doc


def read_source_unit(
    spec: SourceSpec, unit: Unit, skip: int, skips: Skips, settings: StreamSettings
) -> Iterator[tuple[int, Document]]:
    """`read_raw_unit` for a source of raw shards, megatron.py's for a Megatron indexed
    dataset, else `read_unit`."""
    if is_unit(unit.url):
        return read_megatron_unit(unit.url, unit.k, unit.j, skip, skips, settings.vocab_size)
    if spec.tokenize:
        return read_raw_unit(unit, skip, skips, spec, settings)
    return read_unit(unit, skip, skips, settings)


def _shard_damage(item: dict | Damage) -> bool:
    """Damage that costs the shard's rest; a `too_large` sample holds its own place instead."""
    return isinstance(item, Damage) and item.reason != "too_large"


def _count_lost(unit: Unit, seen: int, damage: Sequence[Damage], skips: Skips) -> None:
    """Count the documents of `unit` that never arrived (after `seen` samples of its shard)."""
    held = held_samples(unit.url)
    mine = len(range(unit.j, held, unit.k)) - len(range(unit.j, seen, unit.k)) if held else 0
    if not damage and mine > 0:
        damage = [Damage("truncated_shard", 0, f"the shard ended after {seen} of {held} samples")]
    for i, report in enumerate(damage):
        last = i == len(damage) - 1
        n = max(1, mine - len(damage) + 1) if last else 1
        skips.skip(report.reason, unit.url, f"after #{seen}", report.detail, n)


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
        """Whether the current epoch gave a document yet."""
        self._units: tuple[int, tuple[Unit, ...]] = (-1, ())

    @property
    def exhausted(self) -> bool:
        return bool(self.spec.max_epochs) and self.epoch >= self.spec.max_epochs

    def units(self, epoch: int) -> tuple[Unit, ...]:
        """This stream's share of `epoch` (see `deal`)."""
        if self._units[0] != epoch:
            s = self.settings
            shares = deal(
                self.spec.urls, s.n_streams, epoch, s.seed + self.index, self.spec.members
            )
            self._units = (epoch, shares[self.stream])
        return self._units[1]

    def next(self, skips: Skips) -> Pending | None:
        """The next document of this epoch; None at its end (the reader then stands at the
        start of the next epoch) or once the cap is reached."""
        while not self.exhausted:
            if self._docs is None:
                units = self.units(self.epoch)
                if self.unit >= len(units):
                    self._end_epoch()
                    return None
                unit = units[self.unit]
                self._docs = read_source_unit(self.spec, unit, self.sample, skips, self.settings)
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


def _pending(docs: dict[tuple, Document], ref: Sequence) -> Pending:
    """A pack-buffer entry from its reference: [*ref, offset] (decompose: [..., size])."""
    pending = Pending(docs[tuple(ref[:4])], tuple(ref[:4]), ref[0], ref[4])
    if len(ref) > 5:
        pending.remaining = ref[5]
    return pending


ODDS_SHARDS = 8
"""Shards that the natural odds of a source without length digits are measured on."""


def natural_odds(
    sources: Sequence[SourceSpec], settings: StreamSettings, max_docs: int = 4096
) -> tuple[float, ...]:
    """Each bucket's share of the tokens, every source weighted by its weight: the natural
    curriculum's odds. Exact from the `length_digits` of the source's shards in the manifest
    beside them (`mmfm prepare` writes them); otherwise measured on up to `max_docs` documents
    of up to `ODDS_SHARDS` shards spread over the source (raw and Megatron sources, shards of
    an older mmfm). Every rank computes the same odds, so every stream draws the same lengths."""
    mass = np.zeros(len(settings.buckets))
    for spec in sources:
        share = _manifest_mass(spec, settings)
        if share is None:
            share = _sampled_mass(spec, settings, max_docs)
        if share.sum():
            mass += spec.weight * share / share.sum()
    if not mass.sum():
        raise DataError(
            f"data.curriculum=natural: the sources {[s.name for s in sources]} hold no "
            "document of a bucket length: lower data.buckets or use curriculum: grow_p2"
        )
    return tuple((mass / mass.sum()).tolist())


def _manifest_mass(spec: SourceSpec, settings: StreamSettings) -> np.ndarray | None:
    """Tokens per bucket of every shard of `spec` by the manifests, or None if one lacks them."""
    if spec.tokenize:
        return None
    digits = np.zeros(LENGTH_DIGITS, np.int64)
    for url in spec.urls:
        found = None if is_unit(url) else (shard_record(url) or {}).get("length_digits")
        if not isinstance(found, list) or len(found) != LENGTH_DIGITS:
            return None
        try:
            digits += np.asarray(found, np.int64)
        except (TypeError, ValueError):
            return None
    return bucket_mass(digits, settings.buckets, settings.remainder)


def _sampled_mass(spec: SourceSpec, settings: StreamSettings, max_docs: int) -> np.ndarray:
    """Tokens per bucket of the first documents of shards spread evenly over `spec`."""
    count = min(ODDS_SHARDS, len(spec.urls))
    picks = np.unique(np.linspace(0, len(spec.urls) - 1, count).round().astype(int))
    lengths: list[int] = []
    for i in picks:
        docs = read_source_unit(spec, Unit(spec.urls[i], 1, 0), 0, Skips(1.0), settings)
        lengths += [len(doc.tokens) for _, doc in islice(docs, max(1, max_docs // len(picks)))]
    return bucket_mass(length_digits(lengths), settings.buckets, settings.remainder)


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
