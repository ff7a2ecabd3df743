"""Raw WebDataset samples (`000123.jpg` + `000123.txt` + `000123.json`) made into records.

A raw shard holds what img2dataset or webdataset's `ShardWriter` wrote, not mmfm's token
arrays. `raw_samples` reads its samples with the damage-aware tar reader (only the members the
field mapping names are kept), and a `RawDecoder` turns one sample into the records a
`RawFields` mapping asks for (TextRecord, ImageRecord, ...). Decoding is separate from reading
so that it can run where the work is cheapest to spread: `mmfm prepare` decodes in the workers
that tokenize (a JPEG's decode costs more than reading its bytes). Every sample that cannot
become a record goes to `reject(reason, where, detail)` with its shard and key, and reading
goes on. A caption is a member's text, never the sample's key (`000123` says nothing); a
mapping entry the record never reads is warned about (`warn_ignored`), not silently dropped.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tarfile
import tempfile
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from mmfm.config.schema import RawFields
from mmfm.core.errors import LaunchError
from mmfm.core.types import (
    DnaRecord,
    ImageMaskRecord,
    ImageRecord,
    Record,
    SvgRecord,
    TextRecord,
    VideoRecord,
)
from mmfm.data.tario import MAX_MEMBER, Damage, read_tar
from mmfm.tokenization.dna import read_dna
from mmfm.tokenization.visual import data as vdata
from mmfm.tokenization.visual.data import PictureError

log = logging.getLogger("mmfm")

Reject = Callable[[str, str, str], None]
"""`reject(reason, where, detail)`: told of a sample (or a shard's region) that is skipped."""


def raw_samples(
    urls: Sequence[str],
    fields: RawFields,
    reject: Reject,
    timeout_s: float = 300.0,
    max_member: int = MAX_MEMBER,
) -> Iterator[tuple[str, dict]]:
    """(shard url, sample) of every shard in order, each sample holding only the members
    `fields` reads; a damaged or cut region of a shard is rejected under its reason
    (corrupt_shard, truncated_shard, timeout_shard; a member over `max_member` bytes:
    too_large) and reading goes on after it."""
    for url in urls:
        for item in read_tar(url, timeout_s, fields.members(), max_member):
            if isinstance(item, Damage):
                reject(item.reason, url, item.detail)
            else:
                yield url, item


_UNCAPTIONED: set[str] = set()
"""Sources whose uncaptioned svg samples were warned about in this process."""


def warn_ignored(fields: RawFields, source: str) -> None:
    """Warn about the `fields` entries a sample of its record never reads (`image: png` on a
    text record): set away from their defaults, they say the user expects what does not
    happen."""
    if ignored := fields.ignored():
        log.warning(
            "%s: record %s ignores %s (it reads %s): remove them, or set fields.record",
            source,
            fields.record,
            ", ".join(f"fields.{f}" for f in ignored),
            ", ".join(f"fields.{f}" for f in fields.used()),
        )


class _Skip(Exception):
    """A sample that cannot become a record: `reason` is its reject count's name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class _Member(io.BytesIO):
    """A member's bytes that name themselves (`shard:key.ext`) in Pillow's and mmfm's messages."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True)
class RawDecoder:
    """The records of one raw sample by a field mapping (picklable: it travels to workers)."""

    fields: RawFields
    source: str = ""
    """Stored as each record's source."""
    fps: float = 2.0
    max_frames: int = 8
    max_pixels: int = vdata.MAX_PIXELS
    """Pictures, masks and frames of more pixels are refused (too_large) before decoding."""
    fit: str = "crop"
    """How pictures are made square (`vdata.fit_square`): crop or letterbox."""
    max_length: int = 0
    """dna: windows of at most this many bases (`windows`; 0: whole sequences)."""

    def __call__(self, url: str, sample: dict, reject: Reject) -> list[Record]:
        """The sample's records ([] when it is rejected; a DNA member may hold several)."""
        where = f"{url}:{sample['__key__']}"
        try:
            return list(self._records(sample, where, reject))
        except (_Skip, PictureError) as e:
            reject(e.reason, where, str(e))
        except LaunchError:  # a missing extra (PyAV): no sample of the kind would decode
            raise
        except Exception as e:  # Pillow / PyAV / Biopython decode errors: one sample, not the run
            reject("undecodable", where, f"{type(e).__name__}: {_first_line(e)}")
        return []

    def _records(self, sample: dict, where: str, reject: Reject) -> Iterator[Record]:
        key, record = sample["__key__"], self.fields.record
        if record == "text":
            yield TextRecord(key, self._text(sample, "text"), self.source)
        elif record == "svg":
            yield SvgRecord(key, self._text(sample, "svg"), self.source, self._svg_caption(sample))
        elif record == "dna":
            yield from self._dna(sample, where, reject)
        else:
            yield self._visual(sample, where)

    def _visual(self, sample: dict, where: str) -> Record:
        key, record = sample["__key__"], self.fields.record
        caption = self._caption(sample)
        if record == "video":
            ext, data = self._bytes(sample, "video")
            with _temporary(data, ext, f"{where}.{ext}") as path:
                frames = vdata.read_video(path, self.fps, self.max_frames, self.max_pixels)
            frames = np.stack([vdata.fit_square(f, self.fit) for f in frames])
            return VideoRecord(key, frames, caption, self.source)
        ext, data = self._bytes(sample, "image")
        image = vdata.read_image(_Member(data, f"{where}.{ext}"), self.max_pixels)
        if record == "image-text":
            return ImageRecord(key, vdata.fit_square(image, self.fit), caption, self.source)
        ext, data = self._bytes(sample, "mask")
        with vdata.open_picture(_Member(data, f"{where}.{ext}"), self.max_pixels) as im:
            mask = (np.asarray(im.convert("L")) > 0).astype(np.uint8)
        if mask.shape != image.shape[:2]:
            raise PictureError("bad_mask", f"the mask is {mask.shape}, the image {image.shape[:2]}")
        image, mask = vdata.fit_square(image, self.fit), vdata.fit_square(mask, self.fit)
        return ImageMaskRecord(key, image, mask, caption, self.source)

    def _caption(self, sample: dict) -> str | None:
        found = self._find(sample, "text")
        if found is None and self.fields.require_text:
            raise self._missing(sample, "text")
        return None if found is None else _utf8(found).strip()

    def _svg_caption(self, sample: dict) -> str | None:
        """An svg sample's caption; without one its code alone, as an SVG file's (never the
        key: `000123` says nothing), which is said once per source and process."""
        found = self._find(sample, "text")
        if found is None:
            if self.source not in _UNCAPTIONED:
                _UNCAPTIONED.add(self.source)
                log.warning(
                    "%s: raw svg sample %s has no caption (no member %s): such samples are "
                    "tokenized without one; set the source's fields.text to their caption member",
                    self.source or "raw shards",
                    sample["__key__"],
                    ", ".join(self.fields.text),
                )
            return None
        return _utf8(found).strip() or None

    def _dna(self, sample: dict, where: str, reject: Reject) -> Iterator[DnaRecord]:
        ext, data = self._bytes(sample, "dna")
        name = f"{where}.{ext}"
        with _temporary(data, ext, name) as path:

            def renamed(reason: str, at: str, detail: str) -> None:
                reject(reason, at.replace(str(path), name), detail.replace(str(path), name))

            for record in read_dna(path, renamed):
                whole = DnaRecord(record.key, record.sequence, None, self.source)
                yield from windows(whole, self.max_length, self.source)

    def _text(self, sample: dict, field: str) -> str:
        found = self._find(sample, field)
        if found is None:
            raise self._missing(sample, field)
        return _utf8(found)

    def _bytes(self, sample: dict, field: str) -> tuple[str, bytes]:
        """(extension, bytes) of the first member of `field` present."""
        for ext in getattr(self.fields, field):
            if ":" not in ext and ext in sample:
                return ext, sample[ext]
        raise self._missing(sample, field)

    def _find(self, sample: dict, field: str) -> bytes | str | None:
        """The bytes or JSON string of the first alternative of `field` present."""
        for alternative in getattr(self.fields, field):
            ext, _, json_key = alternative.partition(":")
            if ext not in sample:
                continue
            if not json_key:
                return sample[ext]
            value = _json_object(sample[ext], ext).get(json_key)
            if isinstance(value, str):
                return value
        return None

    def _missing(self, sample: dict, field: str) -> _Skip:
        has = sorted(k for k in sample if k != "__key__")
        return _Skip(
            f"missing_{field}",
            f"no {field} member ({', '.join(getattr(self.fields, field))}); it has {has} "
            f"(set the source's fields.{field})",
        )


def windows(record: DnaRecord, max_length: int, name: str) -> Iterator[DnaRecord]:
    """`record` cut into windows of at most `max_length` bases (0: whole), source `name`: one
    function for mmfm prepare's DNA sources and raw shards tokenized in the stream, so both
    give the same documents."""
    window = max_length or len(record.sequence) or 1
    for start in range(0, max(len(record.sequence), 1), window):
        key = record.key if window >= len(record.sequence) else f"{record.key}:{start}"
        yield DnaRecord(key, record.sequence[start : start + window], record.output, name)


def _utf8(value: bytes | str) -> str:
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else value
        text.encode("utf-8")  # a JSON escape of a lone surrogate, "\ud800", does not encode
    except UnicodeError as e:
        raise _Skip("invalid_utf8", f"not UTF-8: {e}") from None
    return text


def _json_object(data: bytes, ext: str) -> dict:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _Skip("bad_json", f"member {ext}: {type(e).__name__}: {e}") from None
    if not isinstance(value, dict):
        raise _Skip("bad_json", f"member {ext} is a JSON {type(value).__name__}, not an object")
    return value


@contextlib.contextmanager
def _temporary(data: bytes, ext: str, name: str) -> Iterator[Path]:
    """A member's bytes as a file `member.<ext>` for readers that go by the suffix (PyAV,
    Biopython), deleted afterwards; what they raise names `name` instead of that file."""
    with tempfile.TemporaryDirectory(prefix="mmfm-raw-") as tmp:
        path = Path(tmp) / f"member.{ext}"
        path.write_bytes(data)
        try:
            yield path
        except (_Skip, LaunchError):
            raise
        except PictureError as e:
            raise _Skip(e.reason, str(e).replace(str(path), name)) from None
        except Exception as e:  # see RawDecoder.__call__
            detail = f"{type(e).__name__}: {_first_line(e)}".replace(str(path), name)
            raise _Skip("undecodable", detail) from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def tar_sample_sizes(path: str, wanted: Container[str] | None = None) -> tuple[list[int], bool]:
    """Bytes of the `wanted` members (None: all) of every sample of a local uncompressed tar,
    from its member headers alone (seeking over the data), grouped as `read_tar` groups them:
    a new sample at a new key or at a wanted member seen twice. Also whether the walk reached
    the end (False: the tar is damaged; the sizes are those before the damage)."""
    sizes: list[int] = []
    previous, seen = None, set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name)
                if not member.isreg() or key is None:
                    continue
                keep = wanted is None or ext in wanted
                if key != previous or (keep and ext in seen):
                    sizes.append(0)
                    previous, seen = key, set()
                if keep:
                    seen.add(ext)
                    sizes[-1] += member.size
    except (OSError, tarfile.TarError, EOFError):
        return sizes, False
    return sizes, True


def count_samples(url: str) -> int | None:
    """The samples `raw_samples` will read from a local uncompressed shard; None for other
    URLs or a shard tarfile cannot walk."""
    if "://" in url or url.startswith("pipe:") or url.endswith((".gz", ".tgz")):
        return None
    sizes, complete = tar_sample_sizes(url)
    return len(sizes) if complete else None
