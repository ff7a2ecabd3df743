"""`order: related`: shards in In-Context Pretraining order (Shi et al., ICLR 2024).

ICP trains on rows of related documents: every document is embedded, its nearest neighbours
found, and the documents laid out as one path that walks from a document to its most similar
unvisited neighbour (the paper's greedy approximation of a maximum travelling salesman path),
each document once, near-duplicates dropped. Consecutive documents then share a topic, so the
loader, reading them in order (`data.sources[].ordered`), packs neighbours into one row.

The embedding needs nothing beyond numpy and sees every modality the same way: a hashed
TF-IDF of each document's token-id unigrams and bigrams, signed feature hashing into `DIM`
buckets (a sketch of the exact sparse cosine: collisions cancel out on average),
L2-normalised. Neighbours are exact (a blocked matrix product) up to `EXACT_DOCS` documents,
beyond which `faiss-cpu` (optional, an HNSW index) must be installed. The whole corpus is
held in memory: at most `MAX_TOKENS` tokens and `MAX_DOCUMENTS` documents, checked from the
manifest before anything is read.

`mmfm prepare` tokenizes as read into `<output>/.as_read/` (resumable as always), then this
module writes the ordered shards and the manifest into `<output>`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfm.core.errors import ConfigError
from mmfm.core.types import MODALITY_NAMES, Document
from mmfm.data.decompose import length_digits
from mmfm.data.manifest import MANIFEST, read_manifest, write_manifest
from mmfm.data.shards import ShardError, read_shard, write_shard
from mmfm.prepare.recipe import PrepareRecipe
from mmfm.tokenization.vocab import VOCAB_FILE

try:  # optional: approximate neighbours for corpora beyond EXACT_DOCS
    import faiss
except ImportError:  # pragma: no cover - depends on the environment
    faiss = None

log = logging.getLogger("mmfm")

STAGING = ".as_read"
"""Sub-folder of the output that holds the shards as read, before ordering."""
DIM = 1024
"""Buckets of the hashed embedding (4 KiB per document)."""
NEIGHBOURS = 16
"""k of the k-nearest-neighbour graph the path walks on."""
DUPLICATE = 0.99
"""Cosine at or above which a neighbour is a near-duplicate (dropped, counted)."""
EXACT_DOCS = 100_000
"""Up to this many documents the neighbours are exact: O(n^2) products, 84 s for the 31,103
KJV verses on 2 busy CPU cores, so about a quarter of an hour at the cap."""
MAX_DOCUMENTS = 1_000_000
MAX_TOKENS = 1 << 29
"""The corpus is held in RAM: at most this many tokens (5 bytes each) and documents."""
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads the keys over 64 bits


def staging(recipe: PrepareRecipe) -> PrepareRecipe:
    """The recipe that tokenizes `recipe`'s records as read, into `<output>/.as_read`."""
    staged = str(Path(recipe.output) / STAGING)  # shards only: format megatron comes after
    return dataclasses.replace(recipe, order="as_read", format="webdataset", output=staged)


def related_fingerprint(staged: dict) -> dict:
    """The fingerprint of the ordered output: the staged one's, with the order in its recipe
    part (so an output of `order: as_read` is refused, or rebuilt with --overwrite)."""
    parts = {k: staged["fingerprint"][k] for k in ("recipe", "tokenizer", "inputs")}
    parts["recipe"] = _digest([parts["recipe"], "related", DIM, NEIGHBOURS, DUPLICATE])
    return {**parts, "all": _digest(parts)}


def _digest(value) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- embedding and neighbours -----------------------------------------------------------------


def _ngram_keys(tokens: np.ndarray) -> np.ndarray:
    """uint64 keys of a document's unigrams and bigrams (bigrams tagged by their top bit)."""
    t = tokens.astype(np.uint64)
    bigrams = (t[:-1] << np.uint64(32)) | t[1:] | np.uint64(1 << 63)
    return np.concatenate([t, bigrams])


