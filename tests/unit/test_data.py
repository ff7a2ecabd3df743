"""Shards, packing and the loader on real tar files, including broken ones."""

import io
import tarfile

import numpy as np
import pytest

from mmfm.data.batch import IGNORE_INDEX, Modality
from mmfm.data.demo import demo_documents, ensure_demo_shards
from mmfm.data.loader import Cursor, DocumentStream, PackedLoader, pack_rows, resolve_paths
from mmfm.data.packing import modality_weight_table
from mmfm.data.shards import Document, ShardError, expand_paths, read_shard, write_shard


def doc(key, tokens, modality=None):
    tokens = np.asarray(tokens, dtype=np.int32)
    modality = (
        np.zeros(len(tokens), np.uint8) if modality is None else np.asarray(modality, np.uint8)
    )
    return Document(tokens, modality, key, "test")


def write_docs(path, docs):
    write_shard(path, docs)
    return str(path)


def test_shard_round_trip(tmp_path):
    docs = [doc("a", [1, 2, 3], [0, 3, 3]), doc("b", [7]), doc("c", list(range(50)))]
    url = write_docs(tmp_path / "s.tar", docs)
    back = list(read_shard(url))
    assert [d.key for d in back] == ["a", "b", "c"]
    for d, e in zip(docs, back, strict=True):
        assert np.array_equal(d.tokens, e.tokens) and np.array_equal(d.modality, e.modality)
    assert back[0].segments() == [["text", 0, 1], ["dna", 1, 3]]
    assert [d.key for d in read_shard(url, skip=2)] == ["c"]


def packed(docs, seq_len, weights=None, rows=None):
    stream = DocumentStream([write_docs(packed.tmp / "p.tar", docs)], seed=0)
    table = modality_weight_table(weights or {})
    out = []
    for row, _ in pack_rows(stream, Cursor(), seq_len, table):
        out.append(row)
        if len(out) == rows:
            return out
    return out


@pytest.fixture(autouse=True)
def _tmp(tmp_path):
    packed.tmp = tmp_path


def test_packing_invariants():
    docs = [doc("a", [10, 11, 12]), doc("b", [20]), doc("c", [30, 31, 32, 33]), doc("d", [40, 41])]
    row0, row1 = packed(docs, seq_len=8, rows=2)
    # a and b fill 4 slots, c fits exactly: 3 + 1 + 4 = 8.
    assert row0["tokens"].tolist() == [10, 11, 12, 20, 30, 31, 32, 33]
    assert row0["doc_ids"].tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert row0["positions"].tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    ignore = IGNORE_INDEX
    assert row0["labels"].tolist() == [11, 12, ignore, ignore, 31, 32, 33, ignore]
    assert row0["loss_weights"].tolist() == [1, 1, 0, 0, 1, 1, 1, 0]
    # d, then the next epoch begins with a (and b), then one slot of padding.
    assert row1["tokens"].tolist() == [40, 41, 10, 11, 12, 20, 0, 0]
    assert row1["doc_ids"].tolist() == [0, 0, 1, 1, 1, 2, 3, 3]
    assert row1["positions"].tolist() == [0, 1, 0, 1, 2, 0, 0, 1]


def test_document_that_does_not_fit_starts_the_next_row():
    docs = [doc("a", [1] * 5), doc("b", [2] * 5)]
    row0, row1 = packed(docs, seq_len=8, rows=2)
    assert row0["tokens"].tolist() == [1] * 5 + [0] * 3
    # The padding is a document of its own, with restarting positions and no targets.
    assert row0["doc_ids"].tolist() == [0] * 5 + [1] * 3
    assert row0["positions"][5:].tolist() == [0, 1, 2]
    assert (row0["labels"][4:] == IGNORE_INDEX).all() and row0["loss_weights"][4:].sum() == 0
    assert row1["tokens"][:5].tolist() == [2] * 5


def test_long_document_is_split_with_targets_across_the_cut():
    docs = [doc("a", list(range(100, 120)))]
    rows = packed(docs, seq_len=8, rows=3)
    assert rows[0]["tokens"].tolist() == list(range(100, 108))
    # The last token of a piece still predicts the next token of the document.
    assert rows[0]["labels"].tolist() == list(range(101, 109))
    assert rows[1]["positions"].tolist() == list(range(8))
    assert rows[2]["tokens"][:4].tolist() == list(range(116, 120))
    assert rows[2]["labels"][3] == IGNORE_INDEX


def test_target_modality_and_loss_weights():
    # <bos> text | dna dna | text: each target carries the modality of the token it predicts.
    d = doc("a", [1, 2, 3, 4, 5], [0, 0, 3, 3, 0])
    (row,) = packed([d], seq_len=5, weights={"dna": 0.25}, rows=1)
    assert row["modality"][:4].tolist() == [0, 3, 3, 0]
    assert row["loss_weights"].tolist() == [1, 0.25, 0.25, 1, 0]


