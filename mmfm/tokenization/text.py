"""Text: a sentencepiece model (BPE or unigram) whose encode -> decode is exact.

Trained with byte fallback (any character is representable), the identity normalisation
(no NFKC, no whitespace folding) and no dummy prefix, so `decode(encode(s)) == s` for every
Unicode string. The vocabulary's special tokens are not pieces of this model: they live after
the text ids, text never turns into one by accident (frames are added by the modality
tokenizers), and the Hugging Face export can add each of them exactly once.

The text part can also be a pretrained LLM's own tokenizer (`text.pretrained` of the recipe):
a Hugging Face `tokenizer.json` (`HfTextTokenizer`, through the `tokenizers` library) or the
LLM's sentencepiece `.model` (`TextTokenizer`). Both expose the same small interface (`size`,
`encode`, `decode`, `pieces`, `proto`, `kind`, `bos_id`, `eos_id`), and documents are framed
with the tokenizer's own bos / eos ids, so continued pretraining sees what the LLM saw.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from mmfm.core.errors import TokenizerError
from mmfm.core.extras import require_extra
from mmfm.core.files import iter_files
from mmfm.tokenization.recipe import TextRecipe

# Sentences longer than this are cut (sentencepiece's limit is per "sentence").
_CHUNK = 8192
UNK, BOS, EOS, PAD = 0, 1, 2, 3
_META = "\u2581"  # sentencepiece's whitespace symbol


class TextTokenizer:
    """A sentencepiece model: mmfm's own (bos 1, eos 2) or an LLM's `.model`."""

    kind = "sentencepiece"

    def __init__(
        self,
        model: bytes | str | os.PathLike,
        bos_id: int | None = None,
        eos_id: int | None = None,
    ):
        proto = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        # The model's own ids unless the recipe names other tokens (text.bos_token).
        self.bos_id = self.sp.bos_id() if bos_id is None else bos_id
        self.eos_id = self.sp.eos_id() if eos_id is None else eos_id
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


class HfTextTokenizer:
    """A Hugging Face `tokenizer.json` (e.g. byte-level BPE) as the vocabulary's text part.

    Its ids are the text ids unchanged. Special-token names written in a document stay text
    (`encode_special_tokens`), as with mmfm's own model; decode keeps every token, so a
    byte-level BPE decodes back to the exact input."""

    kind = "hf"

    def __init__(self, model: bytes, bos_id: int, eos_id: int, source: str = "tokenizer.json"):
        Tokenizer = require_extra("tokenizers", "hf", f"{source}: reading it").Tokenizer
        self.proto, self.bos_id, self.eos_id = model, bos_id, eos_id
        try:
            self.tk = Tokenizer.from_str(model.decode("utf-8"))
        except Exception as e:  # the tokenizers library raises bare Exceptions
            raise TokenizerError(
                f"{source} is not a readable tokenizer.json ({_first_line(e)}): give the "
                "tokenizer.json of the pretrained model"
            ) from None
        self.tk.encode_special_tokens = True
        self.size = self.tk.get_vocab_size(with_added_tokens=True)
        self._pieces = [self.tk.id_to_token(i) for i in range(self.size)]
        if None in self._pieces:
            raise TokenizerError(
                f"{source}: token ids are not contiguous (no token has id "
                f"{self._pieces.index(None)}); mmfm lays its tokens out after 0..size-1"
            )

    def encode(self, text: str) -> list[int]:
        _require_utf8(text)
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def pieces(self) -> list[str]:
        return list(self._pieces)

    def token_id(self, name: str) -> int | None:
        return self.tk.token_to_id(name)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_bytes(self.proto)


AnyTextTokenizer = TextTokenizer | HfTextTokenizer

# Names pretrained tokenizers give their document start / end, tried in this order when
# neither the recipe nor a tokenizer_config.json beside the file says.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[BOS]", "<|endoftext|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]", "<|im_end|>")


def load_text_tokenizer(
    kind: str, model: bytes, bos_id: int | None = None, eos_id: int | None = None
) -> AnyTextTokenizer:
    """The text tokenizer a vocabulary carries (`Vocab.text_kind`, `text_model`)."""
    if kind == "hf":
        return HfTextTokenizer(model, bos_id, eos_id, "the vocabulary's tokenizer.json")
    return TextTokenizer(model, bos_id, eos_id)


def load_pretrained(
    path: str | os.PathLike, bos_token: str | None = None, eos_token: str | None = None
) -> AnyTextTokenizer:
    """A pretrained LLM's tokenizer: a tokenizer.json, a sentencepiece .model, or a folder
    holding one (tokenizer.json first). Documents start with `bos_token` and end with
    `eos_token`: by default the tokenizer_config.json beside the file, else the model's own
    (sentencepiece) or a common name; a tokenizer with an end token only (GPT-2's
    <|endoftext|>) starts documents with it too, as GPT-2 does."""
    file = _pretrained_file(Path(path).expanduser())
    names = _config_tokens(file.parent / "tokenizer_config.json")
    bos_token, eos_token = bos_token or names.get("bos_token"), eos_token or names.get("eos_token")
    if file.suffix == ".json":
        text = HfTextTokenizer(_read(file), -1, -1, str(file))
        lookup = text.token_id
    else:
        try:
            text = TextTokenizer(_read(file))
        except RuntimeError as e:
            raise TokenizerError(
                f"{file} is not a readable sentencepiece model ({_first_line(e)})"
            ) from None
        sp = text.sp

        def lookup(name: str) -> int | None:
            i = sp.piece_to_id(name)
            return None if i == sp.unk_id() and name != sp.id_to_piece(i) else i

    eos = _token_id(file, lookup, eos_token, _EOS_NAMES, text.eos_id, "eos")
    bos = _token_id(file, lookup, bos_token, _BOS_NAMES, text.bos_id, "bos", fallback=eos)
    text.bos_id, text.eos_id = bos, eos
    return text


def _pretrained_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return path / name
        raise TokenizerError(f"{path} holds no tokenizer.json or tokenizer.model (text.pretrained)")
    if path.suffix not in (".json", ".model"):
        raise TokenizerError(
            f"text.pretrained: {path} is neither a tokenizer.json nor a sentencepiece .model"
        )
    return path


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as e:
        raise TokenizerError(f"text.pretrained: cannot read {file} ({e.strerror})") from None


def _config_tokens(path: Path) -> dict[str, str]:
    """bos_token / eos_token of a Hugging Face tokenizer_config.json (a str or {content})."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    tokens = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key) if isinstance(config, dict) else None
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            tokens[key] = value
    return tokens


def _token_id(file, lookup, name, candidates, own, what, fallback=None) -> int:
    if name is not None:
        token = lookup(name)
        if token is None:
            raise TokenizerError(f"{file} has no token {name!r} (text.{what}_token)")
        return token
    if own is not None and own >= 0:
        return own
    for candidate in candidates:
        if (token := lookup(candidate)) is not None:
            return token
    if fallback is not None:
        return fallback
    raise TokenizerError(
        f"{file}: no {what} token found (tried {', '.join(candidates)}); name it with "
        f"text.{what}_token in the tokenizer recipe"
    )


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


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


def text_of_vocab(vocab) -> AnyTextTokenizer:
    """The text tokenizer a `Vocab` carries (it must carry one: `vocab.text_model`)."""
    return load_text_tokenizer(vocab.text_kind, vocab.text_model, vocab.text_bos, vocab.text_eos)
