"""The built-in demo corpus (`builtin:demo`): three modalities with learnable structure.

Generated from a seed (nothing downloaded), written as ordinary shards and then read through
the same shard reader as real data. `builtin:demo:held_out` is one more shard of the same
generator drawn with another seed, for validation: none of its documents is a training
document (tested). Until the unified vocabulary lands, it uses its own small
layout (`DEMO_VOCAB`): bytes for text, 64 image codes, 4 nucleotides.

- text: sentences from a small grammar;
- image + caption: "a red cross on a blue background" then 8x8 = 64 codes of that picture;
- DNA task (Omni-DNA style): a sequence, a separator, then whether a TATA box is in it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mmfm.core.types import Document, Modality
from mmfm.data.shards import write_shard

SPECIALS = ("<pad>", "<bos>", "<eos>", "<img>", "</img>", "<dna>", "</dna>", "<sep>")
TEXT_OFFSET = len(SPECIALS)
IMAGE_OFFSET = TEXT_OFFSET + 256
IMAGE_CODES = 64
DNA_OFFSET = IMAGE_OFFSET + IMAGE_CODES
NUCLEOTIDES = "ACGT"
DEMO_VOCAB_SIZE = DNA_OFFSET + len(NUCLEOTIDES)
SPECIAL = {name: i for i, name in enumerate(SPECIALS)}

DEMO_RANGES = ["0:special", f"{TEXT_OFFSET}:text", f"{IMAGE_OFFSET}:image", f"{DNA_OFFSET}:dna"]
"""The layout's id ranges as `model.mot.ranges` routes tokens by."""

VERSION = 2
NUM_SHARDS = 4
DOCS_PER_SHARD = 600
HELD_OUT_SEED = 1
HELD_OUT_SHARDS = 1

COLORS = ("black", "white", "red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("square", "cross", "stripe", "dot")
NOUNS = ("model", "token", "image", "sequence", "gradient", "shard", "layer", "cell")
ADJECTIVES = ("small", "quiet", "bright", "packed", "long", "early", "noisy", "exact")
VERBS = ("reads", "packs", "predicts", "follows", "encodes", "streams", "learns", "writes")


def _text(s: str) -> list[int]:
    return [TEXT_OFFSET + b for b in s.encode()]


class _DocBuilder:
    def __init__(self):
        self.tokens: list[int] = []
        self.modality: list[int] = []

    def add(self, ids: list[int], modality: Modality) -> None:
        self.tokens += ids
        self.modality += [modality] * len(ids)

    def build(self, key: str) -> Document:
        return Document(
            np.array(self.tokens, dtype=np.int32),
            np.array(self.modality, dtype=np.uint8),
            key,
            "builtin:demo",
        )


def _sentence(rng: np.random.Generator) -> str:
    a, b = rng.choice(ADJECTIVES, 2)
    n, m = rng.choice(NOUNS, 2)
    return f"the {a} {n} {rng.choice(VERBS)} the {b} {m}."


def _text_doc(rng: np.random.Generator, key: str) -> Document:
    doc = _DocBuilder()
    body = " ".join(_sentence(rng) for _ in range(rng.integers(1, 8)))
    doc.add([SPECIAL["<bos>"], *_text(body), SPECIAL["<eos>"]], Modality.TEXT)
    return doc.build(key)


def _picture(rng: np.random.Generator) -> tuple[str, np.ndarray]:
    fg, bg = rng.choice(len(COLORS), 2, replace=False)
    shape = rng.integers(len(SHAPES))
    grid = np.full((8, 8), bg)
    r, c = rng.integers(1, 7, 2)
    if SHAPES[shape] == "square":
        grid[r - 1 : r + 1, c - 1 : c + 1] = fg
    elif SHAPES[shape] == "cross":
        grid[r, :], grid[:, c] = fg, fg
    elif SHAPES[shape] == "stripe":
        grid[r, :] = fg
    else:
        grid[r, c] = fg
    # A code is (colour, shade): the shade is noise the model cannot predict.
    codes = grid * 8 + rng.integers(0, 2, grid.shape)
    caption = f"a {COLORS[fg]} {SHAPES[shape]} on a {COLORS[bg]} background"
    return caption, codes.flatten()


def _image_doc(rng: np.random.Generator, key: str) -> Document:
    caption, codes = _picture(rng)
    doc = _DocBuilder()
    doc.add([SPECIAL["<bos>"], *_text(caption)], Modality.TEXT)
    image = [SPECIAL["<img>"], *(IMAGE_OFFSET + codes).tolist(), SPECIAL["</img>"]]
    doc.add(image, Modality.IMAGE)
    doc.add([SPECIAL["<eos>"]], Modality.TEXT)
    return doc.build(key)


def _dna_doc(rng: np.random.Generator, key: str) -> Document:
    length = int(rng.integers(48, 200))
    # GC-rich background so that the AT-rich TATA box stands out.
    seq = rng.choice(list(NUCLEOTIDES), length, p=[0.2, 0.3, 0.3, 0.2])
    has_box = bool(rng.integers(2))
    if has_box:
        at = int(rng.integers(0, length - 6))
        seq[at : at + 6] = list("TATAAA")
    has_box = "TATAAA" in "".join(seq)
    doc = _DocBuilder()
    doc.add([SPECIAL["<bos>"]], Modality.TEXT)
    dna = [SPECIAL["<dna>"], *(DNA_OFFSET + NUCLEOTIDES.index(b) for b in seq), SPECIAL["</dna>"]]
    doc.add(dna, Modality.DNA)
    answer = "TATA box: yes" if has_box else "TATA box: no"
    doc.add([SPECIAL["<sep>"], *_text(answer), SPECIAL["<eos>"]], Modality.TEXT)
    return doc.build(key)


def demo_documents(shard: int, seed: int = 0, split: str = "") -> list[Document]:
    rng = np.random.default_rng([seed, shard])
    makers = (_text_doc, _image_doc, _dna_doc)
    prefix = f"demo-{split}-" if split else "demo-"
    return [
        makers[rng.integers(len(makers))](rng, f"{prefix}{shard:06d}-{i:06d}")
        for i in range(DOCS_PER_SHARD)
    ]


def _ensure(root: Path, stem: str, shards: int, seed: int, split: str = "") -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        path = root / f"{stem}-{shard:06d}.tar"
        if not path.exists():
            write_shard(path, demo_documents(shard, seed, split))
        paths.append(str(path))
    return paths


def ensure_demo_shards(cache_dir: str | os.PathLike) -> list[str]:
    """Generate the demo's training shards under `cache_dir` once; return their paths."""
    return _ensure(Path(cache_dir).expanduser() / f"demo-v{VERSION}", "demo", NUM_SHARDS, 0)


def ensure_demo_held_out(cache_dir: str | os.PathLike) -> list[str]:
    """Generate the demo's held-out shard (`builtin:demo:held_out`) once; return its path."""
    root = Path(cache_dir).expanduser() / f"demo-v{VERSION}" / "held_out"
    return _ensure(root, "demo-held_out", HELD_OUT_SHARDS, HELD_OUT_SEED, "held_out")
