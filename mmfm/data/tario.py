"""Tar shards read header by header, from files, `pipe:` commands and `http(s)://` URLs.

Python's tarfile (and so webdataset's `tarfile_to_samples`) takes the first zero block, a
damaged header or a cut stream for the end of the archive, and the rest of the shard is lost
without a word. Here every 512-byte header has its checksum checked, a zeroed or damaged
region is reported as `Damage` and reading goes on at the next valid header, and a shard
that does not end with two zero blocks is reported truncated. Every read is bounded: a member
over `max_member` bytes is skipped without being held (`too_large`), a member that claims more
bytes than a local file has left ends the shard (`truncated_shard`), and more than
`ZERO_RUN_LIMIT` zero bytes in a row, or `max_member` bytes without a valid header, end it
too (`corrupt_shard`: endless or zero-filled streams). Streams have a stall timeout (fewer
than `MIN_PROGRESS` bytes in `timeout_s` of waiting, so a drip does not keep a shard open),
pipe commands die with their reader, and an HTTP transfer that breaks off is resumed from the
byte it reached with a `Range` request.
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
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from mmfm.data.orphans import shell_that_dies_with_parent

log = logging.getLogger("mmfm.data")

BLOCK = 512
ZERO = bytes(BLOCK)
CHUNK = 1 << 16
READ = 1 << 20
"""Bytes asked of a source at a time for a member's data."""
HTTP_RETRIES = 3
"""Range requests tried, per shard, after an HTTP transfer breaks off."""
MAX_MEMBER = 256 << 20
"""Largest member kept by default (`data.max_member_mb`); larger ones are `too_large`."""
ZERO_RUN_LIMIT = 1 << 20
"""Zero bytes in a row after which a shard is given up (`corrupt_shard`): an end-of-archive
is two zero blocks, padded by tar to its record size (10 KiB by default)."""
MIN_PROGRESS = CHUNK
"""A stream that gives fewer bytes than this in `timeout_s` of waiting has stalled."""


class Interrupted(Exception):
    """A stop was requested (e.g. SIGTERM) while waiting for shard bytes."""


class ShardTimeout(OSError):
    """Fewer than `MIN_PROGRESS` bytes of a shard arrived in the read timeout."""


@dataclass(frozen=True)
class Damage:
    """A part of a shard that could not be read; reading went on after it where it could."""

    reason: str
    """`corrupt_shard`, `truncated_shard`, `timeout_shard` or `too_large` (a member skipped:
    its sample is left out)."""
    offset: int
    detail: str


_stop_check: Callable[[], bool] = lambda: False  # noqa: E731


def set_stop_check(check: Callable[[], bool] | None) -> None:
    """Have waits for shard bytes in this process raise `Interrupted` once `check()` holds."""
    global _stop_check
    _stop_check = check or (lambda: False)


# -- byte sources ------------------------------------------------------------------------------


class _Source:
    """Bytes with `read(n)` (short only at the end), `skip(n)`, `left()`, `close()` and `note`."""

    note = ""
    """Why the stream ended early, when known (appended to a truncation's message)."""

    def read(self, n: int) -> bytes:
        raise NotImplementedError

    def left(self) -> int | None:
        """The bytes after the read position, where known (a local file)."""
        return None

    def skip(self, n: int) -> int:
        """Read past `n` bytes without holding them; the bytes skipped (fewer at the end)."""
        done = 0
        while done < n and (part := self.read(min(n - done, READ))):
            done += len(part)
        return done

    def close(self) -> None:
        pass


class _Threaded(_Source):
    """Bytes read by a thread, waited for with a stall timeout and a stop check."""

    def __init__(self, url: str, timeout_s: float, note: str = ""):
        self.url, self.timeout_s = url, timeout_s
        self.note = note
        self._chunks: queue.Queue = queue.Queue(maxsize=16)
        self._buffer = bytearray()
        self._start = 0  # of the unread bytes in the buffer
        self._eof = False
        self._closed = threading.Event()
        self._window = [0, 0.0]
        """Bytes received and seconds waited since the stream last gave `MIN_PROGRESS` bytes:
        time spent by the reader between reads is not the stream's."""
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
            with contextlib.suppress(queue.Empty):
                chunk = self._chunks.get(timeout=min(0.25, warn_every))
                if chunk is None or self._progress(len(chunk), time.monotonic() - start):
                    return chunk
                raise ShardTimeout(self._stalled())
            if _stop_check():
                raise Interrupted(f"stopped while waiting for shard {self.url}")
            waited = time.monotonic() - start
            if self._window[1] + waited >= self.timeout_s:
                raise ShardTimeout(self._stalled())
            if waited >= next_warning:
                log.warning(
                    "shard %s: waiting for data for %.0f s (gives up at data.read_timeout_s=%g)",
                    self.url, waited, self.timeout_s,
                )  # fmt: skip
                next_warning += warn_every

    def _progress(self, received: int, waited: float) -> bool:
        """Count a chunk; False when it came after the window's time ran out (a drip)."""
        received, waited = self._window[0] + received, self._window[1] + waited
        self._window = [0, 0.0] if received >= MIN_PROGRESS else [received, waited]
        return received >= MIN_PROGRESS or waited < self.timeout_s

    def _stalled(self) -> str:
        if not self._window[0]:
            return f"no data for {self.timeout_s:g} s (data.read_timeout_s); moved on"
        return (
            f"only {self._window[0]} bytes in {self.timeout_s:g} s of waiting (a stream must "
            f"give {MIN_PROGRESS >> 10} KiB per data.read_timeout_s); moved on"
        )

    def read(self, n: int) -> bytes:
        while len(self._buffer) - self._start < n and not self._eof:
            chunk = self._wait()
            if chunk is None:
                self._eof = True
            else:
                del self._buffer[: self._start]
                self._buffer += chunk
                self._start = 0
        out = bytes(memoryview(self._buffer)[self._start : self._start + n])
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
            shell_that_dies_with_parent(command),
            stdout=subprocess.PIPE,
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


