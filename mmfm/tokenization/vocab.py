"""The unified vocabulary: one id space for every modality.

Layout, in this order:

1. the text tokenizer's ids `[0, text_size)` (sentencepiece pieces, or a pretrained LLM's
   Hugging Face tokenizer.json unchanged; bytes for the demo);
2. the special and delimiter tokens (`<img>`, `</img>`, `<mask>`, ..., `<sep>`, task tokens);
3. one contiguous range per discrete codebook: image (8192, SEED), mask (1024, HiMTok),
   video (8192, LWM), then DNA (its size depends on the scheme). Image, mask and video are
   reserved before DNA, so their tokenizers plug in later without renumbering; then the
   codebook of each registered modality the tokenizer recipe lists (`modalities`), whose
   delimiters follow the task tokens among the specials (`registered_layout`).

Every id maps back to (kind, local code), where kind is "text", "special" or a codebook
name. The layout is saved as JSON next to every checkpoint and prepared dataset, with its
fingerprint: a hash of the layout (the text tokenizer's kind, size and model, the specials,
the codebooks) that is the same for the same layout in every process and on every machine,
so shards or a checkpoint made with another vocabulary are refused instead of trained on.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from mmfm.core.errors import TokenizerError
from mmfm.core.modalities import MODALITY_NAMES, modality_spec
from mmfm.core.types import Modality

VOCAB_FILE = "vocab.json"

# Delimiters of each modality's spans, then the other fixed specials.
DELIMITERS: dict[Modality, tuple[str, str]] = {
    Modality.IMAGE: ("<img>", "</img>"),
    Modality.MASK: ("<mask>", "</mask>"),
    Modality.DNA: ("<dna>", "</dna>"),
    Modality.SVG: ("<svg>", "</svg>"),
    Modality.VIDEO: ("<vision>", "</vision>"),
}
FIXED_SPECIALS = (
    *(name for pair in DELIMITERS.values() for name in pair),
    "<eof>",  # end of a video frame (LWM)
    "<eov>",  # end of the last frame (LWM)
    "<sep>",  # between a task's input and its output (Omni-DNA)
    "<dna_soft>",  # soft-masked (lower-case) DNA run starts
    "</dna_soft>",
)
RESERVED_CODEBOOKS = (("image", 8192), ("mask", 1024), ("video", 8192))
BUILTIN_CODEBOOKS = ("image", "mask", "video", "dna")
CODEBOOK_PREFIX = {"image": "img", "mask": "mask", "video": "vid", "dna": "dna"}


class VocabError(TokenizerError):
    """A vocabulary file or id is invalid; the message says which."""


def registered_layout(names: Sequence[str]) -> tuple[list[str], list[tuple]]:
    """(specials, codebooks) of the registered modalities `names`, for `Vocab.build`."""
    specs = [_registered_spec(name, "tokenizer recipe modalities") for name in names]
    return (
        [d for spec in specs for d in spec.delimiters],
        [(spec.name, spec.size, spec.pieces) for spec in specs],
    )


def _registered_spec(name: str, where: str):
    spec = modality_spec(name)
    if spec is None:
        raise VocabError(
            f"{where} name modality {name!r}, which is not registered in this process: import "
            "the module that registers it (register_modality) or install its mmfm.modalities "
            "entry point"
        )
    return spec


@dataclass(frozen=True)
class Codebook:
    name: str
    offset: int
    size: int
    pieces: tuple[str, ...] = ()
    """Readable names of the codes (e.g. DNA k-mers); empty: numbered names."""
    source: str = ""
    """The tokenizer whose codes these are, where the vocabulary depends on it (a published
    visual tokenizer: class, resolution, config and weights digests); in the fingerprint."""
    where: str = ""
    """Where that tokenizer was read from (a published one's recipe mapping as JSON: library,
    class, path, prefix, ...), so that a checkpoint or an HF export says how to load it; not
    in the fingerprint (the same tensors elsewhere are the same tokenizer)."""

    def piece(self, code: int) -> str:
        if self.pieces:
            return f"<{CODEBOOK_PREFIX.get(self.name, self.name)}_{self.pieces[code]}>"
        width = len(str(self.size - 1))
        return f"<{CODEBOOK_PREFIX.get(self.name, self.name)}_{code:0{width}d}>"


@dataclass(frozen=True)
class Vocab:
    text_size: int
    specials: tuple[str, ...]
    codebooks: tuple[Codebook, ...]
    text_kind: str = "sentencepiece"
    """sentencepiece, hf (a Hugging Face tokenizer.json), imported (an LLM's embedding rows
    with no tokenizer) or bytes (the demo: one id per byte)."""
    text_pieces: tuple[str, ...] = field(default=(), repr=False)
    """Readable text pieces, for display and export."""
    text_model: bytes | None = field(default=None, repr=False)
    """The sentencepiece model (or tokenizer.json) itself, so that a checkpoint alone can be
    exported with its tokenizer (mmfm convert hf)."""
    text_bos: int | None = None
    """Id that starts a document when it is not the text model's own (a pretrained
    tokenizer.json has none); None: the model's."""
    text_eos: int | None = None
    """Id that ends a document, like text_bos."""

    @classmethod
    def build(
        cls,
        text_size: int,
        extra_specials: Sequence[str] = (),
        codebooks: Sequence[tuple] = (),
        text_kind: str = "sentencepiece",
        text_pieces: Sequence[str] = (),
        text_model: bytes | None = None,
        text_bos: int | None = None,
        text_eos: int | None = None,
    ) -> Vocab:
        specials = (*FIXED_SPECIALS, *extra_specials)
        if len(set(specials)) != len(specials):
            raise VocabError(f"duplicate special tokens in {specials}")
        offset, books = text_size + len(specials), []
        for entry in codebooks:
            name, size = entry[0], entry[1]
            pieces = tuple(entry[2]) if len(entry) > 2 else ()
            source = entry[3] if len(entry) > 3 else ""
            where = entry[4] if len(entry) > 4 else ""
            if pieces and len(pieces) != size:
                raise VocabError(f"codebook {name}: {len(pieces)} pieces for {size} codes")
            books.append(Codebook(name, offset, size, pieces, source, where))
            offset += size
        return cls(
            text_size,
            specials,
            tuple(books),
            text_kind,
            tuple(text_pieces),
            text_model,
            text_bos,
            text_eos,
        )

    @property
    def size(self) -> int:
        last = self.codebooks[-1] if self.codebooks else None
        return last.offset + last.size if last else self.text_size + len(self.specials)

    def id_ranges(self) -> list[str]:
        """Its id ranges as `first_id:kind` (text, special, then each codebook's modality):
        what `model.mot.ranges` routes tokens by."""
        books = [f"{b.offset}:{b.name}" for b in self.codebooks]
        return ["0:text", f"{self.text_size}:special", *books]

    def special(self, name: str) -> int:
        try:
            return self.text_size + self.specials.index(name)
        except ValueError:
            raise VocabError(f"no special token {name!r}; have {self.specials}") from None

    def delimiters(self, modality: Modality | int) -> tuple[int, int]:
        """(open, close) ids of a built-in modality or of a registered one (by id)."""
        if modality in DELIMITERS:
            start, end = DELIMITERS[modality]
        else:
            start, end = _registered_spec(MODALITY_NAMES[modality], "ids").delimiters
        return self.special(start), self.special(end)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The registered modalities this vocabulary lays out (their codebooks' names)."""
        return tuple(b.name for b in self.codebooks if b.name not in BUILTIN_CODEBOOKS)

    def codebook(self, name: str) -> Codebook:
        for book in self.codebooks:
            if book.name == name:
                return book
        raise VocabError(f"no codebook {name!r}; have {[b.name for b in self.codebooks]}")

    def code_id(self, name: str, code: int) -> int:
        book = self.codebook(name)
        if not 0 <= code < book.size:
            raise VocabError(f"code {code} outside codebook {name} of {book.size}")
        return book.offset + code

    def lookup(self, token_id: int) -> tuple[str, int]:
        """(kind, local code) of `token_id`: kind is text, special or a codebook name."""
        if 0 <= token_id < self.text_size:
            return "text", token_id
        if token_id < self.text_size + len(self.specials):
            return "special", token_id - self.text_size
        for book in self.codebooks:
            if book.offset <= token_id < book.offset + book.size:
                return book.name, token_id - book.offset
        raise VocabError(f"token id {token_id} is outside the vocabulary of {self.size}")

    def piece(self, token_id: int) -> str:
        """A readable name: the text piece, the special, or e.g. `<img_00042>`, `<dna_ACG>`."""
        kind, code = self.lookup(token_id)
        if kind == "text":
            return self.text_pieces[code] if self.text_pieces else f"<text_{code}>"
        if kind == "special":
            return self.specials[code]
        return self.codebook(kind).piece(code)

    @cached_property
    def fingerprint(self) -> str:
        """16 hex digits of a SHA-256 of the layout: two vocabularies share it exactly when
        every id means the same token (same text model, specials and codebook ranges)."""
        if self.text_model is not None:
            text = hashlib.sha256(self.text_model).hexdigest()
        else:  # no model (imported, bytes): the pieces, if any, name the text ids
            text = hashlib.sha256(json.dumps(self.text_pieces).encode()).hexdigest()
        layout = {
            "text": [self.text_kind, self.text_size, text],
            "specials": self.specials,
            "codebooks": [
                [b.name, b.offset, b.size, b.pieces, *([b.source] if b.source else [])]
                for b in self.codebooks
            ],
        }
        if (self.text_bos, self.text_eos) != (None, None):  # absent: same hash as before
            layout["frame"] = [self.text_bos, self.text_eos]
        blob = json.dumps(layout, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # -- JSON -----------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "format": "mmfm-vocab/1",
            "size": self.size,
            "fingerprint": self.fingerprint,
            "text": {
                "kind": self.text_kind,
                "size": self.text_size,
                "pieces": self.text_pieces,
                "model_base64": base64.b64encode(self.text_model).decode()
                if self.text_model
                else None,
                **({"bos": self.text_bos} if self.text_bos is not None else {}),
                **({"eos": self.text_eos} if self.text_eos is not None else {}),
            },
            "specials": list(self.specials),
            "codebooks": [
                {
                    "name": b.name,
                    "offset": b.offset,
                    "size": b.size,
                    "pieces": list(b.pieces),
                    **({"source": b.source} if b.source else {}),
                    **({"tokenizer": json.loads(b.where)} if b.where else {}),
                }
                for b in self.codebooks
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> Vocab:
        if data.get("format") != "mmfm-vocab/1":
            raise VocabError(f"not an mmfm vocabulary (format {data.get('format')!r})")
        text = data["text"]
        vocab = cls(
            text["size"],
            tuple(data["specials"]),
            tuple(
                Codebook(
                    b["name"],
                    b["offset"],
                    b["size"],
                    tuple(b["pieces"]),
                    b.get("source", ""),
                    json.dumps(b["tokenizer"], sort_keys=True) if "tokenizer" in b else "",
                )
                for b in data["codebooks"]
            ),
            text["kind"],
            tuple(text["pieces"]),
            base64.b64decode(text["model_base64"]) if text.get("model_base64") else None,
            text.get("bos"),
            text.get("eos"),
        )
        _check_registered(vocab)
        if vocab.size != data["size"]:
            raise VocabError(f"vocabulary declares size {data['size']}, its layout {vocab.size}")
        declared = data.get("fingerprint", vocab.fingerprint)  # absent in older files
        if declared != vocab.fingerprint:
            raise VocabError(
                f"vocabulary declares fingerprint {declared}, its layout has {vocab.fingerprint}:"
                " the file was edited; write it again with mmfm tokenizer train"
            )
        return vocab

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text()))
        except VocabError as e:
            raise VocabError(f"{path}: {e}") from None
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise VocabError(f"{path}: cannot read the vocabulary: {e}") from e


def _check_registered(vocab: Vocab) -> None:
    """Refuse a vocabulary whose registered modalities this process lacks, or has with
    another codebook or delimiters: its ids would mean other tokens."""
    for name in vocab.modalities:
        spec = _registered_spec(name, "the vocabulary's codebooks")
        book = vocab.codebook(name)
        if (book.size, book.pieces) != (spec.size, spec.pieces) or not set(spec.delimiters) <= set(
            vocab.specials
        ):
            raise VocabError(
                f"the vocabulary's {name} codebook ({book.size} codes) or delimiters differ "
                f"from the registered {name} modality's ({spec.size}): retrain the tokenizers "
                "with this registration"
            )
