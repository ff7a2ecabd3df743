"""The streaming loader on real tar files: mixing, exact and elastic resume, http, bad data.

Documents carry their id in every token (id + 10), so rows can be traced back to documents.
"""

import functools
import http.server
import io
import json
import logging
import os
import signal
import tarfile
import threading
import time
from collections import Counter

import numpy as np
import pytest

from mmfm.core.errors import CheckpointError, DataError
from mmfm.core.types import Document
from mmfm.data.loader import Loader, StreamingLoader
from mmfm.data.shards import write_shard
from mmfm.data.stream import VirtualStream
from mmfm.testing import source_spec, stream_settings

SEQ = 64


def corpus(root, n_docs=600, n_shards=6, seed=0, start=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ids = np.arange(start, start + n_docs)
    urls = []
    for s, chunk in enumerate(np.array_split(ids, n_shards)):
        docs = []
        for i in chunk:
            n = int(rng.integers(3, 90))  # some longer than a row: split
            docs.append(Document(np.full(n, i + 10, np.int64), np.zeros(n, np.uint8), f"d{i}"))
        path = root / f"part-{s:06d}.tar"
        write_shard(path, docs)
        urls.append(str(path))
    return tuple(urls)


def settings(n_streams=8, **kw):
    kw = {"shuffle_buffer": 8, "pack_buffer": 4, **kw}
    return stream_settings(n_streams, seq_len=SEQ, **kw)


def loader(urls, dp_rank=0, dp_size=1, n_streams=8, workers=0, max_epochs=0, **kw):
    sources = [source_spec("a", urls, max_epochs=max_epochs)]
    return StreamingLoader(
        sources, settings(n_streams, **kw), 2, dp_rank, dp_size, num_workers=workers
    )


def rows_of(batches):
    return np.concatenate([b.tokens.numpy() for b in batches])


@pytest.mark.slow  # a run with 0, 1 and 3 loader workers: 40 s on 2 loaded cores
@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker:UserWarning")
def test_exact_resume_with_any_number_of_workers(tmp_path):
    urls = corpus(tmp_path / "c")
    straight = loader(urls)
    for _ in range(5):
        straight.next_step()
    state = straight.state_dict()
    want = [rows_of(straight.next_step()) for _ in range(4)]
    for workers in (0, 3):  # 3 DataLoader workers for 8 streams: shares of 3, 3 and 2
        with loader(urls, workers=workers) as resumed:
            resumed.load_state_dict(state)
            got = [rows_of(resumed.next_step()) for _ in range(4)]
        assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True)), workers


def test_a_checkpoint_of_another_run_is_a_checkpoint_error(tmp_path):
    urls = corpus(tmp_path / "c")
    ld = loader(urls)
    assert isinstance(ld, Loader)
    state = ld.state_dict()
    with pytest.raises(CheckpointError, match="not a streaming-loader state"):
        ld.load_state_dict({**state, "format": "other"})
    with pytest.raises(CheckpointError, match=r"global_batch_size=4 .* resume with the same"):
        ld.load_state_dict({**state, "n_streams": 4})
    with pytest.raises(CheckpointError, match=r"differ from data\.sources"):
        loader(urls[:3]).load_state_dict(state)


def test_a_dead_worker_is_one_data_error_not_a_hang_nor_a_traceback(tmp_path):
    with loader(corpus(tmp_path / "c"), workers=1) as ld:
        ld.next_step()
        (worker,) = ld.workers
        os.kill(worker.pid, signal.SIGKILL)  # as the kernel's out-of-memory killer does
        time.sleep(0.5)  # torch's SIGCHLD handler would raise its RuntimeError in whatever runs
        with pytest.raises(DataError) as e:  # found at the next wait for the worker
            for _ in range(20):
                ld.next_step()
    message = str(e.value)
    assert f"loader worker 0 (pid {worker.pid}) was killed by SIGKILL" in message
    assert "out-of-memory killer" in message and "lower data.num_workers" in message


def doc_lengths(n_docs=600, seed=0) -> dict[int, int]:
    rng = np.random.default_rng(seed)
    return {i: int(rng.integers(3, 90)) for i in range(n_docs)}


def tokens_per_doc(rows) -> Counter:
    return Counter(int(t) - 10 for t in np.concatenate(rows).ravel() if t > 0)


