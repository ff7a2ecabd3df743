"""`format: megatron`: the prepared documents as a Megatron-LM indexed dataset as well.

Once every shard is written, their documents, in shard order, go through megatron-core's own
`IndexedDatasetBuilder` into `<output>/<name>.bin` / `.idx` (one sequence per document, so
Megatron-LM's `GPTDataset` never separates a document's parts; ids as uint16 when the
vocabulary fits, int32 otherwise, as `tools/preprocess_data.py` chooses), and each document's
modality spans and no-loss spans into the sidecar `<name>.spans.bin` / `.idx` (one int32 item
per document, mmfm/data/megatron.py), next to `vocab.json`: Megatron-LM trains on the ids,
and mmfm reads the dataset back with its modalities (`data.sources[].kind: megatron`). The
files are written under temporary names and renamed when complete. The shards stay: they are
what a rerun resumes from, and the format is no part of their fingerprint, so `format: megatron`
on an output prepared as shards writes the indexed dataset from them, tokenizing nothing.
With `order: related` the order is one of documents only, so the indexed dataset is written
from the ordered shards, in their order, once they are written (`with_related_order`). mmfm
keeps that order with `ordered: true` on the source; megatron-core 0.16's `GPTDataset` always
shuffles documents and samples by its seed, so in Megatron-LM the neighbours are not kept
together.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmfm.data.manifest import write_manifest
from mmfm.data.megatron import SPANS, megatron_indexed, spans_item
from mmfm.data.shards import read_shard
from mmfm.prepare.recipe import PrepareRecipe
from mmfm.tokenization.vocab import VOCAB_FILE, Vocab

PARTS = (SPANS + ".bin", SPANS + ".idx", ".bin", ".idx")
"""Renamed in this order: the data's `.idx` last, so a prefix is whole once it is there."""


def write_megatron(out: Path, name: str, shards: Sequence[str], vocab_size: int) -> dict:
    """Write `<out>/<name>` (see the module docstring); what the manifest records of it."""
    module = megatron_indexed()
    dtype = module.DType.optimal_dtype(vocab_size)
    tmp = str(out / f".{name}.{os.getpid()}.tmp")
    tokens = module.IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    spans = module.IndexedDatasetBuilder(tmp + SPANS + ".bin", dtype=np.int32)
    documents = total = 0
    for shard in shards:
        for doc in read_shard(shard):
            tokens.add_document(doc.tokens, [len(doc.tokens)])
            item = spans_item(doc)
            spans.add_document(item, [len(item)])
            documents, total = documents + 1, total + len(doc.tokens)
    tokens.finalize(tmp + ".idx")
    spans.finalize(tmp + SPANS + ".idx")
    for part in PARTS:
        os.replace(tmp + part, str(out / name) + part)
    return {"prefix": name, "documents": documents, "tokens": total, "dtype": dtype.__name__}


def with_related_order(recipe: PrepareRecipe, manifest: dict) -> dict:
    """`format: megatron` of an `order: related` output: the ordered shards, in their order,
    as the indexed dataset (each document once, as the shards hold it), recorded in the
    manifest; a rerun that finds it recorded does nothing."""
    if recipe.format != "megatron" or "megatron" in manifest:
        return manifest
    out = Path(recipe.output)
    shards = [str(out / s["file"]) for s in manifest["shards"]]
    vocab_size = Vocab.load(out / VOCAB_FILE).size
    manifest["megatron"] = write_megatron(out, recipe.name, shards, vocab_size)
    write_manifest(out, manifest)
    return manifest