class _File(_Source):
    def __init__(self, f):
        self.f, self.position = f, 0
        status = os.fstat(f.fileno())
        self.size = status.st_size if stat.S_ISREG(status.st_mode) else None
        """A regular file's size, taken once (shards are not written while read)."""

    def read(self, n: int) -> bytes:
        out = self.f.read(n)
        while len(out) < n and (more := self.f.read(n - len(out))):
            out += more
        self.position += len(out)
        return out

    def left(self) -> int | None:
        return None if self.size is None else self.size - self.position

    def skip(self, n: int) -> int:
        left = self.left()
        if left is None:
            return super().skip(n)
        n = min(n, left)
        self.f.seek(n, os.SEEK_CUR)
        self.position += n
        return n

    def close(self) -> None:
        self.f.close()


class _Gzip(_File):
    """A gzip stream, inflated as it is read (its size is not known before)."""

    def __init__(self, source):
        self.f, self.position = gzip.GzipFile(fileobj=source, mode="rb"), 0
        self.source, self.size = source, None

    def read(self, n: int) -> bytes:
        try:
            return super().read(n)
        except (EOFError, OSError, gzip.BadGzipFile) as e:
            self.note = f"{type(e).__name__}: {e}"
            return b""

    def close(self) -> None:
        super().close()
        self.source.close()


def open_source(url: str, timeout_s: float) -> _Source:
    """A byte source for `url` (see `_Source`)."""
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


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


class _Walk:
    def __init__(self, source: _Source, url: str, wanted: tuple[str, ...], max_member: int):
        self.source, self.url, self.wanted, self.max_member = source, url, wanted, max_member
        self.offset = 0
        self.gave_up = ""
        """What made `resync` stop before the end of the stream, if a bound did."""

    def block(self) -> bytes:
        data = self.source.read(BLOCK)
        self.offset += len(data)
        return data

    def data(self, size: int) -> bytes | None:
        """A member's data (its padding read past), joined once; None if cut short. A local
        file's member is read in one call (its size was checked against the file's)."""
        step = size if self.source.left() is not None else READ
        parts, left = [], size
        while left:
            part = self.source.read(min(left, step))
            self.offset += len(part)
            if not part:
                return None
            parts.append(part)
            left -= len(part)
        return b"".join(parts) if self.skip(_padded(size) - size) else None

    def skip(self, n: int) -> bool:
        """Past `n` bytes without holding them (a seek in a local file); False if cut short."""
        skipped = self.source.skip(n)
        self.offset += skipped
        return skipped == n

    def resync(self, block: bytes, zeros_from: int | None = None) -> bytes | None:
        """The next valid header from `block` on; None at the end of the stream or, with
        `gave_up` said, after more than `ZERO_RUN_LIMIT` zero bytes in a row (from
        `zeros_from`, when the run began before `block`) or `max_member` bytes without one."""
        start = self.offset - len(block)
        while len(block) == BLOCK:
            if block != ZERO:
                if header_size(block) is not None:
                    return block
                zeros_from = None
            elif zeros_from is None:
                zeros_from = self.offset - BLOCK
            if zeros_from is not None and self.offset - zeros_from > ZERO_RUN_LIMIT:
                self.gave_up = f"more than {ZERO_RUN_LIMIT} zero bytes from byte {zeros_from}"
                return None
            if self.offset - start > self.max_member + BLOCK:
                self.gave_up = f"no valid tar header in {self.offset - start} bytes from {start}"
                return None
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

    def claims_too_much(self, at: int, name: str, size: int, left: int) -> Damage:
        return Damage(
            "truncated_shard",
            at,
            f"shard {self.url}: member {name} (header at byte {at}) claims {size} bytes, but "
            f"only {left} follow: the shard is truncated or the header damaged; rewrite or "
            "remove it",
        )

    def too_large(self, at: int, name: str, size: int) -> Damage:
        return Damage(
            "too_large",
            at,
            f"shard {self.url}: member {name} (header at byte {at}) holds {size / 2**20:.1f} "
            f"MiB, over the limit of {self.max_member / 2**20:g} MiB (data.max_member_mb); its "
            "sample is skipped unread. Raise data.max_member_mb to keep it",
        )


