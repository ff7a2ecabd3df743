"""Megatron indexed datasets as a training source (mmfm/data/megatron.py), written here by
megatron-core's own `IndexedDatasetBuilder`.

Documents carry their id in every token (id + 10), so rows tell which documents were read and
how much of each. Skipped only where megatron-core cannot be installed (outside CI).
"""

import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mmfm.config import ConfigError, load_config
from mmfm.core.errors import DataError, LaunchError
from mmfm.core.types import Document, Modality
from mmfm.data import deal as mdeal
from mmfm.data import megatron as mdata
from mmfm.data.loader import StreamingLoader, build_loader
from mmfm.data.shards import write_shard
from mmfm.data.skips import Skips
from mmfm.data.source_reader import SourceReader
from mmfm.prepare.megatron_out import write_megatron
from mmfm.testing import source_spec, stream_settings

from helpers import megatron_indexed_or_skip

# megatron-core's builder calls numpy.array on torch tensors, which numpy 2 deprecates. One
# worker runs the files that need megatron-core (make test: --dist loadgroup; its import takes
# ~7 s of CPU), at their first test instead of at every worker's collection.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.xdist_group("megatron"),
]


@pytest.fixture(scope="module", autouse=True)
def mcore():
    """megatron-core's own indexed_dataset module: without it every test here skips (fails
    under CI)."""
    return megatron_indexed_or_skip()


SEQ = 64


def lengths(n_docs, seed=0, start=0) -> dict[int, int]:
    rng = np.random.default_rng(seed)
    return {start + i: int(rng.integers(3, 90)) for i in range(n_docs)}


