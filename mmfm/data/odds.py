"""The natural curriculum's odds (packing=decompose, decompose.py): each bucket's share of
the tokens of the sources, from their manifests or measured on a sample of their documents."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice

import numpy as np

from mmfm.core.errors import DataError
from mmfm.data.deal import Unit
from mmfm.data.decompose import LENGTH_DIGITS, bucket_mass, length_digits
from mmfm.data.manifest import shard_record
from mmfm.data.megatron import is_unit
from mmfm.data.settings import SourceSpec, StreamSettings
from mmfm.data.skips import Skips
from mmfm.data.units import read_source_unit

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
