"""`mmfm prepare RECIPE`: raw corpora -> tokenized WebDataset shards + manifest.json.

The records of every source are read in recipe order (files sorted) and cut into chunks of
`shard_size`; chunk i becomes `<output>/<name>-%06i.tar`, tokenized by a pool of worker
processes with the recipe's tokenizers. A shard is written under a temporary name and
renamed when complete, with its statistics beside it, so a rerun skips finished shards and
an interrupted run resumes where it stopped; the output is byte-identical either way.
Rejected records (invalid UTF-8 or JSON, tokenizer rejects such as an unsafe SVG or an
invalid DNA character, empty documents) are counted per reason and logged once per file.
`manifest.json` sums the shards: samples, tokens per modality, rejects, and the fingerprint
of the vocabulary, whose `vocab.json` is copied next to the shards (training refuses
shards of another vocabulary: `dataset_vocab`).
"""

from __future__ import annotations

import glob
import json
import logging
import multiprocessing as mp
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmfm.config.loading import load_structured
from mmfm.config.schema import _require, _require_choice, _require_positive
from mmfm.data.batch import MODALITY_NAMES
from mmfm.data.files import iter_files
from mmfm.data.shards import ShardError, write_shard
from mmfm.tokenization.vocab import VOCAB_FILE, Vocab

log = logging.getLogger("mmfm")
MANIFEST = "manifest.json"
KINDS = ("text", "dna", "dna-pairs", "svg", "image-text", "image-mask", "video")


@dataclass
class PrepareSource:
    kind: str = "text"
    """text (jsonl records, or one record per other file), dna (FASTA / FASTQ / GenBank
    sequences), dna-pairs (GenBank CDS -> /product task pairs), svg (one record per file),
    image-text (an image and its caption: the sidecar <stem>.txt, else the file name),
    image-mask (an image and its mask: the sidecar <stem>.mask.png, else Otsu's threshold)
    or video (a clip's frames, and its caption as for image-text)."""
    paths: list[str] = field(default_factory=list)
    """Files, directories, globs, or real:<name> (fetched from a registry)."""
    name: str = ""
    """Stored as each document's source; default: the kind."""
    jsonl_field: str = "text"
    """Field of a jsonl record that holds the text."""
    max_length: int = 0
    """dna: cut sequences into windows of at most this many bases (0: whole sequences)."""
    limit: int = 0
    """Read at most this many records of this source (0: all)."""
    fps: float = 2.0
    """video: frames per second taken from each clip."""
    max_frames: int = 8
    """video: at most this many frames per clip (each is 257 tokens with its <eof>)."""
    caption_from_name: bool = True
    """image-text, video: without a sidecar <stem>.txt, caption with the file name's words."""
    max_pixels: int = 1 << 26
    """image-text, image-mask, video: refuse (count as too_large) a picture, mask or frame of
    more pixels, read from its header before decoding (64M: 8192 x 8192, 192 MiB as RGB).
    Decompression bombs (over Pillow's ~179M pixels) are refused whatever this says."""

    def __post_init__(self) -> None:
        _require_choice("sources[].kind", self.kind, KINDS)
        _require(bool(self.paths), f"sources: a {self.kind} source needs paths")
        _require(self.max_length >= 0 and self.limit >= 0, "max_length and limit must be >= 0")
        _require(self.fps > 0 and self.max_frames > 0, "fps and max_frames must be > 0")
        _require(self.max_pixels > 0, "sources[].max_pixels must be > 0")


@dataclass
class PrepareRecipe:
    name: str = "data"
    """Shard name prefix: <output>/<name>-000000.tar, ..."""
    output: str = "data/out"
    """Directory of the shards, manifest.json and vocab.json."""
    tokenizer: str = "tokenizers/base.yaml"
    """Tokenizer recipe whose trained files tokenize the records."""
    shard_size: int = 1000
    """Records per shard (rejected records leave a shard a little smaller)."""
    seed: int = 0
    """Seed of tokenizer augmentations (DNA reverse complement)."""
    cache_dir: str = "~/.cache/mmfm"
    """Where real:<name> inputs are fetched to."""
    sources: list[PrepareSource] = field(default_factory=list)
    """What to read, in order."""

    def __post_init__(self) -> None:
        _require_positive(self, "prepare", "shard_size")
        _require(bool(self.sources), "a prepare recipe needs at least one entry in sources")


def load_prepare_recipe(path, overrides=()) -> PrepareRecipe:
    return load_structured(PrepareRecipe, path, overrides)


