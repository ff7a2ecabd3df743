"""On-the-fly tokenization: raw WebDataset samples become documents inside the loader.

A source with a tokenizer recipe (`tokenize:`) points at raw shards (`000123.txt`, `.svg`,
`.jpg` + `.json`, ...) instead of `mmfm prepare`'s token arrays. Each stream reads its units
of those shards as for prepared ones (stream.py); here one sample is decoded by the source's
field mapping (`RawDecoder`, the same as `mmfm prepare` uses) and tokenized by the recipe's
`Tokenizers`, loaded once per process (every loader worker loads its own: the models are
not sent to it). What `mmfm prepare` would reject is skipped and counted here under the
stream's skip reasons, so a raw source and its prepared shards give the same documents.

A sample may give several documents (a FASTA member: one per sequence), so a document's
position in its unit (what the reader's cursor and the buffers' references hold) is
`sample * POSITIONS + its index among the sample's documents`. Augmentation (DNA reverse
complement) draws from an RNG of (seed, shard name, sample key): the same document every
time it is read, whichever stream or worker reads it, and again on resume.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mmfm.config.schema import RawFields
from mmfm.core.types import MODALITY_NAMES, Document
from mmfm.data.raw import RawDecoder, tar_sample_sizes
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.tokenizers import Tokenizers

POSITIONS = 1 << 32
"""Documents one raw sample may give (see the module docstring)."""

Skip = Callable[[str, str, str], None]
"""`skip(reason, key, detail)`, reason one of stream.SKIP_REASONS."""


@functools.lru_cache(maxsize=4)
def load_tokenizers(recipe: str) -> Tokenizers:
    """The trained tokenizers of a recipe, once per process."""
    return Tokenizers.load(load_recipe(recipe))


def skip_reason(reason: str) -> str:
    """The stream's skip reason for a reject reason of the decoder or the tokenizers."""
    if reason.startswith("missing_"):
        return "missing_field"
    return "empty" if reason == "empty" else "bad_sample"


@dataclass(frozen=True)
class RawTokenizer:
    """The documents of one raw sample (picklable: it travels to the loader workers)."""

    recipe: str
    fields: RawFields
    source: str
    """Stored as each document's source (the source's name, as `mmfm prepare` stores it)."""
    seed: int = 0
    vocab_size: int = 0
    """Token ids must lie in [0, vocab_size) (0: not checked), else the sample is bad."""

    def documents(self, url: str, sample: dict, skip: Skip) -> list[Document]:
        """Every document of `sample` (of shard `url`); what cannot be one is skipped."""
        tokenizers = load_tokenizers(self.recipe)

        key = sample["__key__"]

        def reject(reason: str, where: str, detail: str) -> None:
            at = "" if where in (key, f"{url}:{key}") else f"{where}: "  # the log names both
            skip(skip_reason(reason), key, f"{reason}: {at}{detail}")

        records = RawDecoder(self.fields, self.source)(url, sample, reject)
        name = f"{os.path.basename(url)}:{key}".encode()
        rng = np.random.default_rng([self.seed, zlib.crc32(name)])
        docs = []
        for record in records:
            try:
                doc = tokenizers.encode(record, rng)
            except Exception as e:  # one record never stops the stream (as in mmfm prepare)
                reject("tokenizer_error", record.key, f"{type(e).__name__}: {e}")
                continue
            if is_empty(doc):
                reject("empty", record.key, "no content between the frames")
            elif self.vocab_size and int(doc.tokens.max()) >= self.vocab_size:
                reject(
                    "bad_token",
                    record.key,
                    f"token id {int(doc.tokens.max())} >= model.vocab_size={self.vocab_size}: "
                    f"the tokenizers of {self.recipe} need a larger model.vocab_size",
                )
            else:
                docs.append(doc)
        return docs


def is_empty(doc: Document) -> bool:
    """<s> </s> alone, or a framed span with nothing between its delimiters (what `mmfm
    prepare` rejects as empty)."""
    if len(doc.tokens) <= 2:
        return True
    counts = np.bincount(doc.modality, minlength=len(MODALITY_NAMES))
    return bool((counts[1:] == 2).any())  # delimiters belong to their span; 0 is text


@functools.lru_cache(maxsize=4096)
def raw_sample_bytes(path: str, size: int, mtime_ns: int, members: tuple[str, ...]) -> np.ndarray:
    """Bytes of the `members` of every sample of a local raw tar, from its headers alone,
    grouped into samples as the tar reader groups them: the deal's size of a raw shard
    (tokens are unknown before tokenizing; bytes of text, SVG or JPEG follow them roughly).
    A tar that cannot be walked gives what precedes the damage."""
    sizes, _ = tar_sample_sizes(path, set(members))
    return np.asarray(sizes, dtype=np.float64)


def raw_sizes(urls: Sequence[str], members: tuple[str, ...]) -> list[np.ndarray] | None:
    """`raw_sample_bytes` of every shard, or None unless all are local files."""
    if not all(os.path.isfile(u) for u in urls):
        return None
    return [raw_sample_bytes(u, os.stat(u).st_size, os.stat(u).st_mtime_ns, members) for u in urls]
