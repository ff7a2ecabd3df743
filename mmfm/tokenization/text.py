"""Text: a sentencepiece model (BPE or unigram) whose encode -> decode is exact.

Trained with byte fallback (any character is representable), the identity normalisation
(no NFKC, no whitespace folding) and no dummy prefix, so `decode(encode(s)) == s` for every
Unicode string. The vocabulary's special tokens are not pieces of this model: they live after
the text ids, text never turns into one by accident (frames are added by the modality
tokenizers), and the Hugging Face export can add each of them exactly once.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from mmfm.core.files import iter_files
from mmfm.tokenization.recipe import TextRecipe

# Sentences longer than this are cut (sentencepiece's limit is per "sentence").
_CHUNK = 8192
UNK, BOS, EOS, PAD = 0, 1, 2, 3
_META = "\u2581"  # sentencepiece's whitespace symbol


class TextTokenizer:
    def __init__(self, model: bytes | str | os.PathLike):
        proto = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        # sentencepiece reads U+2581 in the input as its own space symbol; a literal one is
        # written as its three UTF-8 byte pieces instead, which decode back to itself.
        self._meta_bytes = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode()]

    @property
    def size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        try:
            if _META not in text:
                return self.sp.encode(text)
            ids: list[int] = []
            for i, part in enumerate(text.split(_META)):
                if i:
                    ids += self._meta_bytes
                ids += self.sp.encode(part)
            return ids
        except RuntimeError:  # sentencepiece's message for a str without UTF-8 says nothing
            _require_utf8(text)
            raise

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def pieces(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(self.size)]

    @classmethod
    def train(cls, texts: Iterable[str], recipe: TextRecipe) -> TextTokenizer:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=_chunks(texts),
            model_writer=model,
            vocab_size=recipe.vocab_size,
            model_type=recipe.model_type,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=list(recipe.user_symbols),
            unk_id=UNK,
            bos_id=BOS,
            eos_id=EOS,
            pad_id=PAD,
            max_sentence_length=_CHUNK * 4,
            hard_vocab_limit=False,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        return cls(model.getvalue())

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_bytes(self.proto)


def _require_utf8(text: str) -> None:
    """Raise ValueError, naming the place, if `text` has no UTF-8 form (a lone surrogate,
    e.g. from the JSON escape "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"lone surrogate {text[e.start]!r} at character {e.start}") from None


def _chunks(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for start in range(0, len(text), _CHUNK):
            yield text[start : start + _CHUNK]


def iter_corpus(
    sources: Iterable[str], jsonl_field: str, max_bytes: int, cache_dir: str
) -> Iterator[str]:
    """Texts of a corpus spec (see TextRecipe.corpus): each source contributes at most an
    equal share of `max_bytes`, so prose, code and SVG all reach the model."""
    sources = list(sources)
    share = max_bytes // len(sources)
    for source in sources:
        read = 0
        for path in iter_files([source], cache_dir):
            for text in _file_texts(path, jsonl_field):
                yield text
                read += len(text.encode())
                if read >= share:
                    break
            if read >= share:
                break


def _file_texts(path: Path, jsonl_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line).get(jsonl_field)
                    if isinstance(value, str):
                        _require_utf8(value)
                        yield value
                except (ValueError, AttributeError, RecursionError) as e:
                    print(f"text corpus: skipping {path}:{i + 1} ({e})", file=sys.stderr)
        return
    try:
        yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        print(f"text corpus: skipping {path} (not UTF-8)", file=sys.stderr)