# -- reading records ----------------------------------------------------------------------------


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
    from mmfm.tokenization.tokenizers import TextRecord

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
    from mmfm.tokenization.dna import DnaRecord, read_dna, read_function_pairs

    name = source.name or source.kind
    reader = read_function_pairs if source.kind == "dna-pairs" else read_dna
    for record in reader(path, rejects.add):
        window = source.max_length or len(record.sequence) or 1
        for start in range(0, max(len(record.sequence), 1), window):
            key = record.key if window >= len(record.sequence) else f"{record.key}:{start}"
            seq = record.sequence[start : start + window]
            yield DnaRecord(key, seq, record.output, name)


def _svg_records(path: Path, source: PrepareSource, rejects: Rejects) -> Iterator:
    from mmfm.tokenization.svg import SvgRecord

    try:
        yield SvgRecord(path.stem, path.read_bytes().decode("utf-8"), source.name or "svg")
    except UnicodeDecodeError as e:
        rejects.add("invalid_utf8", str(path), str(e))


def _visual_records(path: Path, source: PrepareSource, rejects: Rejects) -> Iterator:
    from mmfm.tokenization.visual.records import PictureError, visual_records

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


# -- tokenizing shards in workers ---------------------------------------------------------------

_TOKENIZERS = None


def _init_worker(tokenizer_recipe: str) -> None:
    global _TOKENIZERS
    from mmfm.tokenization.recipe import load_recipe
    from mmfm.tokenization.tokenizers import Tokenizers

    _TOKENIZERS = Tokenizers.load(load_recipe(tokenizer_recipe))


def _tokenize_shard(job: tuple) -> tuple[dict, list[tuple[str, str, str]]]:
    """Tokenize one chunk of (where, record) and write it as a shard; return its statistics
    and (reason, where, detail) of its rejects. A record the tokenizers raise on, whatever
    the exception, is a counted reject: one record never stops the pool."""
    path, records, seed = job
    rng = np.random.default_rng([seed, int(Path(path).stem.rsplit("-", 1)[1])])
    docs, rejected, notes = [], Counter(), []
    for where, record in records:
        try:
            doc = _TOKENIZERS.encode(record, rng)
        except Exception as e:  # see the docstring
            reason, detail = _reason(e), f"{type(e).__name__}: {e}"
        else:
            if not _is_empty(doc):
                docs.append(doc)
                continue
            reason, detail = "empty", "no content between the frames"
        rejected[reason] += 1
        notes.append((reason, where, detail))
    modality = np.concatenate([d.modality for d in docs]) if docs else np.zeros(0, np.uint8)
    by_modality = np.bincount(modality, minlength=len(MODALITY_NAMES))
    stats = {
        "file": Path(path).name,
        "samples": len(docs),
        "tokens": int(by_modality.sum()),
        "tokens_by_modality": dict(zip(MODALITY_NAMES, map(int, by_modality), strict=True)),
        "rejected": dict(rejected),
        "removed": _TOKENIZERS.svg.take_removed(),  # what sanitising dropped from kept SVGs
    }
    _write_stats(Path(path), stats)
    write_shard(path, docs)
    return stats, notes


def _reason(e: Exception) -> str:
    from mmfm.tokenization.dna import DnaError
    from mmfm.tokenization.svg import SvgError

    if isinstance(e, DnaError):
        return "dna_error"
    if isinstance(e, SvgError):
        return "svg_error"
    return "tokenizer_error"  # anything else a tokenizer raises (sentencepiece, numpy, ...)


def _is_empty(doc) -> bool:
    """<s> </s> alone, or a framed span with nothing between its delimiters (an empty FASTA
    record, a CDS without bases)."""
    if len(doc.tokens) <= 2:
        return True
    counts = np.bincount(doc.modality, minlength=len(MODALITY_NAMES))
    return bool((counts[1:] == 2).any())  # delimiters belong to their span; 0 is text


def _stats_path(shard: Path) -> Path:
    return shard.parent / ".stats" / f"{shard.stem}.json"


def _write_stats(shard: Path, stats: dict) -> None:
    target = _stats_path(shard)
    target.parent.mkdir(exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stats))
    os.replace(tmp, target)


def _chunks(records: Iterator, size: int) -> Iterator[list]:
    while chunk := list(islice(records, size)):
        yield chunk