def embed(docs: Sequence[np.ndarray], dim: int = DIM) -> np.ndarray:
    """[n, dim] float32, L2-normalised: hashed TF-IDF (sublinear tf, smoothed idf) of the
    token-id unigrams and bigrams of each document."""
    if not len(docs):
        return np.zeros((0, dim), np.float32)
    keys, counts, rows = [], [], []
    for i, tokens in enumerate(docs):
        k, c = np.unique(_ngram_keys(np.asarray(tokens)), return_counts=True)
        keys.append(k)
        counts.append(c)
        rows.append(np.full(len(k), i, np.int64))
    key, count, row = np.concatenate(keys), np.concatenate(counts), np.concatenate(rows)
    unique, inverse, df = np.unique(key, return_inverse=True, return_counts=True)
    idf = np.log((1 + len(docs)) / (1 + df)) + 1
    weight = (1 + np.log(count)) * idf[inverse]
    mixed = unique * _MIX  # wraps modulo 2^64, as hashing wants
    bucket = (mixed >> np.uint64(40)).astype(np.int64) % dim
    sign = np.where((mixed >> np.uint64(20)) & np.uint64(1), 1.0, -1.0)
    flat = row * dim + bucket[inverse]
    x = np.bincount(flat, weight * sign[inverse], minlength=len(docs) * dim)
    x = x.reshape(len(docs), dim).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def neighbours(x: np.ndarray, k: int = NEIGHBOURS, block: int = 512) -> tuple:
    """(indices [n, k'], cosines [n, k']) of each row's k' = min(k, n - 1) nearest other rows,
    most similar first: exact up to EXACT_DOCS rows, faiss HNSW above."""
    n = len(x)
    k = min(k, n - 1)
    if n > EXACT_DOCS:
        return _faiss_neighbours(x, k)
    index = np.empty((n, k), np.int64)
    sims = np.empty((n, k), np.float32)
    for lo in range(0, n, block):
        s = x[lo : lo + block] @ x.T
        s[np.arange(len(s)), np.arange(lo, lo + len(s))] = -np.inf  # not its own neighbour
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        top_s = np.take_along_axis(s, top, axis=1)
        by = np.argsort(-top_s, axis=1, kind="stable")
        index[lo : lo + len(s)] = np.take_along_axis(top, by, axis=1)
        sims[lo : lo + len(s)] = np.take_along_axis(top_s, by, axis=1)
    return index, sims


def _require_faiss(n: int) -> None:
    if n > EXACT_DOCS and faiss is None:
        raise ConfigError(
            f"order: related on {n} documents needs faiss-cpu beyond {EXACT_DOCS} documents "
            "(exact neighbours take O(n^2)): pip install faiss-cpu, or split the sources into "
            "several recipes"
        )


def _faiss_neighbours(x: np.ndarray, k: int) -> tuple:
    _require_faiss(len(x))
    hnsw = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(x)
    sims, index = hnsw.search(x, k + 1)
    keep = index != np.arange(len(x))[:, None]  # drop each row's self match
    take = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(index, take, 1), np.take_along_axis(sims, take, 1)


# -- the path -----------------------------------------------------------------------------------


@dataclass
class Order:
    order: list[int]
    """Kept documents, in path order."""
    duplicates: list[int]
    """Documents dropped as near-duplicates of a kept one."""
    restarts: int
    """Times the walk was stuck (every neighbour visited) and started a new path."""


def near_duplicates(index: np.ndarray, sims: np.ndarray, threshold: float = DUPLICATE) -> list:
    """Documents that are a near-duplicate neighbour (cosine >= threshold) of a kept earlier
    document: each kept document, in corpus order, drops its later near-duplicates, so one of
    every group stays (of a group larger than k, some may stay beyond the first)."""
    dropped = np.zeros(len(index), bool)
    for i in range(len(index)):
        if not dropped[i]:
            dupes = index[i][sims[i] >= threshold]
            dropped[dupes[dupes > i]] = True
    return np.flatnonzero(dropped).tolist()


def related_order(x: np.ndarray, k: int = NEIGHBOURS, threshold: float = DUPLICATE) -> Order:
    """The ICP path over the rows of `x`: start at the unvisited document of lowest degree in
    the neighbour graph (the fewest documents call it a neighbour: an outlier, placed before
    its neighbours are used up), walk to the most similar unvisited neighbour, restart when
    every neighbour is visited. Every document is in `order` or `duplicates`, exactly once."""
    n = len(x)
    if n < 2:
        return Order(list(range(n)), [], min(n, 1))
    index, sims = neighbours(x, k)
    duplicates = near_duplicates(index, sims, threshold)
    visited = np.zeros(n, bool)
    visited[duplicates] = True
    degree = np.bincount(index[~visited].ravel(), minlength=n)
    starts = iter(np.argsort(degree, kind="stable").tolist())
    order, restarts, current = [], 0, -1
    for _ in range(n - len(duplicates)):
        if current < 0:
            current = next(s for s in starts if not visited[s])
            restarts += 1
        visited[current] = True
        order.append(current)
        free = index[current][~visited[index[current]]]
        current = int(free[0]) if len(free) else -1
    return Order(order, duplicates, restarts)


def consecutive_similarity(x: np.ndarray, order: Sequence[int]) -> float:
    """Mean cosine of each document with the next in `order`."""
    o = np.asarray(order)
    return float(np.mean(np.sum(x[o[:-1]] * x[o[1:]], axis=1))) if len(o) > 1 else 0.0


# -- shards ----------------------------------------------------------------------------------