@pytest.mark.parametrize(("before", "after"), [(4, 2), (2, 4)])
def test_elastic_resume_loses_and_repeats_nothing(tmp_path, before, after):
    urls = corpus(tmp_path / "c")
    # Reference: one rank for the whole run; each stream reads its documents once (cap 1).
    ref = loader(urls, max_epochs=1)
    ref_rows = [rows_of(ref.next_step()) for _ in range(12)]

    ranks = [loader(urls, r, before, max_epochs=1) for r in range(before)]
    rows = [np.concatenate([rows_of(ld.next_step()) for ld in ranks]) for _ in range(6)]
    state = StreamingLoader.merge_states([ld.state_dict() for ld in ranks])
    ranks = [loader(urls, r, after, max_epochs=1) for r in range(after)]
    for ld in ranks:
        ld.load_state_dict(state)
    rows += [np.concatenate([rows_of(ld.next_step()) for ld in ranks]) for _ in range(6)]

    # The very same global batches as one rank without interruption ...
    assert all(np.array_equal(a, b) for a, b in zip(ref_rows, rows, strict=True))
    # ... and no document twice: no id has more tokens in the rows than the document has.
    seen, lengths = tokens_per_doc(rows), doc_lengths()
    assert len(seen) > 100 and all(seen[d] <= lengths[d] for d in seen)


def test_one_epoch_shows_every_document_exactly_once(tmp_path):
    urls = corpus(tmp_path / "c", n_docs=200)
    lengths = doc_lengths(200)
    ld = loader(urls, n_streams=1, max_epochs=1)
    rows = []
    with pytest.raises(DataError, match="every source reached its max_epochs"):
        while True:
            rows.append(rows_of(ld.next_step()))
    # When the source runs out the buffers drain into last rows: every document exactly once.
    assert tokens_per_doc(rows) == Counter(lengths)


def test_mixing_follows_the_weights(tmp_path):
    # Weights are shares of tokens; b's documents are 4x longer than a's.
    a = corpus(tmp_path / "a", n_docs=300, n_shards=3)
    b = corpus(tmp_path / "b", n_docs=300, n_shards=3, start=1000, seed=1)
    sources = [source_spec("a", a, 0.7), source_spec("b", b, 0.3)]
    stream = VirtualStream(0, sources, settings(1))
    tokens = Counter()
    for _ in range(20_000):
        pending = stream._draw()
        tokens[pending.source] += len(pending.doc.tokens)
    share = tokens[0] / (tokens[0] + tokens[1])
    assert abs(share - 0.7) < 0.02, share


def test_repetition_cap_stops_a_source(tmp_path):
    a = corpus(tmp_path / "a", n_docs=50, n_shards=1)
    b = corpus(tmp_path / "b", n_docs=300, n_shards=3, start=1000)
    sources = [source_spec("a", a, 0.9, max_epochs=1), source_spec("b", b, 0.1)]
    stream = VirtualStream(0, sources, settings(1))
    drawn = Counter(stream._draw().source for _ in range(2000))
    assert drawn[0] == 50  # a's one pass, then only b


def test_a_source_too_small_for_the_streams_is_a_clear_error(tmp_path):
    small = corpus(tmp_path / "small", n_docs=3, n_shards=1)  # 3 documents, 8 streams
    big = corpus(tmp_path / "big", n_docs=300, n_shards=3, start=1000)
    sources = [source_spec("small", small, 0.5), source_spec("big", big, 0.5)]
    assert VirtualStream(2, sources, settings(8))._draw().source == 0  # stream 2 gets one
    starved = VirtualStream(5, sources, settings(8))
    with pytest.raises(DataError, match="source 'small' gave stream 5 no document in 8 epochs"):
        for _ in range(100):
            starved._draw()
    # through a loader worker the message arrives as it is, without a traceback
    with (
        loader(small, workers=1) as ld,
        pytest.raises(DataError, match=r"^source 'a' gave stream 3 no document") as info,
    ):
        ld.next_step()
    assert "Traceback" not in str(info.value)


def test_mixing_is_reported_in_the_metrics(tmp_path):
    a = corpus(tmp_path / "a", n_docs=300, n_shards=3)
    b = corpus(tmp_path / "b", n_docs=300, n_shards=3, start=1000)
    ld = StreamingLoader([source_spec("a", a, 3.0), source_spec("b", b)], settings(8), 2)
    mix, padding = [], []
    for _ in range(30):
        ld.next_step()
        metrics = ld.describe(ld.step_counts())
        mix.append(metrics["data/mix/a"])
        padding.append(metrics["data/padding"])
    assert np.mean(mix) == pytest.approx(0.75, abs=0.05)
    assert 0 <= np.mean(padding) < 0.3


def test_http_streaming_gives_the_same_batches(tmp_path):
    urls = corpus(tmp_path / "c")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "c"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        remote = tuple(f"http://127.0.0.1:{port}/{u.rsplit('/', 1)[1]}" for u in urls)
        # One stream: the deal of several weighs shards by size, which is read from local
        # tar headers but is unknown for a stream (so shards count as equal).
        local_rows = [rows_of(loader(urls, n_streams=1).next_step()) for _ in range(1)]
        ld = loader(remote, n_streams=1)
        remote_rows = [rows_of(ld.next_step()) for _ in range(1)]
        assert np.array_equal(local_rows[0], remote_rows[0])
    finally:
        server.shutdown()