def test_every_document_is_recovered_from_the_rows(tmp_path):
    docs = demo_documents(0)[:200]
    rows = packed(docs, seq_len=128, rows=400)
    recovered, current = [], []
    for row in rows:
        for d in np.unique(row["doc_ids"]):
            sel = row["doc_ids"] == d
            if (row["tokens"][sel] == 0).all():
                continue  # padding (demo documents never hold token 0)
            current.extend(row["tokens"][sel].tolist())
            # A piece ends its document when its last label is IGNORE_INDEX.
            if row["labels"][sel][-1] == IGNORE_INDEX:
                recovered.append(current)
                current = []
    flat = [d.tokens.tolist() for d in docs]
    assert recovered[: len(flat)] == flat


def test_loader_resume_is_exact(tmp_path):
    urls = ensure_demo_shards(tmp_path)

    def loader():
        return PackedLoader(DocumentStream(urls, seed=5), 64, 4, 2, {"image": 0.5})

    straight = loader()
    for _ in range(30):
        straight.next_step()
    state = straight.state_dict()
    expected = [straight.next_step() for _ in range(5)]
    resumed = loader()
    resumed.load_state_dict(state)
    for want, got in zip(expected, (resumed.next_step() for _ in range(5)), strict=True):
        for a, b in zip(want, got, strict=True):
            assert a.tokens.equal(b.tokens) and a.labels.equal(b.labels)
            assert a.loss_weights.equal(b.loss_weights) and a.doc_ids.equal(b.doc_ids)


def test_dp_ranks_split_the_global_batch(tmp_path):
    urls = ensure_demo_shards(tmp_path)
    whole = PackedLoader(DocumentStream(urls, 0), 64, 4, 4, {}).next_step()[0]
    halves = [
        PackedLoader(DocumentStream(urls, 0), 64, 4, 2, {}, r, 2).next_step()[0] for r in (0, 1)
    ]
    assert whole.tokens[:2].equal(halves[0].tokens) and whole.tokens[2:].equal(halves[1].tokens)


def test_epochs_visit_shards_in_a_new_order(tmp_path):
    stream = DocumentStream([f"s{i}" for i in range(8)], seed=0)
    assert sorted(stream.shard_order(0)) == sorted(stream.shard_order(1))
    assert stream.shard_order(0) != stream.shard_order(1)


def test_demo_corpus_is_deterministic(tmp_path):
    a = ensure_demo_shards(tmp_path / "a")
    b = ensure_demo_shards(tmp_path / "b")
    for x, y in zip(a, b, strict=True):
        assert [d.tokens.tolist() for d in read_shard(x)] == [
            d.tokens.tolist() for d in read_shard(y)
        ]
    kinds = {tuple(sorted(set(d.modality.tolist()))) for d in read_shard(a[0])}
    assert (Modality.TEXT, Modality.IMAGE) in kinds and (Modality.TEXT, Modality.DNA) in kinds


def test_paths_expand_braces_and_directories(tmp_path):
    for i in range(3):
        write_docs(tmp_path / f"x-{i:06d}.tar", [doc(f"k{i}", [1, 2])])
    braces = expand_paths([str(tmp_path / "x-{000000..000002}.tar")])
    assert braces == expand_paths([str(tmp_path)]) and len(braces) == 3
    with pytest.raises(ShardError, match="does not exist"):
        expand_paths([str(tmp_path / "missing-{0..1}.tar")])
    with pytest.raises(ShardError, match="unknown built-in dataset"):
        resolve_paths(["builtin:nope"], str(tmp_path))


# -- bad data ---------------------------------------------------------------------------------


def test_truncated_shard_names_the_file(tmp_path):
    url = write_docs(tmp_path / "t.tar", [doc(f"k{i}", list(range(300))) for i in range(20)])
    with open(url, "rb") as f:
        data = f.read()
    for cut in (len(data) // 2 + 100, len(data) // 2 // 512 * 512):  # mid-member, at a block
        with open(url, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(ShardError, match=r"t\.tar is truncated"):
            list(read_shard(url))


def _raw_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_sample_missing_a_member_names_the_key(tmp_path):
    url = _raw_tar(tmp_path / "m.tar", {"k1.json": b'{"segments": []}'})
    with pytest.raises(ShardError, match=r"m.tar, sample 'k1': needs members tokens.npy and json"):
        list(read_shard(url))


def test_pickled_arrays_are_refused_not_loaded(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
    url = _raw_tar(tmp_path / "p.tar", {"k.tokens.npy": buf.getvalue(), "k.json": b"{}"})
    with pytest.raises(ShardError, match="cannot decode"):
        list(read_shard(url))


def test_segments_must_cover_the_document(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.arange(4, dtype=np.int32))
    meta = b'{"segments": [["text", 0, 2]]}'
    url = _raw_tar(tmp_path / "s.tar", {"k.tokens.npy": buf.getvalue(), "k.json": meta})
    with pytest.raises(ShardError, match="do not cover all 4 tokens"):
        list(read_shard(url))


def test_empty_shards_fail_clearly(tmp_path):
    url = _raw_tar(tmp_path / "e.tar", {})
    with pytest.raises(ShardError, match="no documents"):
        next(DocumentStream([url], 0).documents(Cursor()))
