"""Records from input files, one reader per source kind; every reject counted by reason."""

from __future__ import annotations

import glob
import json
import logging
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from mmfm.core.files import iter_files
from mmfm.core.types import DnaRecord, SvgRecord, TextRecord
from mmfm.prepare.recipe import PrepareRecipe, PrepareSource
from mmfm.tokenization.dna import read_dna, read_function_pairs
from mmfm.tokenization.visual.records import PictureError, visual_records

log = logging.getLogger("mmfm")


class Rejects:
    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._logged: set[tuple[str, str]] = set()

    def add(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] += 1
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
        try:
            yield TextRecord(path.name, path.read_bytes().decode("utf-8"), name)
        except UnicodeDecodeError as e:
            rejects.add("invalid_utf8", str(path), str(e))
        return
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            where = f"{path}:{i + 1}"
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

    name = source.name or source.kind
    reader = read_function_pairs if source.kind == "dna-pairs" else read_dna
    for record in reader(path, rejects.add):
        window = source.max_length or len(record.sequence) or 1
        for start in range(0, max(len(record.sequence), 1), window):
            key = record.key if window >= len(record.sequence) else f"{record.key}:{start}"
            seq = record.sequence[start : start + window]
            yield DnaRecord(key, seq, record.output, name)


def _svg_records(path: Path, source: PrepareSource, rejects: Rejects) -> Iterator:

    try:
        yield SvgRecord(path.stem, path.read_bytes().decode("utf-8"), source.name or "svg")
    except UnicodeDecodeError as e:
        rejects.add("invalid_utf8", str(path), str(e))


def _visual_records(path: Path, source: PrepareSource, rejects: Rejects) -> Iterator:

    siblings = path.parent.glob(glob.escape(path.stem) + ".*")
    if path.name.endswith(".mask.png") or (
        path.suffix == ".txt" and any(p != path for p in siblings)
    ):
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
        )
    except PictureError as e:
        rejects.add(e.reason, str(path), str(e))
    except (OSError, ValueError, RuntimeError, SyntaxError) as e:  # Pillow / PyAV decode errors
        rejects.add("undecodable", str(path), f"{type(e).__name__}: {e}")


_READERS = {"text": _text_records, "dna": _dna_records, "dna-pairs": _dna_records}
_READERS["svg"] = _svg_records
_READERS.update(dict.fromkeys(("image-text", "image-mask", "video"), _visual_records))


def iter_records(recipe: PrepareRecipe, rejects: Rejects) -> Iterator[tuple[str, object]]:
    """(where, record) of every source, where names the file and the record."""
    for source in recipe.sources:
        records = (
            (f"{path}:{record.key}", record)
            for path in iter_files(source.paths, recipe.cache_dir)
            for record in _guarded(_READERS[source.kind], path, source, rejects)
        )
        yield from islice(records, source.limit or None)


def _guarded(reader, path: Path, source: PrepareSource, rejects: Rejects) -> Iterator:
    """The records of one file until one it cannot read: the rest of that file is rejected
    (unreadable), the run goes on. Readers reject what they know themselves."""
    n = 0
    try:
        for record in reader(path, source, rejects):
            n += 1
            yield record
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        rejects.add("unreadable", str(path), f"after {n} records: {type(e).__name__}: {first_line}")
