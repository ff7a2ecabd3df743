"""On-the-fly tokenization: raw WebDataset samples become documents inside the loader.

A source with a tokenizer recipe (`tokenize:`) points at raw shards (`000123.txt`, `.svg`,
`.jpg` + `.json`, ...) instead of `mmfm prepare`'s token arrays. Each stream reads its units
of those shards as for prepared ones (stream.py); here a window of samples (`tokenize_batch`
of them) is decoded by the source's field mapping (`RawDecoder`, the same as `mmfm prepare`
uses) and tokenized by the recipe's `Tokenizers`, loaded once per process (every loader
worker loads its own: the models are not sent to it). The window's pictures go through each
visual tokenizer in one batched call, on `tokenize_device`. What `mmfm prepare` would reject
is skipped and counted under the stream's skip reasons, and records are shaped (condition
dropout, caption order, completion-only: tokenization/shaping.py) by the same per-record
draws, so a raw source and its prepared shards give the same documents.

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
from mmfm.core.types import (
    MODALITY_NAMES,
    Document,
    ImageMaskRecord,
    ImageRecord,
    VideoRecord,
)
from mmfm.data.raw import RawDecoder, tar_sample_sizes
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.shaping import Shaping, shape
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.visual.records import Spans

POSITIONS = 1 << 32
"""Documents one raw sample may give (see the module docstring)."""


@functools.lru_cache(maxsize=4)
def load_tokenizers(recipe: str) -> Tokenizers:
    """The trained tokenizers of a recipe, once per process."""
    return Tokenizers.load(load_recipe(recipe))


def skip_reason(reason: str) -> str:
    """The stream's skip reason for a reject reason of the decoder or the tokenizers."""
    if reason.startswith("missing_"):
        return "missing_field"
    return "empty" if reason == "empty" else "bad_sample"


Skipped = list[tuple[str, str, str]]
"""A sample's skips: (reason, key, detail) of each document it could not give."""

PICTURES = ImageRecord | ImageMaskRecord | VideoRecord
PICTURE_BYTES = 1 << 26
"""Decoded pictures a worker holds for one batched call at most (64 MiB: sixteen 512 x 512
photos take 12 MiB; a window of 4K frames is split into calls of three)."""


def _picture_bytes(record) -> int:
    if isinstance(record, VideoRecord):
        return record.frames.nbytes
    if isinstance(record, ImageMaskRecord):
        return record.image.nbytes + record.mask.nbytes
    return record.image.nbytes if isinstance(record, ImageRecord) else 0


@dataclass(frozen=True)
class RawTokenizer:
    """The documents of raw samples (picklable: it travels to the loader workers)."""

    recipe: str
    fields: RawFields
    source: str
    """Stored as each document's source (the source's name, as `mmfm prepare` stores it)."""
    seed: int = 0
    vocab_size: int = 0
    """Token ids must lie in [0, vocab_size) (0: not checked), else the sample is bad."""
    device: str = "cpu"
    """Where the visual tokenizers run."""
    max_length: int = 0
    """DNA windows of at most this many bases (0: whole sequences)."""
    shaping: Shaping | None = None
    """Condition dropout, caption order, completion-only (tokenization/shaping.py), drawn
    from (seed, source, key) as mmfm prepare draws them: the same documents."""

    def window(self, url: str, samples: Sequence[dict]) -> list[tuple[list[Document], Skipped]]:
        """Every sample's documents and skips (of shard `url`); the pictures of the samples
        are encoded in one batched call per visual tokenizer (a picture costs far less in a
        batch), in several where their decoded pixels pass `PICTURE_BYTES` (where the calls
        split follows from the samples alone, so every read of the window splits alike)."""
        tokenizers = load_tokenizers(self.recipe)
        decoder = RawDecoder(self.fields, self.source, max_length=self.max_length)
        out, chunk, held = [], [], 0
        for sample in samples:
            skips: Skipped = []
            records = decoder(url, sample, self._reject(url, sample["__key__"], skips))
            records = [shape(r, self.shaping, self.seed)[0] for r in records]
            chunk.append((sample, records, skips))
            held += sum(_picture_bytes(r) for r in records)
            if held >= PICTURE_BYTES:
                out += self._tokenize(tokenizers, url, chunk)
                chunk, held = [], 0
        return out + self._tokenize(tokenizers, url, chunk)

    def _tokenize(self, tokenizers, url, chunk) -> list[tuple[list[Document], Skipped]]:
        pictures = [r for _, records, _ in chunk for r in records if isinstance(r, PICTURES)]
        spans = self._spans(tokenizers, pictures)
        return [
            (self._documents(tokenizers, url, sample, records, spans, skips), skips)
            for sample, records, skips in chunk
        ]

    def _documents(self, tokenizers, url, sample, records, spans, skips) -> list[Document]:
        """One sample's documents; augmentation draws from an RNG of (seed, shard, key)."""
        name = f"{os.path.basename(url)}:{sample['__key__']}".encode()
        rng = np.random.default_rng([self.seed, zlib.crc32(name)])
        reject = self._reject(url, sample["__key__"], skips)
        docs = [self._document(tokenizers, r, rng, spans.get(id(r)), reject) for r in records]
        return [d for d in docs if d is not None]

    def _spans(self, tokenizers: Tokenizers, pictures: list) -> dict[int, Spans]:
        """{id(record): its picture spans}, encoded together; {} if that fails (each record
        is then encoded alone, and the one that fails is skipped alone)."""
        try:
            encoded = tokenizers.visual.encode_many(pictures, self.device)
        except Exception:  # e.g. no image_tokenizer in the recipe: each record says so alone
            return {}
        return {id(r): s for r, s in zip(pictures, encoded, strict=True)}

    @staticmethod
    def _reject(url: str, key: str, skips: Skipped) -> Callable[[str, str, str], None]:
        def reject(reason: str, where: str, detail: str) -> None:
            at = "" if where in (key, f"{url}:{key}") else f"{where}: "  # the log names both
            skips.append((skip_reason(reason), key, f"{reason}: {at}{detail}"))

        return reject

    def _document(self, tokenizers, record, rng, spans, reject) -> Document | None:
        try:
            if spans is None and isinstance(record, PICTURES):  # the window's call failed
                spans = tokenizers.visual.encode_many([record], self.device)[0]
            doc = tokenizers.encode(record, rng, spans)
        except Exception as e:  # one record never stops the stream (as in mmfm prepare)
            reject("tokenizer_error", record.key, f"{type(e).__name__}: {e}")
            return None
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
            return doc
        return None


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
