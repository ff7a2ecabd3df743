"""Records from input files, one reader per source kind (raw WebDataset shards: samples,
decoded later); every reject counted by reason and source."""

from __future__ import annotations

import glob
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from mmfm.core.errors import InputNotFound, LaunchError
from mmfm.core.extras import require_extra
from mmfm.core.files import iter_files
from mmfm.core.modalities import kind_spec
from mmfm.core.types import DnaRecord, ModalityRecord, Record, SvgRecord, TextRecord
from mmfm.data.raw import (
    RawDecoder,
    Reject,
    count_samples,
    raw_samples,
    warn_ignored,
    windows,
)
from mmfm.data.shards import ShardError, expand_paths
from mmfm.data.tario import MAX_MEMBER
from mmfm.prepare.limits import lines, too_large, within
from mmfm.prepare.recipe import PrepareRecipe, PrepareSource
from mmfm.prepare.segmentation import coco_records, voc_records
from mmfm.prepare.tasks import task_records
from mmfm.tokenization.dna import read_dna, read_function_pairs
from mmfm.tokenization.shaping import svg_caption
from mmfm.tokenization.visual.data import PYAV_SUFFIXES
from mmfm.tokenization.visual.records import PictureError, visual_records

log = logging.getLogger("mmfm")


class Rejects:
    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.by_source: dict[str, Counter] = {}
        """The same counts per source name (`source`: the source being read)."""
        self.source = ""
        self.total = 0
        self._logged: set[tuple[str, str]] = set()

    def add(self, reason: str, where: str, detail: str) -> None:
        self.total += 1  # read by the progress bar
        self.counts[reason] += 1
        self.by_source.setdefault(self.source, Counter())[reason] += 1
        self.log(reason, where, detail)

    def log(self, reason: str, where: str, detail: str) -> None:
        """Log a reject (counted elsewhere, e.g. by a worker) once per reason and file."""
        origin = where.split(":")[0]
        if (reason, origin) not in self._logged:
            self._logged.add((reason, origin))
            log.warning("rejected (%s) %s: %s", reason, where, detail)


def _text_records(path: Path, source: PrepareSource, rejects: Rejects) -> Iterator:

    name = source.name or source.kind
    if path.suffix != ".jsonl":
        if _small(path, source, rejects):
            try:
                yield TextRecord(path.name, path.read_bytes().decode("utf-8"), name)
            except UnicodeDecodeError as e:
                rejects.add("invalid_utf8", str(path), str(e))
        return
    limit = source.max_record_bytes
    with open(path, "rb") as f:
        for i, raw in enumerate(lines(f, limit)):
            where = f"{path}:{i + 1}"
            if raw is None:
                rejects.add("too_large", where, f"a line {too_large(limit)}")
                continue
            if not raw.strip():
                continue
            try:
                text = json.loads(raw.decode("utf-8")).get(source.jsonl_field)
            except UnicodeDecodeError as e:
                rejects.add("invalid_utf8", where, str(e))
                continue
            except (json.JSONDecodeError, AttributeError, RecursionError) as e:
                rejects.add("bad_json", where, f"{type(e).__name__}: {e}")
                continue
            if not isinstance(text, str):
                rejects.add("missing_field", where, f"no string field {source.jsonl_field!r}")
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # a JSON escape of a lone surrogate, "\ud800"
                rejects.add("invalid_utf8", where, f"{e.reason}: {text[e.start : e.end]!r}")
                continue
            yield TextRecord(f"{path.stem}:{i + 1}", text, name)


def _dna_records(path: Path, source: PrepareSource, rejects: Rejects) -> Iterator:

    reader = read_function_pairs if source.kind == "dna-pairs" else read_dna
    for record in reader(path, rejects.add):
        yield from windows(record, source.max_length, source.name or source.kind)


def _svg_records(path: Path, source: PrepareSource, rejects: Rejects) -> Iterator:

    if not _small(path, source, rejects):
        return
    try:
        code = path.read_bytes().decode("utf-8")
        caption = svg_caption(path.stem) if source.completion_only else None  # its prompt
        yield SvgRecord(path.stem, code, source.name or "svg", caption)
    except UnicodeDecodeError as e:
        rejects.add("invalid_utf8", str(path), str(e))