def build(prefix, docs: dict[int, int], dtype=np.uint16) -> str:
    """A dataset of megatron-core's builder: every third document in two sequences (as
    preprocess_data.py --split-sentences writes them), the others in one."""
    builder = mdata.megatron_indexed().IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for i, n in docs.items():
        tokens = np.full(n, i + 10, np.int64)
        if i % 3 == 0:
            builder.add_item(_torch(tokens[: n // 2]))
            builder.add_item(_torch(tokens[n // 2 :]))
            builder.end_document()
        else:
            builder.add_document(_torch(tokens), [n])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _torch(array):
    import torch

    return torch.from_numpy(array)


def settings(n_streams=8, **kw):
    kw = {"shuffle_buffer": 8, "pack_buffer": 4, **kw}
    return stream_settings(n_streams, seq_len=SEQ, **kw)


def spec(prefix, name="m", weight=1.0, max_epochs=0):
    return source_spec(name, tuple(mdata.unit_urls([prefix])), weight, max_epochs=max_epochs)


def rows_of(batches):
    return np.concatenate([b.tokens.numpy() for b in batches])


def tokens_per_doc(rows) -> Counter:
    return Counter(int(t) - 10 for t in np.concatenate(rows).ravel() if t > 0)


def test_every_document_streams_with_its_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(mdata, "BLOCK_DOCS", 50)  # several units per prefix
    docs = lengths(300)
    prefix = build(tmp_path / "corpus_text_document", docs)
    source = spec(prefix, max_epochs=1)
    assert len(source.urls) == 6
    read = {}
    for stream in range(8):  # the deal gives each document to one stream
        reader = SourceReader(0, source, settings(), stream)
        while (pending := reader.next(Skips(0.5))) is not None:
            doc = pending.doc
            assert doc.key not in read
            read[doc.key] = doc
    assert len(read) == 300
    for key, doc in read.items():
        i = int(key.split(":")[1])
        assert np.array_equal(doc.tokens, np.full(docs[i], i + 10))
        assert (doc.modality == Modality.TEXT).all()
    # ... and through the loader, packed into rows: every token of every document once
    ld = StreamingLoader([spec(prefix, max_epochs=1)], settings(), 2)
    rows = []
    with pytest.raises(DataError, match="every source reached its max_epochs"):
        while True:
            rows.append(rows_of(ld.next_step()))
    assert tokens_per_doc(rows) == Counter(docs)


def test_mixing_with_webdataset_holds_the_shares(tmp_path):
    prefix = build(tmp_path / "m", lengths(300))
    wds_docs = lengths(300, seed=1, start=1000)
    docs = [
        Document(np.full(n, i + 10), np.zeros(n, np.uint8), f"d{i}") for i, n in wds_docs.items()
    ]
    write_shard(tmp_path / "w-000000.tar", docs)
    sources = [spec(prefix), source_spec("w", (str(tmp_path / "w-000000.tar"),))]
    ld = StreamingLoader(sources, settings(), 2)
    mix = []
    for _ in range(20):
        ld.next_step()
        mix.append(ld.describe(ld.step_counts())["data/mix/m"])
    assert np.mean(mix) == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize(("before", "after"), [(1, 1), (4, 2)])
def test_resume_is_exact_and_elastic(tmp_path, before, after):
    prefix = build(tmp_path / "m", lengths(600))
    ref = StreamingLoader([spec(prefix, max_epochs=1)], settings(), 2)
    ref_rows = [rows_of(ref.next_step()) for _ in range(10)]

    def ranks(n):
        return [
            StreamingLoader([spec(prefix, max_epochs=1)], settings(), 2, r, n) for r in range(n)
        ]

    first = ranks(before)
    rows = [np.concatenate([rows_of(ld.next_step()) for ld in first]) for _ in range(5)]
    state = StreamingLoader.merge_states([ld.state_dict() for ld in first])
    second = ranks(after)
    for ld in second:
        ld.load_state_dict(state)
    rows += [np.concatenate([rows_of(ld.next_step()) for ld in second]) for _ in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(ref_rows, rows, strict=True))
    seen, want = tokens_per_doc(rows), lengths(600)
    assert len(seen) > 100 and all(seen[d] <= want[d] for d in seen)


class Touched:
    """An array of the index that records which of its entries are read (all of them when
    numpy takes it whole: cumsum, diff, asarray, fancy indexing)."""

    def __init__(self, array):
        self.array, self.read = array, set()

    def __len__(self):
        return len(self.array)

    @property
    def shape(self):
        return self.array.shape

    def __getitem__(self, key):
        if isinstance(key, slice):
            self.read.update(range(*key.indices(len(self.array))))
        elif isinstance(key, int | np.integer):
            self.read.add(int(key) % len(self.array))
        else:
            self.read.update(range(len(self.array)))
        return self.array[key]

    def __array__(self, dtype=None, copy=None):
        self.read.update(range(len(self.array)))
        return self.array if dtype is None else self.array.astype(dtype)


def test_a_rank_reads_only_its_share_of_the_index(tmp_path, monkeypatch, mcore):
    """Two ranks of 4 streams each, one after the other in this process, each from a fresh
    open of the dataset: each reads its own documents' entries of the index and a few per
    unit, not all of them."""
    monkeypatch.setattr(mdata, "BLOCK_DOCS", 50)
    docs = lengths(600)
    prefix = build(tmp_path / "m", docs)
    construct, arrays = mdata._construct, {}

    def tracked(cls, path):
        dataset = construct(cls, path)
        for name in ("document_indices", "sequence_lengths", "sequence_pointers"):
            arrays[name] = Touched(getattr(dataset.index, name))
            setattr(dataset.index, name, arrays[name])
        return dataset

    monkeypatch.setattr(mdata, "_construct", tracked)
    reference = mcore.IndexedDataset(prefix)  # held: its arrays die with it (mmap closed)
    full = np.array(reference.document_indices)
    mine = []
    for rank in range(2):
        for cache in (mdata._open, mdata._units, mdeal.deal):
            cache.cache_clear()
        source = spec(prefix, max_epochs=1)
        units = [mdata._parse(u)[1:] for u in source.urls]
        read = {}
        for stream in range(4 * rank, 4 * rank + 4):  # the streams of rank `rank` of 2
            reader = SourceReader(0, source, settings(), stream)
            while (pending := reader.next(Skips(0.5))) is not None:
                read[int(pending.doc.key.split(":")[1])] = pending.doc
        assert all(np.array_equal(doc.tokens, np.full(docs[i], i + 10)) for i, doc in read.items())
        mine.append(set(read))
        edges = {e for unit in units for e in unit}
        assert arrays["document_indices"].read <= {e for d in read for e in (d, d + 1)} | edges
        sequences = {s for d in read for s in range(full[d], full[d + 1])}
        ends = {s for e in edges for s in (full[e], full[e] - 1) if 0 <= s < full[-1]}
        for name in ("sequence_lengths", "sequence_pointers"):
            assert arrays[name].read <= sequences | ends, name
            assert len(arrays[name].read) < 0.6 * full[-1], name
    assert not mine[0] & mine[1] and mine[0] | mine[1] == set(docs)
    assert 0.4 < len(mine[0]) / len(docs) < 0.6


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no 2nd traceback
def test_a_damaged_index_is_one_clear_error(tmp_path):
    prefix = build(tmp_path / "m", lengths(20))
    index = Path(f"{prefix}.idx")
    raw = index.read_bytes()
    index.write_bytes(b"NOTANIDX!" + raw[9:])
    with pytest.raises(DataError, match=r"m\.idx cannot be read .* rebuild it"):
        mdata.unit_urls([prefix])
    index.write_bytes(raw[:40])  # cut inside the sequence lengths
    with pytest.raises(DataError, match=r"m\.idx cannot be read"):
        mdata.unit_urls([prefix])
    with pytest.raises(DataError, match=r"no \.bin/\.idx pair matches"):
        mdata.unit_urls([str(tmp_path / "nothing*")])


def test_a_cut_bin_and_foreign_ids_are_counted_skips(tmp_path):
    docs = lengths(40)
    prefix = build(tmp_path / "m", docs, dtype=np.int32)
    cut = sum(docs[i] for i in range(30)) * 4 + 8  # 2 tokens into document 30
    os.truncate(f"{prefix}.bin", cut)
    skips = Skips(0.5)
    (url,) = mdata.unit_urls([prefix])
    got = [d.key for _, d in mdata.read_unit(url, 1, 0, 0, skips, vocab_size=35)]
    # ids 10..34 fit a vocabulary of 35: documents 0-24; 25-29 hold ids past it; 30-39 are cut
    assert got == [f"m:{i}" for i in range(25)]
    assert dict(skips.counts) == {"bad_sample": 5, "truncated_shard": 10}


def test_the_config_names_a_megatron_source(tmp_path):
    prefix = build(tmp_path / "corpus_text_document", lengths(20))
    source = f"{{name: m, kind: megatron, paths: [{tmp_path}/*.idx]}}"
    loader = build_loader(load_config(None, [f"data.sources=[{source}]"]))
    assert loader.sources[0].urls == (f"megatron:{prefix}#0:20",)
    with pytest.raises(ConfigError, match=r"kind='megatronlm' is not one of webdataset, megatron"):
        load_config(None, ["data.sources=[{name: m, kind: megatronlm, paths: [x]}]"])
    with pytest.raises(ConfigError, match="a megatron source holds token ids; drop tokenize"):
        load_config(None, ["data.sources=[{name: m, kind: megatron, paths: [x], tokenize: t}]"])


def test_damaged_document_boundaries_are_counted_or_refused(tmp_path, monkeypatch, mcore):
    monkeypatch.setattr(mdata, "BLOCK_DOCS", 10)
    prefix = build(tmp_path / "m", lengths(20))
    index = Path(f"{prefix}.idx")
    raw = index.read_bytes()
    reference = mcore.IndexedDataset(prefix)  # held while its arrays are read
    n_seq, ends = len(reference), np.array(reference.document_indices)
    at = 34 + 12 * n_seq  # header, then int32 lengths, int64 pointers, int64 boundaries

    def damage(i, value):
        damaged = ends.copy()
        damaged[i] = value
        index.write_bytes(raw[:at] + damaged.tobytes() + raw[at + ends.nbytes :])
        for cache in (mdata._open, mdata._units):
            cache.cache_clear()

    damage(5, ends[4] - 1)  # document 4 would end before it starts
    skips = Skips(0.5)
    got = [
        d.key for url in mdata.unit_urls([prefix]) for _, d in mdata.read_unit(url, 1, 0, 0, skips)
    ]
    assert "m:4" not in got and len(got) == 19 and dict(skips.counts) == {"bad_sample": 1}
    damage(10, n_seq + 5)  # a unit's boundary past the sequences
    with pytest.raises(DataError, match=r"m\.idx cannot be read \(documents 0:10 span"):
        mdata.unit_urls([prefix])


def test_a_bin_longer_than_its_index_is_warned_about(tmp_path, caplog):
    prefix = build(tmp_path / "m", lengths(20))
    with open(f"{prefix}.bin", "ab") as f:
        f.write(b"\0" * 64)
    with caplog.at_level("WARNING", logger="mmfm.data"):
        (url,) = mdata.unit_urls([prefix])
    assert "m.bin holds 64 bytes past the last document" in caplog.text
    assert len(list(mdata.read_unit(url, 1, 0, 0, Skips(0.0)))) == 20


def test_without_megatron_core_the_error_names_the_extra(tmp_path, monkeypatch):
    prefix = build(tmp_path / "other", lengths(5))
    monkeypatch.setitem(sys.modules, "megatron.core.datasets", None)  # as if not installed
    with pytest.raises(LaunchError, match=r"pip install 'mmfm\[megatron\]'"):
        mdata.unit_urls([prefix])


def test_modality_sidecar_round_trip_and_damage(tmp_path):
    mixed = np.array([Modality.TEXT] * 3 + [Modality.DNA] * 4 + [Modality.TEXT] * 2, np.uint8)
    docs = [Document(np.arange(9) + i, mixed, f"d{i}", "s", ((0, 3),)) for i in range(12)]
    write_shard(tmp_path / "s-000000.tar", docs)
    write_megatron(tmp_path, "m", [str(tmp_path / "s-000000.tar")], 300)
    (url,) = mdata.unit_urls([str(tmp_path)])  # the folder: m, not its m.spans sidecar
    back = [d for _, d in mdata.read_unit(url, 1, 0, 0, Skips(0.0))]
    assert [d.tokens.tolist() for d in back] == [d.tokens.tolist() for d in docs]
    assert all(np.array_equal(d.modality, mixed) and d.no_loss == ((0, 3),) for d in back)
    spans = tmp_path / "m.spans.bin"
    spans.write_bytes(np.full(spans.stat().st_size // 4, 7, np.int32).tobytes())
    skips = Skips(1.0)
    assert list(mdata.read_unit(url, 1, 0, 0, skips)) == []
    assert dict(skips.counts) == {"bad_sample": 12}


def test_a_negative_sequence_length_is_a_counted_bad_sample(tmp_path):
    docs = lengths(6, start=1)  # documents 1..6: no split sequence (every third is split)
    prefix = build(tmp_path / "m", {i: n for i, n in docs.items() if i % 3}, dtype=np.int32)
    index = Path(f"{prefix}.idx")
    raw = bytearray(index.read_bytes())
    raw[34 + 4 * 2 : 34 + 4 * 3] = np.int32(-1).tobytes()  # sequence 2: length -1
    index.write_bytes(bytes(raw))
    skips = Skips(0.5)
    (url,) = mdata.unit_urls([prefix])
    got = [len(d.tokens) for _, d in mdata.read_unit(url, 1, 0, 0, skips)]
    # megatron-core reads a length of -1 as "the rest of the .bin": one document of all of it
    assert got == [docs[i] for i in (1, 2, 5)] and dict(skips.counts) == {"bad_sample": 1}


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("code", [6, 7], ids=["float64", "float32"])
def test_a_float_dtype_code_is_refused(code, tmp_path):
    prefix = build(tmp_path / "m", lengths(10), dtype=np.int32)
    index = Path(f"{prefix}.idx")
    raw = bytearray(index.read_bytes())
    raw[17] = code  # the header's dtype code: token ids read as floats are all 0
    index.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"m\.idx cannot be read .*float.* not token ids"):
        mdata.unit_urls([prefix])