def prepare(
    recipe: PrepareRecipe, workers: int = 1, progress: bool = True, part: tuple[int, int] = (0, 1)
) -> dict | None:
    """Write the shards and manifest of `recipe`; return the manifest.

    `part=(i, n)` tokenizes only the shards whose index is i modulo n (one task of an array
    job); the manifest is written once every shard exists (None until then).
    """
    from mmfm.tokenization.recipe import load_recipe
    from mmfm.tokenization.tokenizers import Tokenizers

    out = Path(recipe.output)
    out.mkdir(parents=True, exist_ok=True)
    tokenizers = Tokenizers.load(load_recipe(recipe.tokenizer))  # fails early if untrained
    tokenizers.vocab.save(out / VOCAB_FILE)
    rejects = Rejects()
    index, parts = part
    jobs = (
        (str(out / f"{recipe.name}-{i:06d}.tar"), chunk, recipe.seed, i % parts == index)
        for i, chunk in enumerate(_chunks(iter_records(recipe, rejects), recipe.shard_size))
    )
    todo_or_done = (job[:3] if job[3] and not Path(job[0]).exists() else job[0] for job in jobs)
    bar = tqdm(unit="doc", desc=f"prepare {recipe.name}", disable=not progress)
    shards, skipped, paths = [], 0, []
    with mp.get_context("spawn").Pool(workers, _init_worker, (recipe.tokenizer,)) as pool:
        for path, (stats, was_done, notes) in pool.imap(_run_or_skip, todo_or_done):
            skipped += was_done
            for note in notes:
                rejects.log(*note)
            shards.append(stats)
            paths.append(path)
            if stats:
                bar.update(stats["samples"] + sum(stats["rejected"].values()))
    bar.close()
    # Other array tasks' shards, looked at again now that this task's own are all written:
    # whichever task looks last sees every shard and writes the manifest.
    shards = [s or _finished_stats(Path(p)) for s, p in zip(shards, paths, strict=True)]
    if not all(shards):
        log.info("%s: %d of %d shards written", out, sum(map(bool, shards)), len(shards))
        return None
    manifest = _manifest(recipe, shards, rejects, tokenizers.vocab.fingerprint)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for leftover in out.glob(".*.tmp"):  # temporary files of an interrupted run
        leftover.unlink()
    log.info(
        "%s: %d shards (%d already done), %d documents, %d tokens, rejected %s",
        out, len(shards), skipped, manifest["samples"], manifest["tokens"], manifest["rejected"],
    )  # fmt: skip
    return manifest


def _finished_stats(shard: Path) -> dict | None:
    return json.loads(_stats_path(shard).read_text()) if shard.exists() else None


def _run_or_skip(job) -> tuple[str, tuple[dict | None, bool, list]]:
    """(shard path, (its statistics or None if another task has yet to write it, skipped,
    its rejects to log))."""
    if isinstance(job, str):  # written by an earlier run or another array task, or not yet
        stats = _finished_stats(Path(job))
        return job, (stats, stats is not None, [])
    stats, notes = _tokenize_shard(job)
    return job[0], (stats, False, notes)


def _manifest(recipe: PrepareRecipe, shards: list[dict], rejects: Rejects, vocab: str) -> dict:
    by_modality: Counter = Counter()
    rejected: Counter = Counter(rejects.counts)
    removed: Counter = Counter()
    for s in shards:
        by_modality.update(s["tokens_by_modality"])
        rejected.update(s["rejected"])
        removed.update(s.get("removed", {}))
    return {
        "format": "mmfm-shards/1",
        "name": recipe.name,
        "tokenizer": recipe.tokenizer,
        "vocab": VOCAB_FILE,
        "vocab_fingerprint": vocab,
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "tokens_by_modality": {m: by_modality[m] for m in MODALITY_NAMES},
        "rejected": dict(rejected),
        "removed": dict(removed),
    }


def dataset_vocab(directory: str | Path) -> tuple[str, Path] | None:
    """(fingerprint, the file that says so) of the vocabulary the shards in `directory` were
    prepared with: from its manifest.json, else its vocab.json (a run still writing, or an
    older manifest); None for shards that carry neither (made elsewhere)."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if manifest.is_file():
        try:
            fingerprint = json.loads(manifest.read_text()).get("vocab_fingerprint")
        except (OSError, ValueError, AttributeError) as e:
            raise ShardError(f"{manifest}: unreadable ({e}): run mmfm prepare again") from e
        if fingerprint is not None:
            return fingerprint, manifest
    if (directory / VOCAB_FILE).is_file():
        return Vocab.load(directory / VOCAB_FILE).fingerprint, directory / VOCAB_FILE
    return None
