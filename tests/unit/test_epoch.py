"""Global epochs: every document once across all streams before any repeats.

Documents carry their id in every token (id + 10), so the rows tell which documents were read,
and how much of each.
"""

from collections import Counter

import numpy as np
import pytest

from mmfm.core.errors import DataError
from mmfm.core.types import Document
from mmfm.data.deal import EXTRA_UNITS, deal
from mmfm.data.loader import StreamingLoader
from mmfm.data.shards import write_shard
from mmfm.data.sizing import shard_sizes
from mmfm.testing import source_spec, stream_settings

SEQ = 64
STREAMS = 8


def skewed_corpus(root, docs_per_shard, seed=0):
    """Shards holding `docs_per_shard[i]` documents of 3..90 tokens; returns (urls, lengths)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    urls, lengths, next_id = [], {}, 0
    for s, count in enumerate(docs_per_shard):
        docs = []
        for i in range(next_id, next_id + count):
            lengths[i] = n = int(rng.integers(3, 90))
            docs.append(Document(np.full(n, i + 10, np.int64), np.zeros(n, np.uint8), f"d{i}"))
        next_id += count
        write_shard(root / f"part-{s:06d}.tar", docs)
        urls.append(str(root / f"part-{s:06d}.tar"))
    return tuple(urls), lengths


SKEWED = [10, 37, 64, 91, 118, 145, 172, 200]  # 837 documents in as many shards as streams
EVEN = [60] * STREAMS  # the 480 documents


def run_loader(urls, max_epochs, steps=None):
    """Global batches (rows of token ids) until the sources run out or `steps` are done."""
    settings = stream_settings(STREAMS, seq_len=SEQ, shuffle_buffer=8, pack_buffer=4)
    ld = StreamingLoader([source_spec("a", urls, max_epochs=max_epochs)], settings, 2)
    steps_out = []
    with pytest.raises(DataError, match="every source reached its max_epochs"):
        while steps is None or len(steps_out) < steps:
            steps_out.append(np.concatenate([b.tokens.numpy() for b in ld.next_step()]))
        raise DataError("every source reached its max_epochs (the steps asked for are done)")
    return steps_out


def doc_tokens(rows) -> Counter:
    return Counter(int(t) - 10 for t in np.asarray(rows).ravel() if t > 0)


@pytest.mark.parametrize("sizes", [EVEN, SKEWED], ids=["even", "skewed"])
def test_one_epoch_reads_every_document_exactly_once(tmp_path, sizes):
    urls, lengths = skewed_corpus(tmp_path / "c", sizes)
    steps = run_loader(urls, max_epochs=1)
    assert doc_tokens(steps) == Counter(lengths)
    # The streams ran dry at about the same time (the shares are balanced by tokens; packing
    # pads each differently): few rows wait, empty, for the others to finish.
    rows = np.concatenate(steps)
    empty = int((rows == 0).all(axis=1).sum())
    assert empty <= 0.1 * len(rows), f"{empty} empty rows of {len(rows)}"


@pytest.mark.parametrize("sizes", [EVEN, SKEWED], ids=["even", "skewed"])
def test_no_document_repeats_before_every_document_was_seen(tmp_path, sizes):
    urls, lengths = skewed_corpus(tmp_path / "c", sizes)
    total = sum(lengths.values())
    steps = run_loader(urls, max_epochs=0, steps=3 * total // (STREAMS * SEQ))
    seen: Counter = Counter()
    all_seen = first_repeat = None
    for step, rows in enumerate(steps):
        seen.update(doc_tokens(rows))
        if first_repeat is None and any(seen[d] > lengths[d] for d in seen):
            first_repeat = step
        if all_seen is None and all(seen[d] >= n for d, n in lengths.items()):
            all_seen = step
    assert all_seen is not None and first_repeat is not None
    # Streams cannot wait for each other: a stream done with its share of an epoch starts the
    # next one. The shares are balanced by tokens, so that happens near the end of the epoch
    # (before: at 59% of it with even shards, at 2% with skewed ones).
    assert first_repeat >= 0.85 * all_seen, (first_repeat, all_seen, len(steps))


def test_shares_are_balanced_by_tokens(tmp_path):
    urls, _ = skewed_corpus(tmp_path / "c", SKEWED)
    sizes = dict(zip(urls, shard_sizes(urls), strict=True))
    for epoch in range(3):
        shares = deal(urls, STREAMS, epoch, 0)
        loads = [sum(sizes[u.url].slice(u.k, u.j) for u in share) for share in shares]
        assert max(loads) / min(loads) < 1.05, loads
        # every sample of every shard is in exactly one unit (samples j mod k)
        for url in urls:
            units = [u for share in shares for u in share if u.url == url]
            owners = Counter(i for i in range(sizes[url].samples) for u in units if i % u.k == u.j)
            assert sorted(owners) == list(range(sizes[url].samples))
            assert set(owners.values()) == {1}
        # each unit is one read of its shard: a few per stream and epoch at most
        assert sum(len(share) for share in shares) <= len(urls) + EXTRA_UNITS * STREAMS


def ranks_run(urls, dp, max_epochs, steps, state=None):
    """`steps` global batches from `dp` data-parallel loaders (their counters summed as the
    trainer sums them), stopping early where every rank runs out at the same step."""
    settings = stream_settings(STREAMS, seq_len=SEQ, shuffle_buffer=8, pack_buffer=4)
    source = source_spec("a", urls, max_epochs=max_epochs)
    ranks = [StreamingLoader([source], settings, 2, r, dp) for r in range(dp)]
    for ld in ranks:
        if state is not None:
            ld.load_state_dict(state)
    out = []
    for _ in range(steps):
        rows, ended = [], 0
        for ld in ranks:
            try:
                rows.append(np.concatenate([b.tokens.numpy() for b in ld.next_step()]))
            except DataError as e:
                assert "every source reached its max_epochs" in str(e)
                ended += 1
        assert ended in (0, dp), "the ranks ran out at different steps"
        if ended:
            break
        counts = np.sum([ld.step_counts() for ld in ranks], axis=0).tolist()
        for ld in ranks:
            ld.note_totals(counts)
        out.append(np.concatenate(rows))
    return out, StreamingLoader.merge_states([ld.state_dict() for ld in ranks])


@pytest.mark.parametrize("max_epochs", [1, 0], ids=["one_pass", "unlimited"])
def test_elastic_resume_across_the_end_of_an_epoch(tmp_path, max_epochs):
    urls, lengths = skewed_corpus(tmp_path / "c", SKEWED)
    straight, _ = ranks_run(urls, 1, max_epochs, 110)
    # 2 ranks until some streams have finished their share (after 86 to 102 rows), then 4
    before, state = ranks_run(urls, 2, max_epochs, 92)
    after, _ = ranks_run(urls, 4, max_epochs, 110 - 92, state)
    resumed = before + after
    assert len(resumed) == len(straight)
    assert all(np.array_equal(a, b) for a, b in zip(straight, resumed, strict=True))
    if max_epochs == 1:  # the ranks stopped together, once every document was read
        assert len(straight) < 110 and doc_tokens(straight) == Counter(lengths)