def read_tar(
    url: str,
    timeout_s: float = 300.0,
    wanted: tuple[str, ...] = ("tokens.npy", "json"),
    max_member: int = MAX_MEMBER,
) -> Iterator[dict | Damage]:
    """Samples (`{"__key__": key, ext: bytes}` with the `wanted` members) and `Damage` reports,
    in shard order. A shard whose stream stalls for `timeout_s` ends with a `timeout_shard`; a
    sample with a wanted member over `max_member` bytes is skipped as `too_large`."""
    try:
        source = open_source(url, timeout_s)
    except OSError as e:
        yield Damage("truncated_shard", 0, f"shard {url} cannot be opened: {e}")
        return
    try:
        yield from _samples(_Walk(source, url, wanted, max_member))
    except ShardTimeout as e:
        yield Damage("timeout_shard", 0, f"shard {url}: {e}")
    finally:
        source.close()


def _samples(walk: _Walk) -> Iterator[dict | Damage]:
    sample: dict = {}
    long_name = dropped = None  # dropped: the key of a sample left out (too_large)
    while True:
        at = walk.offset
        block = walk.block()
        if len(block) < BLOCK:
            yield from _flush(sample)
            yield walk.truncated(at)
            return
        size = None if block == ZERO else header_size(block)
        if size is None:
            yield from _flush(sample)
            sample = {}
            block = yield from _past_damage(walk, block, at)
            if block is None:
                return
            size = header_size(block)
        kind = block[156:157]
        name = long_name or _member_name(block)
        long_name = None
        key, ext = base_plus_ext(name)
        regular = kind in (b"0", b"\0", b"7")
        if regular and key != dropped:
            dropped = None
        keep = kind in (b"x", b"L") or (regular and ext in walk.wanted and dropped is None)
        left = walk.source.left()
        if left is not None and _padded(size) > left:
            yield from _flush(sample)
            yield walk.claims_too_much(at, name, size, left)
            return
        too_large = keep and size > walk.max_member
        keep = keep and not too_large
        data = walk.data(size) if keep else b"" if walk.skip(_padded(size)) else None
        if data is None:
            yield from _flush(sample)
            yield walk.truncated(walk.offset)
            return
        if too_large:  # skipped whole: not a truncation; reported in the sample's place
            if regular:
                if sample.get("__key__") != key:
                    yield from _flush(sample)
                sample, dropped = {}, key
            yield walk.too_large(at, name, size)
            continue
        if kind in (b"x", b"L"):
            long_name = (
                _pax_path(data)
                if kind == b"x"
                else data.split(b"\0", 1)[0].decode("utf-8", "replace")
            )
            continue
        if not regular or key is None or key == dropped:
            continue
        if sample and (sample["__key__"] != key or ext in sample):
            yield sample
            sample = {}
        sample.setdefault("__key__", key)
        if keep:
            sample[ext] = data


def _past_damage(walk: _Walk, block: bytes, at: int) -> Generator[Damage, None, bytes | None]:
    """From a zero block or a damaged header at `at`: the damage found, and the next valid
    header (None: the shard ends there)."""
    if block != ZERO:
        found = walk.resync(walk.block())
        stopped = f"; it holds {walk.gave_up}: stopped reading there" if walk.gave_up else ""
        yield Damage(
            "corrupt_shard", at, f"shard {walk.url} has a damaged tar header at byte {at}{stopped}"
        )
        return found
    second = walk.block()
    found = walk.resync(second, zeros_from=at)
    if found is not None:
        yield Damage(
            "corrupt_shard",
            at,
            f"shard {walk.url} is zeroed from byte {at} to {walk.offset - BLOCK} "
            "(members follow); rewrite it",
        )
    elif walk.gave_up:  # an endless or zero-filled stream
        yield Damage(
            "corrupt_shard",
            at,
            f"shard {walk.url} holds {walk.gave_up}: stopped reading there; rewrite or remove it",
        )
    elif second != ZERO:  # the stream ends, or holds no header, after one zero block
        yield walk.truncated(at)
    return found


def _flush(sample: dict) -> Iterator[dict]:
    if sample:
        yield sample
