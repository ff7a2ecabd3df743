"""Shards, packing and the loader on real tar files, including broken ones."""

import io
import tarfile

import numpy as np
import pytest

from mmfm.core.types import Document, Modality
from mmfm.data.demo import NUM_SHARDS, demo_documents, ensure_demo_shards
from mmfm.data.loader import StreamingLoader, resolve_paths
from mmfm.data.shards import ShardError, expand_paths, read_shard, write_shard
from mmfm.testing import source_spec, stream_settings


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


def test_dp_ranks_split_the_global_batch(tmp_path):
    urls = tuple(ensure_demo_shards(tmp_path))

    def loader(dp_rank=0, dp_size=1, mbs=4):
        settings = stream_settings(4, seq_len=64)
        return StreamingLoader([source_spec("d", urls)], settings, mbs, dp_rank, dp_size)

    whole = loader().next_step()[0]
    halves = [loader(r, 2, 2).next_step()[0] for r in (0, 1)]
    assert whole.tokens[:2].equal(halves[0].tokens) and whole.tokens[2:].equal(halves[1].tokens)


def test_demo_corpus_is_deterministic(tmp_path):
    a = ensure_demo_shards(tmp_path / "a")
    b = ensure_demo_shards(tmp_path / "b")
    for x, y in zip(a, b, strict=True):
        assert [d.tokens.tolist() for d in read_shard(x)] == [
            d.tokens.tolist() for d in read_shard(y)
        ]
    kinds = {tuple(sorted(set(d.modality.tolist()))) for d in read_shard(a[0])}
    assert (Modality.TEXT, Modality.IMAGE) in kinds and (Modality.TEXT, Modality.DNA) in kinds


def test_demo_held_out_split_holds_no_training_document(tmp_path):
    """`builtin:demo:held_out` (the demo recipe's eval data) is one shard of the same
    generator drawn with another seed: other keys, and not one document the model trains on."""
    held_out = resolve_paths(["builtin:demo:held_out"], str(tmp_path))
    assert len(held_out) == 1 and held_out[0].startswith(str(tmp_path))
    docs = list(read_shard(held_out[0]))
    train = [d for shard in range(NUM_SHARDS) for d in demo_documents(shard)]
    assert len(docs) == len(train) // NUM_SHARDS
    assert not {d.key for d in docs} & {d.key for d in train}
    assert not {d.tokens.tobytes() for d in docs} & {d.tokens.tobytes() for d in train}
    kinds = {tuple(sorted(set(d.modality.tolist()))) for d in docs}
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
        with pytest.raises(ShardError, match=r"t\.tar is truncated at byte"):
            list(read_shard(url))
    # A damaged header in the middle: tarfile alone would stop there without a word.
    with open(url, "wb") as f:
        f.write(data[:1024] + b"\x07" * 512 + data[1536:])
    with pytest.raises(ShardError, match=r"t\.tar has a damaged tar header at byte 1024"):
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
