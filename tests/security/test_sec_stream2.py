"""Hostile data directories, gzip shards, hostile .npy headers and a dead loader worker.

A FIFO or a device in a data directory is skipped by name (opening a FIFO blocks in the
kernel, where no signal reaches), a `.tar.gz` shard without a manifest is sized by its
decompressed headers, a `.npy` header that claims more than its member holds is a counted
`bad_sample`. (A loader worker killed by the kernel: tests/unit/test_loader.py.)
"""

import gzip
import io
import json
import logging
import os
import threading

import numpy as np
import pytest
import webdataset as wds

from mmfm.core.errors import InputNotFound
from mmfm.core.types import Document
from mmfm.data.deal import Unit
from mmfm.data.loader import StreamingLoader
from mmfm.data.megatron import expand_prefixes
from mmfm.data.shards import ShardError, encode_sample, expand_paths, write_shard
from mmfm.data.sizing import shard_sizes
from mmfm.data.skips import Skips
from mmfm.data.units import read_unit
from mmfm.testing import source_spec, stream_settings

WEIGHTS = (1.0,) * 6


def docs(n, first=0):
    return [
        Document(np.full(5 + i % 7, 100 + i, np.int64), np.zeros(5 + i % 7, np.uint8), f"d{i}")
        for i in range(first, first + n)
    ]


def read(url):
    skips = Skips(1.0)
    got = [d for _, d in read_unit(Unit(str(url), 1, 0), 0, skips, stream_settings(1, seq_len=64))]
    return got, dict(skips.counts)


# -- only regular files are shards -------------------------------------------------------------


def test_a_fifo_or_a_device_in_a_data_directory_is_skipped_by_name(tmp_path, caplog):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir(), elsewhere.mkdir()
    write_shard(data / "a.tar", docs(10))
    write_shard(elsewhere / "b.tar", docs(10, 10))
    os.mkfifo(data / "fifo.tar")
    (data / "zero.tar").symlink_to("/dev/zero")
    (data / "link.tar").symlink_to(elsewhere / "b.tar")  # a link to a regular file is fine
    with caplog.at_level(logging.WARNING, "mmfm.data"):
        urls = expand_paths([str(data)])
    assert urls == [str(data / "a.tar"), str(data / "link.tar")]
    assert "fifo.tar (a FIFO)" in caplog.text and "zero.tar (a character device)" in caplog.text
    # the loader reads the rest (opening the FIFO would block here for good)
    ld = StreamingLoader([source_spec("a", tuple(urls))], stream_settings(2, seq_len=64), 1)
    assert len(ld.next_step()) == 2
    ld.close()


@pytest.mark.parametrize("name", ["fifo.tar", "zero.tar"])
def test_a_fifo_or_a_device_named_as_a_shard_is_refused(tmp_path, name):
    os.mkfifo(tmp_path / "fifo.tar")
    (tmp_path / "zero.tar").symlink_to("/dev/zero")
    with pytest.raises(ShardError, match=r"is a (FIFO|character device), not a regular") as e:
        expand_paths([str(tmp_path / name)])
    assert f"shard {tmp_path / name} " in str(e.value)


def test_a_directory_of_fifos_only_is_refused_naming_them(tmp_path):
    os.mkfifo(tmp_path / "x.tar")
    with pytest.raises(
        ShardError, match=r"no \*\.tar shards \(skipped, not regular files: .*x\.tar \(a FIFO\)\)"
    ):
        expand_paths([str(tmp_path)])


