"""Damaged, cut, stalled and malformed shards: every document is delivered intact or counted.

Each shard is a real tar written by `write_shard`, with a `manifest.json` beside it (as
`mmfm prepare` writes) so that the documents a damaged shard lost can be counted.
"""

import contextlib
import functools
import http.server
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from mmfm.core.types import Document
from mmfm.data.deal import Unit
from mmfm.data.loader import StreamingLoader
from mmfm.data.shards import write_shard
from mmfm.data.skips import Skips
from mmfm.data.tario import Interrupted
from mmfm.data.units import read_unit
from mmfm.testing import source_spec, stream_settings
from mmfm.train.trainer import StopSignal

N = 20


def docs(n=N):
    return [
        Document(np.full(5 + i, 100 + i, np.int64), np.zeros(5 + i, np.uint8), f"d{i}")
        for i in range(n)
    ]


def shard(root, name="s.tar", n=N, manifest=True):
    root.mkdir(parents=True, exist_ok=True)
    write_shard(root / name, docs(n))
    if manifest:
        entry = {"file": name, "samples": n}
        (root / "manifest.json").write_text(
            json.dumps({"format": "mmfm-shards/1", "shards": [entry]})
        )
    return root / name


def members(path):
    """(name, header offset, data offset, size) of every member."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tar.getmembers()]


def read(url, **settings):
    skips = Skips(1.0)
    s = stream_settings(1, seq_len=64, **settings)
    got = [doc for _, doc in read_unit(Unit(str(url), 1, 0), 0, skips, s)]
    return got, dict(skips.counts)


def assert_intact_or_counted(got, counts, n=N):
    originals = {d.key: d for d in docs(n)}
    for d in got:
        assert np.array_equal(d.tokens, originals[d.key].tokens), d.key
    assert len(got) + sum(counts.values()) >= n, (len(got), counts)


def test_a_zeroed_header_costs_its_sample_and_reading_goes_on(tmp_path):
    path = shard(tmp_path)
    data = bytearray(path.read_bytes())
    offset = next(m[1] for m in members(path) if m[0] == "0000005.tokens.npy")
    data[offset : offset + 512] = bytes(512)
    path.write_bytes(data)
    got, counts = read(path)
    assert [d.key for d in got] == [f"d{i}" for i in range(N) if i != 5]
    assert counts["corrupt_shard"] >= 1 and counts.get("missing_field", 0) == 1
    assert_intact_or_counted(got, counts)


def test_a_zero_page_mid_shard_is_counted_and_the_rest_is_read(tmp_path):
    path = shard(tmp_path)
    data = bytearray(path.read_bytes())
    start = len(data) // 3 // 4096 * 4096
    data[start : start + 4096] = bytes(4096)
    path.write_bytes(data)
    got, counts = read(path)
    assert counts["corrupt_shard"] >= 1
    assert got[-1].key == f"d{N - 1}"  # the documents after the page arrive
    assert_intact_or_counted(got, counts)


def _cut_at_member_boundary(path, keep_samples):
    """The bytes of the shard up to the header of sample `keep_samples` (no end blocks)."""
    offset = min(m[1] for m in members(path) if m[0].startswith(f"{keep_samples:07d}."))
    return path.read_bytes()[:offset]


@pytest.mark.parametrize("how", ["file", "pipe:cat", "pipe:head"])
def test_a_shard_cut_at_a_member_boundary_counts_its_lost_documents(tmp_path, how):
    path = shard(tmp_path)
    cut = _cut_at_member_boundary(path, 12)
    if how == "pipe:head":
        url = f"pipe:head -c {len(cut)} {path}"
    else:
        path.write_bytes(cut)
        url = path if how == "file" else f"pipe:cat {path}"
    got, counts = read(url)
    assert [d.key for d in got] == [f"d{i}" for i in range(12)]
    assert counts == {"truncated_shard": 8}  # the manifest says 20: the 8 lost are counted
    # without a manifest: at least one, never none
    (tmp_path / "manifest.json").unlink()
    assert read(url)[1] == {"truncated_shard": 1}


def test_a_shard_with_fewer_samples_than_its_manifest_is_counted(tmp_path):
    path = shard(tmp_path)
    write_shard(path, docs(15))  # replaced by a shorter one; the manifest still says 20
    got, counts = read(path)
    assert len(got) == 15 and counts == {"truncated_shard": 5}


def _sample(tar, key, tokens, meta: bytes):
    buf = io.BytesIO()
    np.save(buf, np.asarray(tokens, dtype=np.uint16))
    for name, data in ((f"{key}.tokens.npy", buf.getvalue()), (f"{key}.json", meta)):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


BAD_JSON = [
    b'{"segments": 5}',
    b'{"segments": [["text", 0, 2.5]]}',
    b'[["text", 0, 3]]',
    b'{"segments": [["text", 0, 3]], "no_loss": 7}',
    b'{"segments": [["text", false, 3]]}',
    b'{"segments": [["text", 0, 3]], "source": ["x"]}',
]


def test_a_malformed_sample_costs_that_sample_only(tmp_path):
    with tarfile.open(tmp_path / "m.tar", "w") as tar:
        for i in range(20):
            meta = BAD_JSON[i // 3] if i % 3 == 1 and i // 3 < len(BAD_JSON) else None
            _sample(tar, f"{i:04d}", [1, 2, 3], meta or b'{"segments": [["text", 0, 3]]}')
    got, counts = read(tmp_path / "m.tar")
    assert counts == {"bad_sample": len(BAD_JSON)}
    assert len(got) == 20 - len(BAD_JSON)


def test_ids_outside_the_vocabulary_are_bad_samples_named_with_shard_and_key(tmp_path, caplog):
    with tarfile.open(tmp_path / "v.tar", "w") as tar:
        _sample(tar, "good", [1, 2, 3], b'{"segments": [["text", 0, 3]]}')
        _sample(tar, "big", [1, 500, 3], b'{"segments": [["text", 0, 3]]}')
    buf = io.BytesIO()
    np.save(buf, np.asarray([1, -4, 3], dtype=np.int32))
    with tarfile.open(tmp_path / "n.tar", "w") as tar:
        for name, data in (
            ("neg.tokens.npy", buf.getvalue()),
            ("neg.json", b'{"segments": [["text", 0, 3]]}'),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with caplog.at_level(logging.WARNING, "mmfm.data"):
        got, counts = read(tmp_path / "v.tar", vocab_size=400)
        neg, neg_counts = read(tmp_path / "n.tar", vocab_size=400)
    assert [d.key for d in got] == ["good"] and counts == {"bad_sample": 1}
    assert neg == [] and neg_counts == {"bad_sample": 1}
    assert "v.tar, sample 'big'" in caplog.text and "model.vocab_size=400" in caplog.text
    assert "n.tar, sample 'neg'" in caplog.text
    assert [d.key for d in read(tmp_path / "v.tar")[0]] == ["good", "big"]  # 0: not checked


def test_a_stalled_pipe_is_counted_after_the_read_timeout(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "mmfm.data"):
        got, counts = read("pipe:sleep 600", read_timeout_s=1.5)
    assert got == [] and counts == {"timeout_shard": 1}  # not the pipe's end, 600 s later
    assert "waiting for data" in caplog.text and "data.read_timeout_s" in caplog.text
    assert "no data for 1.5 s (data.read_timeout_s); moved on" in caplog.text


# -- http ------------------------------------------------------------------------------------


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Serves files with Range support; the first `cuts` plain GETs of a shard stop at `cut_at`
    bytes and close the connection, without Content-Length (as a server streaming it would)."""

    root, cut_at, cuts, ranges = None, 0, 0, True
    requests: ClassVar[list] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        header = self.headers.get("Range")
        type(self).requests.append(header)
        if header and self.ranges:
            start = int(header.split("=")[1].rstrip("-"))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        if path.suffix == ".tar" and type(self).cuts > 0:
            type(self).cuts -= 1
            self.end_headers()
            self.wfile.write(data[start : self.cut_at])
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture
def flaky(tmp_path):
    handler = type("Handler", (_Flaky,), {"root": tmp_path, "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_broken_http_transfer_resumes_with_range(tmp_path, flaky):
    handler, base = flaky
    path = shard(tmp_path)
    handler.cut_at, handler.cuts = len(_cut_at_member_boundary(path, 7)), 2
    got, counts = read(f"{base}/s.tar")
    assert [d.key for d in got] == [f"d{i}" for i in range(N)] and counts == {}
    assert [r for r in handler.requests if r] == [f"bytes={handler.cut_at}-"] * 2


def test_a_broken_http_transfer_that_cannot_resume_is_counted(tmp_path, flaky):
    handler, base = flaky
    path = shard(tmp_path)
    handler.cut_at, handler.cuts, handler.ranges = len(_cut_at_member_boundary(path, 7)), 99, False
    got, counts = read(f"{base}/s.tar")
    assert [d.key for d in got] == [f"d{i}" for i in range(7)]
    assert counts == {"truncated_shard": N - 7}  # the manifest, fetched over http, says 20


def test_http_shards_served_whole_read_without_loss(tmp_path):
    path = shard(tmp_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        got, counts = read(f"http://127.0.0.1:{server.server_address[1]}/{path.name}")
    finally:
        server.shutdown()
    assert len(got) == N and counts == {}


# -- hangs and process hygiene ---------------------------------------------------------------


# with a worker: a spawned Python imports torch before it starts the pipe (13 s alone, 33 s in
# the suite on loaded cores)
@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_sigterm_ends_a_wait_for_a_stalled_shard(tmp_path, workers):
    good = shard(tmp_path / "good")
    sources = [source_spec("a", ("pipe:sleep 600", str(good)))]
    with StreamingLoader(sources, stream_settings(2, seq_len=64), 1, num_workers=workers) as ld:
        before = ld.state_dict()
        sleeps = set(_descendants(os.getpid(), pids=True))

        def term_once_the_pipe_waits():  # the stalled shard's command runs: the loader waits
            _wait_for(lambda: _new_sleep(sleeps), "the pipe command to start")
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=term_once_the_pipe_waits, daemon=True).start()
        with StopSignal() as stop, pytest.raises(Interrupted):
            ld.next_step(lambda: stop.received is not None)
        # Interrupted, not a step of the good shard after the 300 s read timeout: SIGTERM ended it
        assert stop.received == signal.SIGTERM
        assert ld.state_dict() == before  # nothing of the unfinished step is kept


def _wait_for(condition, what: str, timeout: float = 120) -> None:
    """Poll `condition` until true; fail saying `what` after `timeout` s (a generous bound
    for loaded cores, not a speed check)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.1)


def _new_sleep(before: set[int]) -> bool:
    """A `sleep` process below this one that was not in `before` (pids) runs."""
    for pid in set(_descendants(os.getpid(), pids=True)) - before:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                return True
    return False


def _blocked(pids: list[int]) -> bool:
    """Every process of `pids` sleeps and used no CPU time over the last 0.3 s (it waits on
    a queue or a pipe, past its start-up)."""

    def cpu(pid):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[11]) + int(fields[12])  # state, utime + stime

    first = [cpu(p) for p in pids]
    time.sleep(0.3)
    return all(s == "S" and (s, t) == cpu(p) for p, (s, t) in zip(pids, first, strict=True))


_ORPHAN = """
import sys, time
from mmfm.data.loader import StreamingLoader
from mmfm.testing import source_spec, stream_settings
ld = StreamingLoader([source_spec("a", sys.argv[1:])], stream_settings(4, seq_len=64), 1,
                     num_workers=2)
ld._start()
print(" ".join(str(p.pid) for p in ld.workers), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or between open
        return False  # and read (the read then fails with ESRCH)


@pytest.mark.slow  # a trainer and its 2 spawned workers import torch: 33-37 s on 2 loaded cores
@pytest.mark.parametrize("source", ["pipe:sleep 600", "good"])
def test_loader_workers_exit_when_the_trainer_is_killed(tmp_path, source, request):
    url = str(shard(tmp_path)) if source == "good" else source  # blocked reading, or putting
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN, url], stdout=subprocess.PIPE, text=True)
    request.addfinalizer(proc.kill)
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert len(workers) == 2 and all(map(_alive, workers))
    if source == "pipe:sleep 600":  # the workers' pipe commands must go with them
        deadline = time.monotonic() + 60
        while len(_descendants(proc.pid, pids=True)) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [p for p in _descendants(proc.pid, pids=True) if p not in _trackers()]
        assert len(workers) == 4  # 2 workers and their 2 `sleep 600`
    else:  # past their start-up, blocked putting documents nobody takes
        _wait_for(lambda: _blocked(workers), "the workers to block")
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60  # the kernel's SIGTERM on the parent's death, on loaded cores
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, workers))


