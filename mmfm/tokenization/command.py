"""`mmfm tokenizer train | encode | decode`: build a recipe's tokenizers, and try them by hand."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from mmfm.core.errors import ConfigError, DataError, InputNotFound
from mmfm.core.types import Record, SvgRecord, TextRecord
from mmfm.tokenization.dna import dna_format, read_dna, read_function_pairs
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.visual.data import IMAGE_SUFFIXES
from mmfm.tokenization.visual.records import VIDEO_SUFFIXES, visual_records
from mmfm.tokenization.visual.train import load_visual_recipe, train_visual


def records_of(path: Path, pairs: bool = False, jsonl_field: str = "text") -> Iterator[Record]:
    """The records of a file, by its name: SVG, FASTA/FASTQ/GenBank, jsonl, an image (with its
    caption, see visual_records), a video, or plain text. A path that is no file, and a file
    the OS or its decoder refuses (not UTF-8, a broken JSON line, an unreadable picture), is a
    one-line error naming the path rather than a traceback."""
    if path.is_dir():
        raise DataError(f"{path} is a directory: name the files in it ({path}/*)")
    if not path.exists():
        raise InputNotFound(f"{path}: no such file")
    try:
        yield from _records(path, pairs, jsonl_field)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read it ({e})") from None


def _records(path: Path, pairs: bool, jsonl_field: str) -> Iterator[Record]:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        yield from visual_records(path, "image-text", str(path))
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        yield from visual_records(path, "video", str(path))
    elif path.suffix.lower() == ".svg":
        yield SvgRecord(path.stem, path.read_text(encoding="utf-8"), str(path))
    elif dna_format(path):
        yield from (read_function_pairs(path) if pairs else read_dna(path))
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    text = _field(path, i, line, jsonl_field)
                    yield TextRecord(f"{path.stem}:{i}", text, str(path))
    else:
        yield TextRecord(path.stem, path.read_text(encoding="utf-8"), str(path))


def _field(path: Path, index: int, line: str, field: str) -> str:
    row = json.loads(line)
    if not isinstance(row, dict) or not isinstance(row.get(field), str):
        raise DataError(
            f"{path} line {index + 1}: no string field {field!r} (the recipe's text.jsonl_field)"
        )
    return row[field]


def _is_visual_recipe(recipe_path: str) -> bool:
    """Whether the recipe has a top-level `kind`; a missing or unparsable file is left to
    `load_recipe`, which names it."""
    try:
        raw = OmegaConf.load(recipe_path) if Path(recipe_path).is_file() else None
    except Exception:  # yaml errors come in several types
        return False
    return isinstance(raw, DictConfig) and "kind" in raw


def train(recipe_path: str, overrides: Sequence[str]) -> None:
    """Train a tokenizer set (text/DNA/SVG + vocabulary), or one visual tokenizer: recipes
    with a top-level `kind` (tokenizers/seed_image.yaml, himtok_mask.yaml, video.yaml)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if _is_visual_recipe(recipe_path):
        metrics = train_visual(load_visual_recipe(recipe_path, overrides))
        print(json.dumps(metrics, indent=1))
        return
    recipe = load_recipe(recipe_path, overrides)
    tokenizers = Tokenizers.train(recipe)
    print(f"{recipe.output_dir}: vocabulary of {tokenizers.vocab.size} ids")
    for book in tokenizers.vocab.codebooks:
        print(f"  {book.name:6s} codes {book.offset}..{book.offset + book.size - 1}")


def encode(recipe_path: str, files: Sequence[str], show: int, pairs: bool, limit: int) -> None:
    recipe = load_recipe(recipe_path)
    tokenizers = Tokenizers.load(recipe)
    vocab = tokenizers.vocab
    for name in files:
        for n, record in enumerate(records_of(Path(name), pairs, recipe.text.jsonl_field)):
            if n >= limit:
                print(f"... (--limit {limit} records per file)")
                break
            doc = tokenizers.encode(record)
            spans = ", ".join(f"{m} {e - s}" for m, s, e in doc.segments())
            print(f"{name} [{record.key}]: {len(doc.tokens)} tokens ({spans})")
            shown = [f"{int(t)}:{vocab.piece(int(t))!r}" for t in doc.tokens[:show]]
            more = " ..." if len(doc.tokens) > show else ""
            print("  " + " ".join(shown) + more)


def decode(recipe_path: str, ids: Sequence[str], out: str = "decoded") -> None:
    """Print text and DNA spans; write SVG code (`.svg`) and pictures to `out` (PNG; a video
    as an animated GIF at 2 fps) and print their paths. A span cut before its closing id is
    decoded as far as it goes (with a warning)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tokenizers = Tokenizers.load(load_recipe(recipe_path))
    values = ids or sys.stdin.read().split()
    bad = [v for v in values if not v.isdigit()]
    if bad:
        raise ConfigError(f"mmfm tokenizer decode takes token ids (integers >= 0), not {bad[0]!r}")
    for n, (modality, content) in enumerate(tokenizers.decode(int(v) for v in values)):
        if modality == "svg":
            Path(out).mkdir(parents=True, exist_ok=True)
            target = Path(out) / f"{n}-svg.svg"
            target.write_text(content, encoding="utf-8")
            print(f"[svg]\n{target} ({len(content)} characters)")
            continue
        if isinstance(content, str):
            print(f"[{modality}]\n{content}")
            continue
        Path(out).mkdir(parents=True, exist_ok=True)
        if modality == "video":
            target = Path(out) / f"{n}-video.gif"
            first, *rest = (Image.fromarray(f) for f in content)
            first.save(target, save_all=True, append_images=rest, duration=500, loop=0)
        else:
            target = Path(out) / f"{n}-{modality}.png"
            Image.fromarray(content * 255 if modality == "mask" else content).save(target)
        print(f"[{modality}]\n{target} ({' x '.join(map(str, content.shape))})")
