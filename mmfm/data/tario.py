"""Tar shards read header by header, from files, `pipe:` commands and `http(s)://` URLs.

Python's tarfile (and so webdataset's `tarfile_to_samples`) takes the first zero block, a
damaged header or a cut stream for the end of the archive, and the rest of the shard is lost
without a word. Here every 512-byte header has its checksum checked, a zeroed or damaged
region is reported as `Damage` and reading goes on at the next valid header, and a shard
that does not end with two zero blocks is reported truncated. Streams have a stall timeout
(no byte for `timeout_s`), pipe commands die with their reader, and an HTTP transfer that
breaks off is resumed from the byte it reached with a `Range` request.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import logging
import os
import queue
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from mmfm.data.orphans import die_with_parent

log = logging.getLogger("mmfm.data")

BLOCK = 512
ZERO = bytes(BLOCK)
CHUNK = 1 << 16
HTTP_RETRIES = 3
"""Range requests tried, per shard, after an HTTP transfer breaks off."""


class Interrupted(Exception):
    """A stop was requested (e.g. SIGTERM) while waiting for shard bytes."""


class ShardTimeout(OSError):
    """No byte of a shard arrived for the read timeout."""


@dataclass(frozen=True)
class Damage:
    """A part of a shard that could not be read; reading went on after it where it could."""

    reason: str
    """`corrupt_shard`, `truncated_shard` or `timeout_shard`."""
    offset: int
    detail: str


_stop_check: Callable[[], bool] = lambda: False  # noqa: E731


def set_stop_check(check: Callable[[], bool] | None) -> None:
    """Have waits for shard bytes in this process raise `Interrupted` once `check()` holds."""
    global _stop_check
    _stop_check = check or (lambda: False)


# -- byte sources ------------------------------------------------------------------------------


class _Threaded:
    """Bytes read by a thread, waited for with a stall timeout and a stop check."""

    def __init__(self, url: str, timeout_s: float, note: str = ""):
        self.url, self.timeout_s = url, timeout_s
        self.note = note
        """Why the stream ended early, when known (appended to a truncation's message)."""
        self._chunks: queue.Queue = queue.Queue(maxsize=16)
        self._buffer = bytearray()
        self._start = 0  # of the unread bytes in the buffer
        self._eof = False
        self._closed = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def chunks(self) -> Iterator[bytes]:
        raise NotImplementedError

    def _pump(self) -> None:
        try:
            for chunk in self.chunks():
                if not self._put(chunk):
                    return
        except Exception as e:  # an IO error ends the stream; the tar reader reports where
            self.note = self.note or f"{type(e).__name__}: {e}"
        self._put(None)

    def _put(self, chunk: bytes | None) -> bool:
        """Hand a chunk over (None: the end); False once the reader has closed."""
        while not self._closed.is_set():
            try:
                self._chunks.put(chunk, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _wait(self) -> bytes | None:
        start = time.monotonic()
        warn_every = min(30.0, self.timeout_s / 2)
        next_warning = warn_every
        while True:
            try:
                return self._chunks.get(timeout=min(0.25, warn_every))
            except queue.Empty:
                pass
            if _stop_check():
                raise Interrupted(f"stopped while waiting for shard {self.url}")
            waited = time.monotonic() - start
            if waited >= self.timeout_s:
                raise ShardTimeout(
                    f"no data for {self.timeout_s:g} s (data.read_timeout_s); moved on"
                )
            if waited >= next_warning:
                log.warning(
                    "shard %s: waiting for data for %.0f s (gives up at data.read_timeout_s=%g)",
                    self.url, waited, self.timeout_s,
                )  # fmt: skip
                next_warning += warn_every

    def read(self, n: int) -> bytes:
        while len(self._buffer) - self._start < n and not self._eof:
            chunk = self._wait()
            if chunk is None:
                self._eof = True
            else:
                del self._buffer[: self._start]
                self._buffer += chunk
                self._start = 0
        out = bytes(self._buffer[self._start : self._start + n])
        self._start += len(out)
        return out

    def close(self) -> None:
        self._closed.set()


class _Pipe(_Threaded):
    """The standard output of a shell command (`pipe:cmd`), killed when closed early."""

    def __init__(self, url: str, timeout_s: float):
        command = url[len("pipe:") :]
        if not re.search(r"[|;&<>()$`\\\n]", command):
            command = "exec " + command  # one process, which keeps the death signal
        self.proc = subprocess.Popen(
            command,
            shell=True,
            stdout=subprocess.PIPE,
            preexec_fn=die_with_parent,
            start_new_session=True,  # so close() can end the whole command line
        )
        super().__init__(url, timeout_s)

    def chunks(self) -> Iterator[bytes]:
        while chunk := self.proc.stdout.read1(CHUNK):
            yield chunk
        status = self.proc.wait()
        if status:
            self.note = f"the command exited with status {status}"

    def close(self) -> None:
        super().close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()


class _Http(_Threaded):
    """An HTTP(S) download that resumes from the byte it reached (Range) when it breaks off."""

    def chunks(self) -> Iterator[bytes]:
        position, total, retries = 0, None, 0
        while True:
            headers = {"Range": f"bytes={position}-"} if position else {}
            request = urllib.request.Request(self.url, headers=headers)
            try:
                response = urllib.request.urlopen(request, timeout=self.timeout_s)
            except urllib.error.HTTPError as e:
                if e.code == 416:  # nothing after `position`: the server's copy ends there
                    self.note = f"the server has no bytes after {position}"
                    return
                raise
            with response:
                if position and response.status != 206:  # Range ignored: skip what we have
                    self._discard(response, position)
                if total is None:
                    total = _total_length(response, position)
                try:
                    while chunk := response.read1(CHUNK):
                        position += len(chunk)
                        yield chunk
                except (http.client.HTTPException, OSError) as e:
                    reason = f"{type(e).__name__}: {e}"
                else:
                    if total is not None and position >= total:
                        return
                    reason = "the connection closed early"
            if total is None and retries:  # no length and a resume gave nothing new
                return
            if retries >= HTTP_RETRIES:
                self.note = f"{reason} at byte {position}, {retries} resumes tried"
                return
            retries += 1
            log.warning(
                "shard %s: %s at byte %d; resuming with a Range request (%d of %d)",
                self.url, reason, position, retries, HTTP_RETRIES,
            )  # fmt: skip

    @staticmethod
    def _discard(response, n: int) -> None:
        while n > 0:
            chunk = response.read(min(n, CHUNK))
            if not chunk:
                raise OSError("the server ignored the Range request and sent fewer bytes")
            n -= len(chunk)


def _total_length(response, position: int) -> int | None:
    content_range = response.headers.get("Content-Range", "")
    if match := re.fullmatch(r"bytes \d+-\d+/(\d+)", content_range.strip()):
        return int(match.group(1))
    length = response.headers.get("Content-Length")
    if length is None:
        return None
    return int(length) + (position if response.status == 206 else 0)


class _File:
    def __init__(self, f):
        self.f, self.note = f, ""

    def read(self, n: int) -> bytes:
        out = self.f.read(n)
        while len(out) < n and (more := self.f.read(n - len(out))):
            out += more
        return out

    def close(self) -> None:
        self.f.close()


class _Gzip(_File):
    def __init__(self, source):
        super().__init__(gzip.GzipFile(fileobj=source, mode="rb"))
        self.source = source

    def read(self, n: int) -> bytes:
        try:
            return super().read(n)
        except (EOFError, OSError, gzip.BadGzipFile) as e:
            self.note = f"{type(e).__name__}: {e}"
            return b""

    def close(self) -> None:
        super().close()
        self.source.close()


def open_source(url: str, timeout_s: float):
    """A byte source for `url` with `read(n)` (short only at the end), `close()` and `note`."""
    if url.startswith("pipe:"):
        source = _Pipe(url, timeout_s)
    elif url.startswith(("http://", "https://")):
        source = _Http(url, timeout_s)
    elif "://" in url:  # other schemes webdataset knows (gs://, ais://, ...)
        stream = wds.gopen(url, "rb")

        class _Other(_Threaded):
            def chunks(self):
                while chunk := stream.read(CHUNK):
                    yield chunk

        source = _Other(url, timeout_s)
    else:
        source = _File(open(url, "rb"))  # noqa: SIM115 (closed by read_tar)
    return _Gzip(source) if url.endswith((".gz", ".tgz")) else source


# -- the tar walk ------------------------------------------------------------------------------


def header_size(block: bytes) -> int | None:
    """The member size of a 512-byte tar header, or None when its checksum is wrong."""
    stored = block[148:156].split(b"\0", 1)[0].strip()
    computed = sum(block) - sum(block[148:156]) + 8 * 32  # the checksum field counts as spaces
    try:
        if not stored or int(stored, 8) != computed:
            return None
        raw = block[124:136]
        if raw[0] & 0x80:
            return int.from_bytes(raw[1:], "big")
        return int(raw.strip(b"\0 ") or b"0", 8)
    except ValueError:
        return None


def _member_name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar" and (prefix := block[345:500].split(b"\0", 1)[0]):
        name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _pax_path(data: bytes) -> str | None:
    for record in data.split(b"\n"):
        _, _, field = record.partition(b" ")
        if field.startswith(b"path="):
            return field[5:].decode("utf-8", "replace")
    return None


class _Walk:
    def __init__(self, source, url: str, wanted: tuple[str, ...]):
        self.source, self.url, self.wanted = source, url, wanted
        self.offset = 0

    def block(self) -> bytes:
        data = self.source.read(BLOCK)
        self.offset += len(data)
        return data

    def data(self, size: int, keep: bool) -> bytes | None:
        """A member's data (None if cut short); `keep=False` reads and drops it."""
        padded = -(-size // BLOCK) * BLOCK
        kept, left = b"", padded
        while left:
            part = self.source.read(min(left, 1 << 20))
            self.offset += len(part)
            if keep and len(kept) < size:
                kept += part[: size - len(kept)]
            left -= len(part)
            if not part:
                return None
        return kept if keep else b""

    def resync(self, block: bytes) -> bytes | None:
        """The next valid header from `block` on, or None at the end of the stream."""
        while len(block) == BLOCK:
            if block != ZERO and header_size(block) is not None:
                return block
            block = self.block()
        return None

    def truncated(self, at: int) -> Damage:
        note = f": {self.source.note}" if self.source.note else ""
        return Damage(
            "truncated_shard",
            at,
            f"shard {self.url} is truncated at byte {at} (no end-of-archive blocks){note}; "
            "rewrite or remove it",
        )


def read_tar(
    url: str, timeout_s: float = 300.0, wanted: tuple[str, ...] = ("tokens.npy", "json")
) -> Iterator[dict | Damage]:
    """Samples (`{"__key__": key, ext: bytes}` with the `wanted` members) and `Damage` reports,
    in shard order. A shard whose stream stalls for `timeout_s` ends with a `timeout_shard`."""
    try:
        source = open_source(url, timeout_s)
    except OSError as e:
        yield Damage("truncated_shard", 0, f"shard {url} cannot be opened: {e}")
        return
    try:
        yield from _samples(_Walk(source, url, wanted))
    except ShardTimeout as e:
        yield Damage("timeout_shard", 0, f"shard {url}: {e}")
    finally:
        source.close()


def _samples(walk: _Walk) -> Iterator[dict | Damage]:
    sample: dict = {}
    long_name = None
    while True:
        at = walk.offset
        block = walk.block()
        if len(block) < BLOCK:
            yield from _flush(sample)
            yield walk.truncated(at)
            return
        if block == ZERO:
            second = walk.block()
            found = walk.resync(second) if len(second) == BLOCK else None
            if found is None:
                yield from _flush(sample)
                if second != ZERO:  # the stream ends, or holds no header, after one zero block
                    yield walk.truncated(at)
                return
            yield from _flush(sample)
            sample = {}
            yield Damage(
                "corrupt_shard",
                at,
                f"shard {walk.url} is zeroed from byte {at} to {walk.offset - BLOCK} "
                "(members follow); rewrite it",
            )
            block = found
        size = header_size(block)
        if size is None:
            found = walk.resync(walk.block())
            yield from _flush(sample)
            sample = {}
            yield Damage(
                "corrupt_shard", at, f"shard {walk.url} has a damaged tar header at byte {at}"
            )
            if found is None:  # nothing readable after it
                return
            block, size = found, header_size(found)
        kind = block[156:157]
        name = long_name or _member_name(block)
        long_name = None
        if kind in (b"x", b"L"):
            data = walk.data(size, keep=True)
            if data is None:
                yield from _flush(sample)
                yield walk.truncated(walk.offset)
                return
            long_name = (
                _pax_path(data)
                if kind == b"x"
                else data.split(b"\0", 1)[0].decode("utf-8", "replace")
            )
            continue
        key, ext = base_plus_ext(name)
        keep = kind in (b"0", b"\0", b"7") and ext in walk.wanted
        data = walk.data(size, keep)
        if data is None:
            yield from _flush(sample)
            yield walk.truncated(walk.offset)
            return
        if kind not in (b"0", b"\0", b"7") or key is None:
            continue
        if sample and (sample["__key__"] != key or ext in sample):
            yield sample
            sample = {}
        sample.setdefault("__key__", key)
        if keep:
            sample[ext] = data


def _flush(sample: dict) -> Iterator[dict]:
    if sample:
        yield sample
