"""`mmfm prepare RECIPE`: raw corpora -> tokenized WebDataset shards + manifest.json.

The records of every source are read in recipe order (files sorted) and cut into chunks of
`shard_size`; chunk i becomes `<output>/<name>-%06i.tar`, tokenized by a pool of worker
processes with the recipe's tokenizers (mmfm/prepare/pool.py: a worker that dies, killed or
crashed, is replaced, and a record that killed workers twice is counted `worker_died`). Raw
WebDataset samples travel to the workers as bytes and are decoded there: a JPEG's decode
costs more than reading it, and its pixels are about 12 times its bytes to send. A shard is
written under a temporary name and renamed when complete, with its statistics beside it (its
marker, `.stats/<shard>.json`, which holds the fingerprint of recipe, tokenizers and
inputs), so a rerun skips finished shards and an interrupted run resumes where it stopped;
the output is byte-identical either way and with any number of workers. A rerun with another
fingerprint is refused, or rebuilds with `overwrite`. Rejected records (invalid UTF-8 or
JSON, a missing member, tokenizer rejects such as an unsafe SVG or an invalid DNA character,
empty documents) are counted per reason and source and logged once per file. `manifest.json`
sums the shards: samples, tokens per modality, rejects, counts per source, the fingerprint,
and the fingerprint of the vocabulary, whose `vocab.json` is copied next to the shards
(training refuses shards of another vocabulary: `dataset_vocab`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter, deque
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mmfm.core.errors import ConfigError
from mmfm.core.modalities import registered, restore
from mmfm.core.types import MODALITY_NAMES, Document
from mmfm.data.decompose import length_digits
from mmfm.data.manifest import MANIFEST, read_manifest, write_manifest
from mmfm.data.shards import ShardError, write_shard
from mmfm.prepare.fingerprint import changed
from mmfm.prepare.fingerprint import fingerprint as fingerprint_of
from mmfm.prepare.megatron_out import with_related_order, write_megatron
from mmfm.prepare.order import related_fingerprint, staging, write_related
from mmfm.prepare.pool import WORKER_DIED, Job, Progress, WorkerPool
from mmfm.prepare.readers import (
    RawSample,
    Rejects,
    count_inputs,
    iter_records,
    list_inputs,
    require_decoders,
)
from mmfm.prepare.recipe import PrepareRecipe
from mmfm.prepare.shaping import log_realised, realised, rules
from mmfm.tokenization.dna import DnaError
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.shaping import shape
from mmfm.tokenization.svg import SvgError
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.vocab import VOCAB_FILE, Vocab

log = logging.getLogger("mmfm")

_TOKENIZERS = None
_FINGERPRINT = None  # of the run, written into every shard's marker
_SHAPING: dict = {}  # source name -> its condition dropout / caption order (shaping.py)


def _init_worker(
    tokenizer_recipe: str,
    fingerprint: dict,
    shaping: dict | None = None,
    modalities: tuple = (),
    threads: int = 0,
) -> None:
    """Load the tokenizers once per worker, with the parent's registered `modalities`.
    `threads`: torch's intra-op threads, the cores shared out among the workers: more threads
    than cores made the tiny visual tokenizers' encodes 20x slower on 2 busy cores (270 ms
    instead of 12 ms a picture)."""
    global _TOKENIZERS, _FINGERPRINT, _SHAPING

    restore(modalities)
    if threads:
        torch.set_num_threads(threads)
    _TOKENIZERS = Tokenizers.load(load_recipe(tokenizer_recipe))
    _FINGERPRINT, _SHAPING = fingerprint, shaping or {}


def _tokenize_shard(job: tuple) -> tuple[dict, list[tuple[str, str, str]]]:
    """Tokenize one chunk (a `Job`) of (where, record or RawSample) and write it as a shard;
    return its statistics and (reason, where, detail) of its rejects. Raw samples are decoded
    here. A record the tokenizers raise on, whatever the exception, is a counted reject, and
    so is one its workers died on twice (`Job.skip`): one record never stops the run."""
    path, items, seed, skip = Job(*job)
    rng = np.random.default_rng([seed, int(Path(path).stem.rsplit("-", 1)[1])])
    docs, notes, sources = [], [], {}
    with Progress(path) as progress:
        for i, (where, item) in enumerate(items):
            progress(i)
            name = item.decoder.source if isinstance(item, RawSample) else item.source
            counts = sources.setdefault(name, {"documents": 0, "tokens": 0, "rejected": Counter()})

            def reject(reason: str, at: str, detail: str, counts=counts) -> None:
                counts["rejected"][reason] += 1
                notes.append((reason, at, detail))

            if i in skip:
                reject("worker_died", where, WORKER_DIED)
                continue
            for record in item.records(reject) if isinstance(item, RawSample) else [item]:
                record, tags = shape(record, _SHAPING.get(name), seed)
                if (doc := _encode(record, rng, where, reject)) is not None:
                    docs.append(doc)
                    counts["documents"] += 1
                    counts["tokens"] += len(doc.tokens)
                    if tags:
                        counts.setdefault("shaped", Counter()).update(tags)
        progress(len(items))
        stats = _shard_stats(path, docs, sources)
        _write_stats(Path(path), stats)
        write_shard(path, docs)
    return stats, notes


def _shard_stats(path: str, docs: list[Document], sources: dict) -> dict:
    modality = np.concatenate([d.modality for d in docs]) if docs else np.zeros(0, np.uint8)
    by_modality = np.bincount(modality, minlength=len(MODALITY_NAMES))
    return {
        "file": Path(path).name,
        "samples": len(docs),
        "tokens": int(by_modality.sum()),
        "tokens_by_modality": dict(zip(MODALITY_NAMES, map(int, by_modality), strict=True)),
        "length_digits": length_digits([len(d.tokens) for d in docs]),
        "rejected": dict(sum((c["rejected"] for c in sources.values()), Counter())),
        "removed": _TOKENIZERS.svg.take_removed(),  # what sanitising dropped from kept SVGs
        "sources": {n: {**c, "rejected": dict(c["rejected"])} for n, c in sources.items()},
        "fingerprint": _FINGERPRINT,
    }


def _encode(record, rng, where: str, reject) -> Document | None:
    """The document of `record`, or None when it is rejected (see _tokenize_shard)."""
    try:
        doc = _TOKENIZERS.encode(record, rng)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # also a Rust panic in tokenizers (pyo3's PanicException)
        reject(_reason(e), where, f"{type(e).__name__}: {_first_line(e)}")
        return None
    if _is_empty(doc):
        reject("empty", where, "no content between the frames")
        return None
    return doc


def _reason(e: BaseException) -> str:

    if isinstance(e, DnaError):
        return "dna_error"
    if isinstance(e, SvgError):
        return "svg_error"
    return "tokenizer_error"  # anything else a tokenizer raises (sentencepiece, numpy, ...)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]  # a panic's message ends in a backtrace


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


def _chunks(records: Iterator, size: int, sizes: deque) -> Iterator[list]:
    """Lists of `size` records; the length of each is also appended to `sizes`."""
    while chunk := list(islice(records, size)):
        sizes.append(len(chunk))
        yield chunk


def prepare(
    recipe: PrepareRecipe,
    workers: int = 1,
    progress: bool = True,
    part: tuple[int, int] = (0, 1),
    overwrite: bool = False,
) -> dict | None:
    """Write the shards and manifest of `recipe`; return the manifest.

    `part=(i, n)` tokenizes only the shards whose index is i modulo n (one task of an array
    job); the manifest is written once every shard exists (None until then). Shards of
    another recipe, tokenizer or inputs in the output are refused, or removed with
    `overwrite`.
    """
    if recipe.order == "related":  # tokenized as read into a staging folder, then ordered
        staged = prepare(staging(recipe), workers, progress, part, overwrite)
        if staged is None:
            return None
        _check_output(Path(recipe.output), related_fingerprint(staged), overwrite)
        ordered = write_related(recipe, staged, related_fingerprint(staged))
        return with_related_order(recipe, ordered)  # format: megatron from the ordered shards
    out = Path(recipe.output)
    inputs = list_inputs(recipe)
    require_decoders(recipe, inputs)  # the environment first: a missing extra names itself
    tokenizer_recipe = load_recipe(recipe.tokenizer)
    tokenizers = Tokenizers.load(tokenizer_recipe)  # fails early if untrained
    _check_visual(recipe, tokenizers)
    fingerprint = fingerprint_of(recipe, tokenizer_recipe, inputs)
    _check_output(out, fingerprint, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    tokenizers.vocab.save(out / VOCAB_FILE)
    rejects = Rejects()
    index, parts = part
    sizes: deque[int] = deque()  # records of each chunk, for the progress bar
    jobs = (
        (str(out / f"{recipe.name}-{i:06d}.tar"), chunk, recipe.seed, i % parts == index)
        for i, chunk in enumerate(_chunks(iter_records(recipe, rejects), recipe.shard_size, sizes))
    )
    todo_or_done = (
        Job(*job[:3]) if job[3] and not Path(job[0]).exists() else job[0] for job in jobs
    )
    shards, skipped, paths, read = [], 0, [], 0
    init = (recipe.tokenizer, fingerprint, rules(recipe), registered())
    work = WorkerPool(workers, _run_or_skip, _init_worker, init).results(todo_or_done)
    with _progress_bar(recipe, inputs, progress) as bar:  # closed on an error too: its line ends
        for path, (stats, was_done, notes) in work:
            skipped += was_done
            for note in notes:
                rejects.log(*note)
            shards.append(stats)
            paths.append(path)
            read += sizes.popleft()
            bar.update(read + rejects.total - bar.n)
    # Other array tasks' shards, looked at again now that this task's own are all written:
    # whichever task looks last sees every shard and writes the manifest.
    shards = [s or _finished_stats(Path(p)) for s, p in zip(shards, paths, strict=True)]
    if not all(shards):
        log.info("%s: %d of %d shards written", out, sum(map(bool, shards)), len(shards))
        return None
    manifest = _manifest(recipe, shards, rejects, tokenizers.vocab.fingerprint, fingerprint)
    if recipe.format == "megatron":  # the same documents as an indexed dataset, from the shards
        manifest["megatron"] = write_megatron(out, recipe.name, paths, tokenizers.vocab.size)
    write_manifest(out, manifest)
    for leftover in out.glob(".*.tmp"):  # temporary files of an interrupted run
        leftover.unlink()
    log.info(
        "%s: %d shards (%d already done), %d documents, %d tokens, rejected %s",
        out, len(shards), skipped, manifest["samples"], manifest["tokens"], manifest["rejected"],
    )  # fmt: skip
    log_realised(manifest["sources"])
    return manifest


def _check_visual(recipe: PrepareRecipe, tokenizers: Tokenizers) -> None:
    """Load the visual tokenizers the sources need once, before any output: a missing,
    untrained or damaged one is one error naming it, not every picture a tokenizer_error."""
    for name in dict.fromkeys(n for s in recipe.sources for n in s.visual_tokenizers):
        tokenizers.visual.model(name)


def _progress_bar(recipe: PrepareRecipe, inputs: list[list[str]], progress: bool) -> tqdm:
    """A bar of input records (webdataset: samples) per second. Its total, and so an ETA,
    comes from a thread that counts the inputs where that is possible without reading them
    (`count_inputs`: e.g. a raw shard's headers), so counting never delays the first shard."""
    bar = tqdm(unit="sample", desc=f"prepare {recipe.name}", disable=not progress)

    def count() -> None:
        try:
            total = count_inputs(recipe, inputs)
        except Exception as e:  # the bar does without a total
            log.debug("no total for the progress bar: %s", e)
            return
        if total is not None:
            bar.total = total
            bar.refresh()

    if progress:
        threading.Thread(target=count, daemon=True).start()
    return bar


def _check_output(out: Path, fingerprint: dict, overwrite: bool) -> None:
    """Refuse an output that holds shards (or a manifest) of another fingerprint, naming what
    changed and `--overwrite`; with `overwrite`, remove them (finished shards of this
    fingerprint stay: the run resumes)."""
    stale = []
    for path in [*sorted(out.glob("*.tar")), out / MANIFEST]:
        made = _read_json(_stats_path(path)) if path.suffix == ".tar" else _manifest_json(path)
        if path.suffix == ".tar" or made is not None:  # a shard without a marker is foreign
            old = (made or {}).get("fingerprint")
            if not isinstance(old, dict) or old.get("all") != fingerprint["all"]:
                stale.append((path, old))
    if not stale:
        return
    if not overwrite:
        shards = sum(path.suffix == ".tar" for path, _ in stale)
        raise ConfigError(
            f"{out} holds {f'{shards} shard(s)' if shards else 'a manifest.json'} of another "
            f"recipe ({changed(stale[0][1], fingerprint)}): rerun mmfm prepare with --overwrite "
            "to rebuild them, or set output to another directory"
        )
    log.warning("%s: removing %d shard(s) of another recipe (--overwrite)", out, len(stale))
    for path, _ in stale:
        path.unlink(missing_ok=True)
        if path.suffix == ".tar":
            _stats_path(path).unlink(missing_ok=True)


def check_output(recipe: PrepareRecipe, overwrite: bool = False) -> None:
    """What `prepare` checks first, alone: shards of another fingerprint in the output are
    refused, or removed with `overwrite`. `mmfm slurm prepare` calls it once at submission:
    array tasks would all fail on it, or with `overwrite` remove each other's fresh shards."""
    if recipe.order == "related":
        if overwrite:
            raise ConfigError(
                f"{recipe.output}: --overwrite at submission is not for order: related (its "
                "fingerprint is known after staging); remove the output or run mmfm prepare"
            )
        return
    inputs = list_inputs(recipe)
    fingerprint = fingerprint_of(recipe, load_recipe(recipe.tokenizer), inputs)
    _check_output(Path(recipe.output), fingerprint, overwrite)


def _manifest_json(path: Path) -> dict | None:
    """The manifest at `path` as a JSON object, or None (missing, unreadable)."""
    try:
        return read_manifest(path).as_dict()
    except ShardError:
        return None


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None (missing, unreadable: an interrupted write)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


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


def _manifest(
    recipe: PrepareRecipe, shards: list[dict], rejects: Rejects, vocab: str, fingerprint: dict
) -> dict:
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
        "fingerprint": fingerprint,
        "sources": _per_source(recipe, shards, rejects),
        "shards": [{k: v for k, v in s.items() if k != "fingerprint"} for s in shards],
        "samples": sum(s["samples"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "tokens_by_modality": {m: by_modality[m] for m in MODALITY_NAMES},
        "rejected": dict(rejected),
        "removed": dict(removed),
    }


def _per_source(recipe: PrepareRecipe, shards: list[dict], rejects: Rejects) -> dict:
    """{source name: {documents, tokens, rejected}}, in recipe order; rejected sums what the
    readers rejected and what the workers did."""
    names = dict.fromkeys(s.name or s.kind for s in recipe.sources)
    totals = {n: {"documents": 0, "tokens": 0, "rejected": Counter()} for n in names}
    for name, counts in rejects.by_source.items():
        totals[name]["rejected"].update(counts)
    for shard in shards:
        for name, counts in shard.get("sources", {}).items():
            total = totals.setdefault(name, {"documents": 0, "tokens": 0, "rejected": Counter()})
            total["documents"] += counts["documents"]
            total["tokens"] += counts["tokens"]
            total["rejected"].update(counts["rejected"])
            total.setdefault("shaped", Counter()).update(counts.get("shaped", {}))
    for name, rule in rules(recipe).items():  # realised shares of dropout and caption order
        if rule.draws:
            totals[name]["shaping"] = realised(totals[name].get("shaped", {}))
    return {
        n: {**{k: v for k, v in t.items() if k != "shaped"}, "rejected": dict(t["rejected"])}
        for n, t in totals.items()
    }


def dataset_vocab(directory: str | Path) -> tuple[str, Path] | None:
    """(fingerprint, the file that says so) of the vocabulary the shards in `directory` were
    prepared with: from its manifest.json, else its vocab.json (a run still writing, or an
    older manifest); None for shards that carry neither (made elsewhere)."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if manifest.is_file():
        try:
            fingerprint = read_manifest(manifest).vocab_fingerprint
        except ShardError as e:
            raise ShardError(f"unreadable manifest: {e}: run mmfm prepare again") from e
        if fingerprint is not None:
            return fingerprint, manifest
    if (directory / VOCAB_FILE).is_file():
        return Vocab.load(directory / VOCAB_FILE).fingerprint, directory / VOCAB_FILE
    return None
