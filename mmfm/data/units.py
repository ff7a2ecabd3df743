"""Unit readers: the documents of one unit of the deal (deal.py), from a given position on,
every one delivered or counted (skips.py). Prepared shards (`read_unit`), raw shards
tokenized as they are read (`read_raw_unit`, raw_stream.py) and Megatron indexed datasets
(megatron.py), behind one `read_source_unit`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from mmfm.core.types import Document
from mmfm.data.deal import Unit
from mmfm.data.manifest import held_samples
from mmfm.data.megatron import is_unit
from mmfm.data.megatron import read_unit as read_megatron_unit
from mmfm.data.raw_stream import POSITIONS, RawTokenizer
from mmfm.data.settings import SourceSpec, StreamSettings
from mmfm.data.shards import ShardError, decode_sample
from mmfm.data.skips import Skips
from mmfm.data.tario import Damage, read_tar


def read_unit(
    unit: Unit, skip: int, skips: Skips, settings: StreamSettings
) -> Iterator[tuple[int, Document]]:
    """(kept index, document) of a unit from the `skip`-th kept sample on; bad ones counted.

    Every document of the unit is either delivered or counted: a bad sample as itself, a
    damaged, cut or stalled shard by the documents it lost (the shard's `manifest.json` says
    how many it holds; without one, at least one each time).
    """
    seen, damage = 0, []  # samples read (all units of the shard), damage reports
    for item in read_tar(unit.url, settings.read_timeout_s, max_member=settings.max_member):
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
            doc = decode_sample(item, unit.url, settings.vocab_size)
        except ShardError as e:
            skips.skip(e.reason, unit.url, key, str(e))
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
        spec.fields,
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
