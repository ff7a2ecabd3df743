"""Dataset Decomposition: exact pieces, the step's token budget, curricula, exact and
elastic resume, and the start-up checks of the bucket lengths.

Documents carry their id in every token (id + 10), as in test_loader.py, so every token of a
row can be traced back to its document.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfm.config import ConfigError, load_config
from mmfm.core.types import Document
from mmfm.data.decompose import bucket_mass, bucket_pieces, length_digits, step_length
from mmfm.data.loader import StreamingLoader
from mmfm.data.odds import natural_odds
from mmfm.data.shards import write_shard
from mmfm.data.stream import SourcesExhausted
from mmfm.model.attention import DocumentSdpa, SdpaMasked, document_layout
from mmfm.testing import source_spec, stream_settings

SEQ, BUCKETS, STREAMS = 64, (8, 16, 32, 64), 8


def corpus(root, n_docs=160, n_shards=4):
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    lengths, urls = {}, []
    for s, chunk in enumerate(np.array_split(np.arange(n_docs), n_shards)):
        docs = []
        for i in chunk:
            n = lengths[int(i)] = int(rng.integers(3, 150))  # some longer than a row
            docs.append(Document(np.full(n, i + 10, np.int64), np.zeros(n, np.uint8), f"d{i}"))
        write_shard(root / f"part-{s:06d}.tar", docs)
        urls.append(str(root / f"part-{s:06d}.tar"))
    return tuple(urls), lengths


def loader(urls, dp_rank=0, dp_size=1, steps=12, seq_len=SEQ, buckets=BUCKETS, **kw):
    kw = {"curriculum": "grow_p2", "num_cycles": 2, "remainder": "drop", **kw}
    settings = stream_settings(
        STREAMS, seq_len=seq_len, shuffle_buffer=8, pack_buffer=4, packing="decompose",
        buckets=buckets, steps=steps, **kw,
    )  # fmt: skip
    sources = [source_spec("a", urls, max_epochs=1)]
    return StreamingLoader(sources, settings, 2, dp_rank, dp_size)


def tokens(batches) -> np.ndarray:
    return np.concatenate([b.tokens.numpy() for b in batches])


@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_pieces_of_a_document_are_exact(remainder):
    for length in [*range(1, 300), 1000, 4097]:
        pieces, dropped = bucket_pieces(length, BUCKETS, remainder)
        starts = [start for start, _ in pieces]
        sizes = [size for _, size in pieces]
        # contiguous from 0, in document order: they concatenate back to the document
        assert starts == list(np.cumsum([0, *sizes])[:-1])
        assert sum(sizes) + dropped == length
        if remainder == "drop":
            assert all(s in BUCKETS for s in sizes) and dropped < BUCKETS[0]
            assert dropped == length % BUCKETS[0]
        else:
            assert dropped == 0 and all(s in BUCKETS for s in sizes[:-1])
        # at most one piece of each bucket below the largest (the binary digits)
        small = Counter(s for s in sizes if s < BUCKETS[-1])
        assert all(n == 1 for n in small.values())


def test_grow_p2_cycles_short_to_long_and_fixed_keeps_the_largest():
    lengths = [step_length(s, BUCKETS, "grow_p2", 2, 16) for s in range(20)]
    assert lengths[:8] == [8, 8, 16, 16, 32, 32, 64, 64] == lengths[8:16]
    assert lengths[16:] == [8, 8, 16, 16]  # past train.steps the cycles go on
    assert {step_length(s, BUCKETS, "fixed", 2, 16) for s in range(20)} == {64}


def _run_dry(loaders):
    """Steps of `loaders` (one per data-parallel rank) until the sources are exhausted; the
    counters are summed over the ranks, as the trainer does."""
    steps = []
    while len(steps) < 200:
        try:
            steps.append(np.concatenate([tokens(ld.next_step()) for ld in loaders]))
        except SourcesExhausted:
            return steps
        summed = np.sum([ld.step_counts() for ld in loaders], axis=0).tolist()
        for ld in loaders:
            ld.note_totals(summed)
    raise AssertionError("the sources never ran out")


@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_every_step_holds_the_token_budget_in_one_document_rows(tmp_path, remainder):
    urls, lengths = corpus(tmp_path / "c")
    ld = loader(urls, remainder=remainder)
    steps = _run_dry([ld])
    assert len(steps) > 12
    for s, rows in enumerate(steps):
        # One length per step (the curriculum's) and always global_batch_size x seq_len tokens.
        assert rows.shape[1] == step_length(s, BUCKETS, "grow_p2", 2, 12)
        assert rows.size == STREAMS * SEQ
        for row in rows:  # one document per row, then padding
            ids = row[row > 0]
            assert len(set(ids.tolist())) <= 1 and np.all(row[: len(ids)] > 0)
    # One pass: every token of every document exactly once, but the dropped remainders.
    seen = Counter(int(t) - 10 for rows in steps for t in rows.ravel() if t > 0)
    drop = remainder == "drop"
    want = {d: n - (n % BUCKETS[0] if drop else 0) for d, n in lengths.items()}
    assert seen == Counter({d: n for d, n in want.items() if n})


def test_metrics_report_the_step_length_and_the_drops(tmp_path):
    urls, _ = corpus(tmp_path / "c")
    ld = loader(urls)
    ld.next_step()
    metrics = ld.describe(ld.step_counts())
    assert metrics["data/seq_len"] == 8
    assert metrics["data/dropped_tokens"] > 0 and 0 <= metrics["data/padding"] < 1


def test_exact_and_elastic_resume_lose_and_repeat_nothing(tmp_path):
    urls, _ = corpus(tmp_path / "c")
    reference = _run_dry([loader(urls)])
    ranks = [loader(urls, r, 4) for r in range(4)]
    got = [np.concatenate([tokens(ld.next_step()) for ld in ranks]) for _ in range(5)]
    state = StreamingLoader.merge_states([ld.state_dict() for ld in ranks])
    for dp in (1, 2):  # exact on one rank, elastic on two
        resumed = [loader(urls, r, dp) for r in range(dp)]
        for ld in resumed:
            ld.load_state_dict(state)
        steps = got + _run_dry(resumed)
        assert len(steps) == len(reference)
        assert all(np.array_equal(a, b) for a, b in zip(reference, steps, strict=True)), dp


def test_a_longer_context_stage_reads_on_and_repeats_nothing(tmp_path):
    urls, lengths = corpus(tmp_path / "c")
    first = loader(urls)
    steps = [tokens(first.next_step()) for _ in range(4)]
    # The next stage: rows up to 128 tokens, the stream continues from the last one's state.
    longer = loader(urls, seq_len=128, buckets=(*BUCKETS, 128), curriculum="natural")
    longer.load_state_dict(first.state_dict())
    steps += _run_dry([longer])
    seen = Counter(int(t) - 10 for rows in steps for t in rows.ravel() if t > 0)
    want = {d: n - n % BUCKETS[0] for d, n in lengths.items()}
    assert seen == Counter({d: n for d, n in want.items() if n})
    assert {rows.shape[1] for rows in steps[4:]} > {64}  # natural draws several lengths


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["data.buckets=[16,48]"], r"data\.buckets .*powers of two"),
        (["data.buckets=[16,32]", "data.seq_len=48", "model.max_seq_len=48"], r"divide"),
        (["data.buckets=[]"], r"needs data\.buckets"),
        (["parallel.cp=4", "parallel.dp_shard=1"], r"bucket 4 .*2 x parallel\.cp \(8\)"),
        (["parallel.pp=2"], r"decompose .*parallel\.pp"),
    ],
)
def test_bucket_lengths_are_checked_at_start_up(overrides, match):
    base = ["data.packing=decompose", "data.buckets=[4,8,16,32,64]", "data.seq_len=64"]
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*base, "model.max_seq_len=64", "model.n_layers=4", *overrides])


def test_docs_attention_takes_one_call_for_one_document_rows():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 16, 4, 8), torch.randn(3, 16, 2, 8), torch.randn(3, 16, 2, 8)
    doc_ids = torch.full((3, 16), 2)
    layout = document_layout(doc_ids)
    assert layout.identity and layout.groups == ((3, 16),) and layout.perm.numel() == 0
    want = SdpaMasked()(q, k, v, SdpaMasked().prepare(doc_ids))
    torch.testing.assert_close(DocumentSdpa()(q, k, v, layout), want)


@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_length_digits_give_every_bucketing_its_token_shares(remainder):
    lengths = np.random.default_rng(3).integers(1, 20000, 500)
    digits = length_digits(lengths)
    for buckets in [(8, 16, 32, 64), (256, 512, 1024, 2048, 4096, 8192), (32,), (1, 2)]:
        want = np.zeros(len(buckets))
        for n in lengths:
            for _, size in bucket_pieces(int(n), buckets, remainder)[0]:
                want[buckets.index(max(size, buckets[0]))] += size
        assert bucket_mass(digits, buckets, remainder).tolist() == want.tolist(), buckets


def test_natural_odds_come_from_the_manifest_else_from_shards_across_the_source(tmp_path):
    """Short documents first, long ones in the later shards (a corpus prepared source by
    source): the first shard alone would give every step the shortest length."""
    root, urls, lengths = tmp_path / "c", [], []
    root.mkdir()
    for s, n in enumerate([9, 9, 60, 60]):
        docs = [Document(np.full(n, 10, np.int64), np.zeros(n, np.uint8), "d") for _ in range(20)]
        write_shard(root / f"p-{s}.tar", docs)
        urls.append(str(root / f"p-{s}.tar"))
        lengths += [n] * 20
    settings = stream_settings(2, seq_len=SEQ, packing="decompose", buckets=BUCKETS)
    source = source_spec("a", tuple(urls))
    want = bucket_mass(length_digits(lengths), BUCKETS, "drop")
    sampled = natural_odds([source], settings)  # no manifest: the first documents of 4 shards
    assert np.allclose(sampled, want / want.sum()) and sampled[-1] == 0 and sampled[1] > 0
    few = natural_odds([source], settings, max_docs=4)  # one document from each shard
    assert np.allclose(few, want / want.sum())
    # A manifest that says every document is 64 long: the odds are read from it, not measured.
    shards = [{"file": Path(u).name, "length_digits": length_digits([64] * 20)} for u in urls]
    (root / "manifest.json").write_text(json.dumps({"shards": shards}))
    assert natural_odds([source], settings) == (0.0, 0.0, 0.0, 1.0)
    shards[2]["length_digits"] = [1, 2]  # one shard's entry is unusable: measured again
    (root / "manifest.json").write_text(json.dumps({"shards": shards}))
    assert np.allclose(natural_odds([source], settings), want / want.sum())