def _small(path: Path, source: PrepareSource, rejects: Rejects) -> bool:
    """Whether a file read as one record is within max_record_mb (else: too_large)."""
    size, limit = path.stat().st_size, source.max_record_bytes
    if size > limit:
        rejects.add("too_large", str(path), too_large(limit, size))
    return size <= limit


def _visual_records(path: Path, source: PrepareSource, rejects: Rejects) -> Iterator:

    if is_sidecar(path):
        return  # a sidecar (mask or caption) of a picture, read with it
    try:
        yield from visual_records(
            path,
            source.kind,
            source.name or source.kind,
            source.fps,
            source.max_frames,
            source.caption_from_name,
            source.max_pixels,
            source.mask,
            source.fit,
        )
    except PictureError as e:
        rejects.add(e.reason, str(path), str(e))
    except (OSError, ValueError, RuntimeError, SyntaxError) as e:  # Pillow / PyAV decode errors
        rejects.add("undecodable", str(path), f"{type(e).__name__}: {e}")


def is_sidecar(path: Path) -> bool:
    """A picture's mask (<stem>.mask.png) or caption (<stem>.txt beside another file)."""
    siblings = path.parent.glob(glob.escape(path.stem) + ".*")
    return path.name.endswith(".mask.png") or (
        path.suffix == ".txt" and any(p != path for p in siblings)
    )


_READERS = {"text": _text_records, "dna": _dna_records, "dna-pairs": _dna_records}
_READERS["svg"] = _svg_records
_READERS.update(dict.fromkeys(("image-text", "image-mask", "video"), _visual_records))
_READERS.update(voc=voc_records, coco=coco_records)
_READERS["prompt-response"] = task_records


def _registered_records(path: Path, source: PrepareSource, rejects: Rejects) -> Iterator:
    """A registered modality's records: its spec's `read` gives (key, value[, text])."""
    spec = kind_spec(source.kind)
    for key, value, *text in spec.read(path):
        yield ModalityRecord(key, spec.name, value, *text, source=source.name or source.kind)


def iter_records(recipe: PrepareRecipe, rejects: Rejects) -> Iterator[tuple[str, object]]:
    """(where, record) of every source, where names the file and the record; a webdataset
    source gives (where, RawSample), decoded later by whoever calls `RawSample.records`."""
    for source in recipe.sources:
        yield from source_records(source, rejects, recipe.cache_dir)


def source_records(
    source: PrepareSource, rejects: Rejects, cache_dir: str = "~/.cache/mmfm"
) -> Iterator[tuple[str, object]]:
    """(where, record) of one source, as `iter_records` reads it (`mmfm eval --task` reads
    its examples so)."""
    rejects.source = source.name or source.kind
    if source.kind == "webdataset":
        records = _raw_samples(source, rejects)
    else:
        fits = within(source.max_record_bytes, rejects.add)
        records = (
            (where, record)
            for path in iter_files(source.paths, cache_dir)
            for record in _guarded(
                _READERS.get(source.kind, _registered_records), path, source, rejects
            )
            if fits(where := f"{path}:{record.key}", record)
        )
    yield from islice(records, source.limit or None)


@dataclass(frozen=True)
class RawSample:
    """A sample of a raw WebDataset shard, still undecoded: the worker that tokenizes it
    decodes it (a JPEG's decode is the cost; its bytes are also smaller than its pixels)."""

    url: str
    sample: dict
    decoder: RawDecoder
    max_length: int = 0
    """dna: windows of at most this many bases (0: whole sequences)."""
    max_bytes: int = 64 << 20
    """Records of more bytes of text, DNA or SVG code are rejected (too_large)."""

    def records(self, reject: Reject) -> Iterator[Record]:
        fits = within(self.max_bytes, reject)
        where = f"{self.url}:{self.sample['__key__']}"
        for record in self.decoder(self.url, self.sample, reject):
            for window in (
                windows(record, self.max_length, record.source)
                if isinstance(record, DnaRecord)
                else [record]
            ):
                if fits(where, window):
                    yield window