REPO = Path(__file__).resolve().parents[2]


def _train_until(cmd, run_dir, steps=2):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            break
        time.sleep(0.2)
    return proc


def _trackers() -> set[int]:
    return {p for p, cmd in _commands().items() if "resource_tracker" in cmd}


def _commands() -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit():
                out[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
    return out


def _descendants(pid: int, pids: bool = False) -> list:
    """The command names (or pids) of the processes below `pid`."""
    parents, names = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        name, rest = stat.split("(", 1)[1].rsplit(")", 1)
        parents[int(entry.name)], names[int(entry.name)] = int(rest.split()[1]), name
    below = {pid}
    for _ in range(8):
        below |= {p for p, parent in parents.items() if parent in below}
    return [p if pids else names[p] for p in below if p != pid]


def _catches_sigterm(pid: int) -> bool:
    """`pid` has a handler for SIGTERM (mmfm's StopSignal, set for the fit loop)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.slow  # `mmfm train --nproc 2`: 3 processes import torch; 39 s on 2 loaded cores
def test_sigterm_with_nproc_checkpoints_and_exits_0(tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmfm", "train", str(REPO / "launch/demo.yaml"), *tiny_overrides]
    cmd += [
        "train.steps=100000",
        f"train.run_dir={run_dir}",
        "data.num_workers=0",
        "parallel.dp_shard=2",
    ]
    cmd += ["--nproc", "2"]
    proc = _train_until(cmd, run_dir)
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "all 2 ranks exited cleanly" in err and "Traceback" not in err
    assert list((run_dir / "checkpoints").glob("step_*"))


@pytest.mark.slow  # `mmfm train` in a fresh process with a loader worker: 35 s on loaded cores
def test_sigterm_while_the_data_stalls_checkpoints_and_exits(tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    paths = "data.paths=['pipe:sleep 600']"  # every stream waits on it
    cmd = [sys.executable, "-m", "mmfm", "train", str(REPO / "launch/demo.yaml"), *tiny_overrides]
    cmd += ["train.steps=100000", f"train.run_dir={run_dir}", paths, "train.global_batch_size=2"]
    cmd += ["train.micro_batch_size=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120  # until the loader is in the fit loop, waiting on the pipe
        while time.time() < deadline and not any("sleep" in c for c in _descendants(proc.pid)):
            time.sleep(0.2)
        _wait_for(lambda: _catches_sigterm(proc.pid), "the trainer's SIGTERM handler")
        metrics = run_dir / "metrics.jsonl"
        assert proc.poll() is None and not (metrics.exists() and metrics.read_text())  # stuck
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM at step 0" in err
