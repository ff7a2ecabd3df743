"""Fuzzing the shard reader on a real shard: random truncations, byte flips, zeroed pages and
damaged headers. Every run either delivers each document equal to the original or counts it;
no loss goes uncounted and no exception leaves the reader."""

import functools
import json
import tarfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmfm.core.types import Document
from mmfm.data.deal import Unit
from mmfm.data.shards import write_shard
from mmfm.data.skips import Skips
from mmfm.data.units import read_unit
from mmfm.testing import stream_settings

N = 12


def _docs():
    rng = np.random.default_rng(0)
    out = []
    for i in range(N):
        n = int(rng.integers(1, 300))
        tokens = rng.integers(0, 2**16 if i % 2 else 70_000, n)  # uint16 and int32 arrays
        modality = np.zeros(n, np.uint8)
        modality[n // 2 :] = 1 + i % 5
        no_loss = ((0, n // 3),) if i % 3 == 0 else ()
        out.append(Document(tokens, modality, f"doc-{i}", f"src{i}", no_loss))
    return out


DOCS = _docs()


@functools.cache
def _shard(root: Path) -> tuple[bytes, list[int]]:
    """The shard's bytes and its member header offsets (a manifest beside it says N)."""
    write_shard(root / "original.tar", DOCS)
    entry = {"file": "s.tar", "samples": N}
    (root / "manifest.json").write_text(json.dumps({"shards": [entry]}))
    with tarfile.open(root / "original.tar") as tar:
        headers = [m.offset for m in tar.getmembers()]
    return (root / "original.tar").read_bytes(), headers


def _same(a: Document, b: Document) -> bool:
    return (
        np.array_equal(a.tokens, b.tokens)
        and np.array_equal(a.modality, b.modality)
        and (a.key, a.source, a.no_loss) == (b.key, b.source, b.no_loss)
    )


damage = st.one_of(
    st.tuples(st.just("cut"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("zero_page"), st.floats(0, 1)),
    st.tuples(st.just("header"), st.integers(0, 10**6), st.integers(0, 511), st.integers(0, 255)),
)


def _apply(data: bytearray, headers: list[int], change) -> bytearray:
    kind = change[0]
    if kind == "cut":
        return data[: int(change[1] * len(data))]
    if not data:
        return data
    if kind == "flip":
        data[min(int(change[1] * len(data)), len(data) - 1)] ^= change[2]
    elif kind == "zero_page":
        start = int(change[1] * len(data)) // 4096 * 4096
        data[start : start + 4096] = bytes(len(data[start : start + 4096]))
    elif (at := headers[change[1] % len(headers)] + change[2]) < len(data):
        data[at] = change[3]  # a byte of a member header set to a value
    return data


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(changes=st.lists(damage, min_size=1, max_size=3))
def test_every_document_is_delivered_intact_or_counted(tmp_path_factory, changes):
    root = tmp_path_factory.getbasetemp() / "fuzz-shards"
    root.mkdir(exist_ok=True)
    original, headers = _shard(root)
    data = bytearray(original)
    for change in changes:
        data = _apply(data, headers, change)
    (root / "s.tar").write_bytes(bytes(data))
    skips = Skips(1.0)
    got = [d for _, d in read_unit(Unit(str(root / "s.tar"), 1, 0), 0, skips, _SETTINGS)]
    by_key = {d.key: d for d in DOCS}
    assert all(d.key in by_key and _same(d, by_key[d.key]) for d in got), "a damaged document"
    assert len({d.key for d in got}) == len(got), "a document twice"
    assert len(got) + sum(skips.counts.values()) >= N, (len(got), dict(skips.counts))
    if bytes(data) == original:
        assert len(got) == N and not skips.counts


_SETTINGS = stream_settings(1, seq_len=64, vocab_size=70_000)
