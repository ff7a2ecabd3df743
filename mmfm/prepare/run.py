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

import json
import logging
import multiprocessing as mp
import os
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmfm.core.types import MODALITY_NAMES
from mmfm.data.shards import ShardError, write_shard
from mmfm.prepare.readers import Rejects, iter_records
from mmfm.prepare.recipe import MANIFEST, PrepareRecipe
from mmfm.tokenization.dna import DnaError
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.svg import SvgError
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.vocab import VOCAB_FILE, Vocab

log = logging.getLogger("mmfm")

_TOKENIZERS = None


def _init_worker(tokenizer_recipe: str) -> None:
    global _TOKENIZERS

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