def _check_size(staged: dict, where: Path) -> None:
    docs, tokens = staged["samples"], staged["tokens"]
    if docs > MAX_DOCUMENTS or tokens > MAX_TOKENS:
        raise ConfigError(
            f"order: related holds the whole corpus in memory: {where} has {docs} documents and "
            f"{tokens} tokens, over the limits of {MAX_DOCUMENTS} documents and {MAX_TOKENS} "
            "tokens; split the sources into several recipes (each ordered on its own) or set "
            "order: as_read"
        )
    _require_faiss(docs)


def write_related(recipe: PrepareRecipe, staged: dict, fingerprint: dict) -> dict:
    """Read the staged shards, order their documents, write them as `<output>/<name>-*.tar`
    (recipe.shard_size documents each) with their markers, and the manifest; return it."""
    out = Path(recipe.output)
    done = _read_manifest(out / MANIFEST)
    if (done.get("fingerprint") or {}).get("all") == fingerprint["all"]:
        return done  # a rerun: the ordered shards are written already
    _check_size(staged, out / STAGING)
    search = "exact" if staged["samples"] <= EXACT_DOCS else "faiss HNSW"
    log.info("%s: ordering %d documents (%s neighbours)", out, staged["samples"], search)
    docs = [d for s in staged["shards"] for d in read_shard(str(out / STAGING / s["file"]))]
    x = embed([d.tokens for d in docs])
    path = related_order(x)
    random = np.random.default_rng(recipe.seed).permutation(path.order)
    stats = {
        "order": "related",
        "documents": len(path.order),
        "duplicates": len(path.duplicates),
        "restarts": path.restarts,
        "consecutive_similarity": round(consecutive_similarity(x, path.order), 4),
        "random_similarity": round(consecutive_similarity(x, random), 4),
    }
    log.info("%s: related order %s", out, stats)
    ordered = [docs[i] for i in path.order]
    shards = []
    for i in range(0, len(ordered), recipe.shard_size):
        name = f"{recipe.name}-{i // recipe.shard_size:06d}.tar"
        shards.append(_write(out / name, ordered[i : i + recipe.shard_size], fingerprint))
    manifest = _manifest(staged, shards, Counter(docs[i].source for i in path.duplicates))
    manifest.update(fingerprint=fingerprint, order=stats)
    shutil.copyfile(out / STAGING / VOCAB_FILE, out / VOCAB_FILE)
    write_manifest(out, manifest)
    return manifest


def _read_manifest(path: Path) -> dict:
    try:
        return read_manifest(path).as_dict()
    except ShardError:
        return {}


def _write(path: Path, docs: list[Document], fingerprint: dict) -> dict:
    """Write one ordered shard and its marker (`.stats/<shard>.json`); return its stats."""
    modality = np.concatenate([d.modality for d in docs])
    by_modality = np.bincount(modality, minlength=len(MODALITY_NAMES))
    sources: dict[str, dict] = {}
    for d in docs:
        counts = sources.setdefault(d.source, {"documents": 0, "tokens": 0, "rejected": {}})
        counts["documents"] += 1
        counts["tokens"] += len(d.tokens)
    stats = {
        "file": path.name,
        "samples": len(docs),
        "tokens": int(by_modality.sum()),
        "tokens_by_modality": dict(zip(MODALITY_NAMES, map(int, by_modality), strict=True)),
        "length_digits": length_digits([len(d.tokens) for d in docs]),
        "rejected": {},
        "removed": {},
        "sources": sources,
    }
    marker = path.parent / ".stats" / f"{path.stem}.json"
    marker.parent.mkdir(exist_ok=True)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")  # a marker is whole or absent
    tmp.write_text(json.dumps({**stats, "fingerprint": fingerprint}))
    os.replace(tmp, marker)
    write_shard(path, docs)
    return stats


def _manifest(staged: dict, shards: list[dict], duplicates: Counter) -> dict:
    """The staged manifest with the ordered shards' counts; duplicates are rejects."""
    by_modality: Counter = Counter()
    for s in shards:
        by_modality.update(s["tokens_by_modality"])
    rejected = Counter(staged["rejected"]) + Counter(duplicate=duplicates.total())
    sources = json.loads(json.dumps(staged["sources"]))
    for name, n in duplicates.items():
        source = sources.setdefault(name, {"documents": 0, "tokens": 0, "rejected": {}})
        source["documents"] -= n
        source["rejected"]["duplicate"] = source["rejected"].get("duplicate", 0) + n
    for name, source in sources.items():
        source["tokens"] = sum(s["sources"].get(name, {}).get("tokens", 0) for s in shards)
    return {
        **staged,
        "sources": sources,
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "tokens_by_modality": {m: by_modality[m] for m in MODALITY_NAMES},
        "rejected": dict(rejected),
    }