# -- bad data -----------------------------------------------------------------------------------


def _member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _npy(values):
    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype=np.uint16))
    return buf.getvalue()


def bad_corpus(root):
    """Good documents plus one of every kind of bad data."""
    urls = list(corpus(root, n_docs=60, n_shards=3))
    with tarfile.open(root / "bad-000000.tar", "w") as tar:
        _member(tar, "a.tokens.npy", b"not an npy file")
        _member(tar, "a.json", b'{"segments": [["text", 0, 3]]}')
        _member(tar, "b.json", b'{"segments": []}')  # missing tokens.npy
        _member(tar, "c.tokens.npy", _npy([]))  # empty document
        _member(tar, "c.json", b'{"segments": []}')
        _member(tar, "d.tokens.npy", _npy([5, 6]))
        _member(
            tar, "d.json", b'{"segments": [["text", 0, 2]], "source": "\\xff\xfe"}'
        )  # bad UTF-8
    urls.append(str(root / "bad-000000.tar"))
    data = (root / "part-000000.tar").read_bytes()
    (root / "truncated-000000.tar").write_bytes(data[: len(data) // 2])
    (root / "corrupt-000000.tar").write_bytes(data[:2048] + b"\x07" * 4096 + data[6144:])
    return (*urls, str(root / "truncated-000000.tar"), str(root / "corrupt-000000.tar"))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_bad_data_is_skipped_and_counted(tmp_path):
    records = _Records()
    logging.getLogger("mmfm.data").addHandler(records)
    urls = bad_corpus(tmp_path / "c")
    source = source_spec("a", urls, max_epochs=1)  # one pass: each bad item once
    ld = StreamingLoader([source], settings(1, max_error_rate=0.5), 1)
    totals = Counter()
    with pytest.raises(DataError, match="every source reached its max_epochs"):
        while True:
            ld.next_step()
            totals.update(dict(zip(ld.count_keys(), ld.step_counts(), strict=True)))
    skipped = {k.split("/")[1]: v for k, v in totals.items() if k.startswith("skipped/") and v}
    # Per reason, over the whole pass (the last, failed step's counts are in the stream).
    assert dict(ld._rows.streams[0].skips.counts) == {
        "bad_sample": 2,  # an undecodable .npy, invalid UTF-8 in the json
        "missing_field": 2,  # a sample without tokens.npy, the cut sample of the truncated tar
        "empty": 1,
        "truncated_shard": 1,
        "corrupt_shard": 1,
    }
    assert skipped and set(skipped) <= set(ld._rows.streams[0].skips.counts)  # reported per step
    logging.getLogger("mmfm.data").removeHandler(records)
    text = "\n".join(records.messages)
    assert "bad-000000.tar, sample" in text and "truncated at byte" in text
    assert text.count("(bad_sample)") == 1  # logged once per shard and reason


def test_too_many_bad_documents_stop_with_a_clear_error(tmp_path):
    bad_corpus(tmp_path / "c")
    many = tuple([str(tmp_path / "c" / "bad-000000.tar")] * 40)
    ld = StreamingLoader([source_spec("a", many)], settings(1), 1)
    with pytest.raises(DataError, match=r"over data.max_error_rate=0.01.*raise data.max_error"):
        for _ in range(100):
            ld.next_step()


def test_pipe_sources_give_the_same_batches(tmp_path):
    urls = corpus(tmp_path / "c")
    piped = tuple(f"pipe:cat {u}" for u in urls)
    local, pipe = loader(urls, n_streams=1), loader(piped, n_streams=1)  # see the http test
    assert np.array_equal(rows_of(local.next_step()), rows_of(pipe.next_step()))


def test_documents_lost_in_a_cut_shard_count_toward_max_error_rate(tmp_path):
    # 300 documents in 3 shards, with the manifest `mmfm prepare` writes; one shard is cut
    # to a fifth: 80 documents lost, counted as 80 (not as one event) against the rate.
    urls = corpus(tmp_path / "c", n_docs=300, n_shards=3)
    shards = [{"file": u.rsplit("/", 1)[1], "samples": 100} for u in urls]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({"shards": shards}))
    data = (tmp_path / "c" / "part-000001.tar").read_bytes()
    (tmp_path / "c" / "part-000001.tar").write_bytes(data[: len(data) // 5 // 512 * 512])
    stream = VirtualStream(0, [source_spec("a", urls, max_epochs=1)], settings(1))
    with pytest.raises(DataError, match=r"over data.max_error_rate=0.01"):
        for _ in range(300):
            stream._draw()
    assert stream.skips.counts["truncated_shard"] + stream.skips.counts["missing_field"] >= 79