def test_a_megatron_pair_with_a_fifo_is_refused_naming_it(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"")
    os.mkfifo(tmp_path / "x.idx")
    with pytest.raises(InputNotFound, match=r"x\.idx is a FIFO, not a regular file"):
        expand_prefixes([str(tmp_path)])


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_manifest_that_is_a_fifo_or_a_device_is_not_read(tmp_path, kind):
    write_shard(tmp_path / "a.tar", docs(10))
    manifest = tmp_path / "manifest.json"
    if kind == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.symlink_to("/dev/zero")  # read_bytes would fill the memory
    done = []
    reader = threading.Thread(target=lambda: done.append(read(tmp_path / "a.tar")), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive() and kind == "fifo":  # the old code: release the blocked open
        os.close(os.open(manifest, os.O_WRONLY | os.O_NONBLOCK))
    assert done, "reading the shard blocked on its manifest"
    got, counts = done[0]
    assert len(got) == 10 and not counts


# -- gzip shards without a manifest ------------------------------------------------------------


def gzip_shards(root, n_shards=2, n=20):
    root.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(n_shards):
        plain = root / f"s{s}.tar"
        write_shard(plain, docs(n, s * n))
        (root / f"s{s}.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
        plain.unlink()
        urls.append(str(root / f"s{s}.tar.gz"))
    return urls


def test_gzip_shards_without_a_manifest_are_sized_and_stream(tmp_path):
    urls = gzip_shards(tmp_path)
    # sized as unknown (as http:// and pipe: shards): walking their headers would decompress
    # every shard in every process that deals; before, they were read uncompressed: 0 samples
    assert [s.samples for s in shard_sizes(urls)] == [-1, -1]
    assert [s.samples for s in shard_sizes(urls, ("txt",))] == [-1, -1]  # raw shards too
    # four streams, two shards: the shards must be split among the streams to feed all four
    ld = StreamingLoader([source_spec("a", tuple(urls))], stream_settings(4, seq_len=32), 1)
    for _ in range(12):  # past EMPTY_EPOCHS_LIMIT epochs of a stream with nothing dealt
        ld.next_step()
    counts = ld.describe(ld.step_counts())
    assert not any(k.startswith("data/skipped") for k in counts), counts
    ld.close()


# -- hostile .npy headers ----------------------------------------------------------------------


def npy(header: str, data: bytes = b"\x01\x00" * 8, version: int = 1) -> bytes:
    raw = header.encode("latin1")
    size = len(raw).to_bytes(2 if version == 1 else 4, "little")
    return b"\x93NUMPY" + bytes([version, 0]) + size + raw + data


HUGE = "{'descr': '%s', 'fortran_order': %s, 'shape': (10000000000000,), }\n"
HOSTILE = {
    "huge_u2": npy(HUGE % ("<u2", False)),  # the fast path
    "huge_i2": npy(HUGE % ("<i2", False)),  # numpy's parser: an 18 TiB allocation
    "huge_fortran": npy(HUGE % ("<u2", True)),
    "huge_v2": npy(HUGE % (">i4", False), version=2),
    "unterminated": npy("{'descr': '<u2', 'fortran_order': False, 'shape': (3,\n"),
    "header_past_end": b"\x93NUMPY\x01\x00\xff\xff{'descr'",
    "short_data": npy("{'descr': '<i2', 'fortran_order': False, 'shape': (9,), }\n"),
    "two_dims": npy("{'descr': '<i2', 'fortran_order': False, 'shape': (4, 2), }\n"),
    "object": npy("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }\n"),
    "not_a_dict": npy("[1, 2, 3]\n"),
}


def hostile_shard(path, tokens: bytes):
    """Good sample 0, a sample whose tokens.npy is `tokens` (no CRC, as an older mmfm wrote:
    the header itself must be checked), good sample 2."""
    good = [encode_sample(d, f"{i:07d}") for i, d in enumerate(docs(3))]
    meta = {"segments": [["text", 0, 8]], "source": "", "id": "bad"}
    good[1] = {"__key__": "0000001", "tokens.npy": tokens, "json": json.dumps(meta).encode()}
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in good:
            sink.write(sample)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_npy_header_is_a_bad_sample_named_by_shard_and_key(tmp_path, case, caplog):
    path = tmp_path / "s.tar"
    hostile_shard(path, HOSTILE[case])
    with caplog.at_level(logging.WARNING, "mmfm.data"):
        got, counts = read(path)
    assert [d.key for d in got] == ["d0", "d2"]
    assert counts == {"bad_sample": 1}
    assert f"{path}, sample '0000001'" in caplog.text


def test_odd_but_honest_npy_layouts_still_decode(tmp_path):
    for dtype in ("<i2", ">u2", "<i8", ">i4"):
        buf = io.BytesIO()
        np.save(buf, np.arange(8, dtype=dtype))
        hostile_shard(tmp_path / "s.tar", buf.getvalue())
        got, counts = read(tmp_path / "s.tar")
        assert len(got) == 3 and not counts, dtype
        assert got[1].tokens.tolist() == list(range(8))