def shard_urls(source: PrepareSource) -> list[str]:
    """The shards of a webdataset source (every form the training loader takes)."""
    try:
        return expand_paths(source.paths)
    except ShardError as e:
        message = str(e).removeprefix("data.paths: ")
        raise InputNotFound(f"sources: {source.name or source.kind}: {message}") from None


def _raw_samples(source: PrepareSource, rejects: Rejects) -> Iterator[tuple[str, RawSample]]:
    name = source.name or source.kind
    warn_ignored(source.fields, f"sources: {name}")
    decoder = RawDecoder(
        source.fields, name, source.fps, source.max_frames, source.max_pixels, source.fit
    )
    limit = source.max_record_bytes
    texts = {m.partition(":")[0] for f in ("text", "svg", "dna") for m in _members(source, f)}
    # a member is read only within the larger of the tar reader's default and the record limit
    members = max(MAX_MEMBER, limit)
    urls = shard_urls(source)
    for url, sample in raw_samples(urls, source.fields, rejects.add, max_member=members):
        where = f"{url}:{sample['__key__']}"
        big = {ext: len(v) for ext, v in sample.items() if ext in texts and len(v) > limit}
        if big:  # refused before a worker decodes and tokenizes it
            ext, size = next(iter(big.items()))
            rejects.add("too_large", where, f"member {ext}: {too_large(limit, size)}")
            continue
        yield where, RawSample(url, sample, decoder, source.max_length, limit)


def _members(source: PrepareSource, name: str) -> list[str]:
    """The member alternatives of field `name` (`ext` or `ext:json_key`)."""
    value = getattr(source.fields, name)
    return [value] if isinstance(value, str) else list(value)


def _guarded(reader, path: Path, source: PrepareSource, rejects: Rejects) -> Iterator:
    """The records of one file until one it cannot read: the rest of that file is rejected
    (unreadable), the run goes on. Readers reject what they know themselves."""
    n = 0
    try:
        for record in reader(path, source, rejects):
            n += 1
            yield record
    except LaunchError:  # a missing extra: the other files would fail the same way
        raise
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        rejects.add("unreadable", str(path), f"after {n} records: {type(e).__name__}: {first_line}")


def list_inputs(recipe: PrepareRecipe) -> list[list[str]]:
    """Each source's input files (webdataset: shard URLs), in reading order."""
    files = (iter_files(s.paths, recipe.cache_dir) for s in recipe.sources)
    return [
        shard_urls(s) if s.kind == "webdataset" else [str(p) for p in paths]
        for s, paths in zip(recipe.sources, files, strict=True)
    ]


def require_decoders(recipe: PrepareRecipe, inputs: list[list[str]]) -> None:
    """Refuse, before anything is written, sources of clips when PyAV (the `video` extra) is
    missing: otherwise every clip would be rejected as undecodable, one by one."""
    for i, (source, urls) in enumerate(zip(recipe.sources, inputs, strict=True)):
        if source.kind == "webdataset" and source.fields.record == "video":
            clips = [f".{alt.partition(':')[0]}" for alt in source.fields.video]
        else:
            clips = [Path(u).suffix for u in urls] if source.kind == "video" else []
        if {c.lower() for c in clips} & PYAV_SUFFIXES:
            require_extra("av", "video", f"sources[{i}] ({source.name or source.kind}): its clips")


def count_inputs(recipe: PrepareRecipe, inputs: list[list[str]]) -> int | None:
    """How many records (webdataset: samples) `iter_records` reads, rejects included, where
    that is known without reading them: files of one record each, local raw shards (from
    their headers). None where any source cannot say (jsonl, DNA, remote shards)."""
    total = 0
    for source, urls in zip(recipe.sources, inputs, strict=True):
        n = _count(source.kind, urls)
        if n is None:
            return None
        total += min(n, source.limit) if source.limit else n
    return total


def _count(kind: str, urls: list[str]) -> int | None:
    if kind == "webdataset":
        counts = [count_samples(url) for url in urls]
        return None if None in counts else sum(counts)
    if kind in ("svg", "image-text", "image-mask", "video"):
        return sum(not is_sidecar(Path(u)) for u in urls)
    if kind == "text" and not any(u.endswith(".jsonl") for u in urls):
        return len(urls)
    return None
