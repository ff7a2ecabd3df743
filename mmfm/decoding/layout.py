"""Where each kind of token sits in a model's id space, for prompts, constraints and files.

`Layout.from_vocab` reads the unified vocabulary (`mmfm.tokenization.vocab`); `demo_layout`
describes the built-in demo corpus (`mmfm.data.demo`: its own small layout of specials,
bytes, 64 image codes and ACGT). Everything downstream (the span grammar, the decoders)
sees only this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mmfm.core.types import MODALITY_NAMES, Modality
from mmfm.data import demo
from mmfm.tokenization.text import text_of_vocab
from mmfm.tokenization.visual.framing import RowFraming
from mmfm.tokenization.vocab import DELIMITERS, Vocab, VocabError

# The modalities a prompt can ask for (`--modality`: the registered ones too) and the codebook
# of each built-in one (a registered modality's codebook has its name).
MODALITY_OF = MODALITY_NAMES
CODEBOOK_OF = {Modality.IMAGE: "image", Modality.MASK: "mask", Modality.VIDEO: "video"}
TOKENS_PER_ITEM = {"image": 32, "mask": 32, "video": 256}
"""Defaults (SEED, HiMTok, LWM); the trained visual tokenizers' own numbers win."""


@dataclass(frozen=True)
class Layout:
    size: int
    bos: int
    eos: int
    text: range
    """Ids of text pieces (bytes for the demo)."""
    delimiters: dict[Modality | int, tuple[int, int]]
    """(open, close) of each framed modality the layout has (registered ones by id)."""
    codes: dict[str, range]
    """Id range of each codebook: image, mask, video, dna."""
    specials: dict[str, int]
    """Every special token by name (`<eof>`, `<eov>`, `<sep>`, task tokens, ...)."""
    tokens_per_item: dict[str, int]
    """Ids of an image span's body (its codes, and Emu3's framing ids where `image_framing`
    is set), most codes per mask, codes per video frame."""
    encode_text: Callable[[str], list[int]] = field(repr=False)
    decode_text: Callable[[list[int]], str] = field(repr=False)
    dna_pieces: tuple[str, ...] = field(default=(), repr=False)
    """The nucleotides each DNA code stands for."""
    demo: bool = False
    image_framing: RowFraming | None = None
    """Emu3's header and row ends in image spans (then `tokens_per_item["image"]` counts
    every id of the body); None: the codes alone."""

    @classmethod
    def from_vocab(
        cls,
        vocab: Vocab,
        tokens_per_item: dict[str, int] | None = None,
        num_codes: dict[str, int] | None = None,
        image_framing: RowFraming | None = None,
    ) -> Layout:
        """The layout of `vocab`; `tokens_per_item`, `num_codes` and `image_framing` come from
        the trained visual tokenizers (a codebook range is cut to the codes its tokenizer
        has)."""

        if vocab.text_model is None:
            raise VocabError(
                "the vocabulary carries no sentencepiece model, so prompts cannot be encoded; "
                "give the vocab.json written by mmfm tokenizer train"
            )
        text = text_of_vocab(vocab)
        names = {b.name for b in vocab.codebooks}
        dna = vocab.codebook("dna") if "dna" in names else None
        return cls(
            size=vocab.size,
            bos=text.bos_id,
            eos=text.eos_id,
            text=range(vocab.text_size),
            delimiters={
                m: vocab.delimiters(m)
                for m in (*DELIMITERS, *map(MODALITY_NAMES.index, vocab.modalities))
            },
            codes={
                b.name: range(
                    b.offset, b.offset + min(b.size, (num_codes or {}).get(b.name, b.size))
                )
                for b in vocab.codebooks
            },
            specials={name: vocab.special(name) for name in vocab.specials},
            tokens_per_item={**TOKENS_PER_ITEM, **(tokens_per_item or {})},
            encode_text=text.encode,
            decode_text=text.decode,
            dna_pieces=_dna_pieces(dna.pieces) if dna else (),
            image_framing=image_framing,
        )

    def delimiter(self, modality: Modality | int) -> tuple[int, int]:
        if modality not in self.delimiters:
            have = ", ".join(MODALITY_NAMES[m] for m in self.delimiters)
            raise VocabError(
                f"this model's vocabulary has no {MODALITY_NAMES[modality]} spans ({have})"
            )
        return self.delimiters[modality]

    def prompt(self, text: str, modality: str = "text") -> list[int]:
        """`<s> text`, then the opening delimiter of `modality` (unless text)."""
        return self.ask([self.bos, *self.encode_text(text)], modality)

    def ask(self, ids: list[int], modality: str = "text") -> list[int]:
        """A prompt's `ids` followed by the opening delimiter of `modality` (unless text)."""
        if modality == "text":
            return list(ids)
        return [*ids, self.delimiter(MODALITY_NAMES.index(modality))[0]]


def visual_sizes(recipe, visual) -> tuple[dict[str, int], dict[str, int], RowFraming | None]:
    """(the ids of a span's body (a frame's, for video), num_codes, the image spans' framing)
    of the visual tokenizers a tokenizer recipe names (`visual`: its `VisualTokenizers`): the
    arguments of `Layout.from_vocab` after the vocabulary."""
    slots = {"image": recipe.image_tokenizer, "mask": recipe.mask_tokenizer}
    slots["video"] = recipe.video_tokenizer
    models = {name: visual.model(name) for name, path in slots.items() if path}
    sizes = {name: visual.span_length(name) for name in models}
    framing = visual.framing("image") if "image" in models else None
    return sizes, {name: model.num_codes for name, model in models.items()}, framing


def _dna_pieces(pieces: tuple[str, ...]) -> tuple[str, ...]:
    # sentencepiece BPE marks word starts with U+2581; DNA has no words.
    return tuple(p.replace("\u2581", "") for p in pieces)


def demo_layout() -> Layout:

    return Layout(
        size=demo.DEMO_VOCAB_SIZE,
        bos=demo.SPECIAL["<bos>"],
        eos=demo.SPECIAL["<eos>"],
        text=range(demo.TEXT_OFFSET, demo.IMAGE_OFFSET),
        delimiters={
            Modality.IMAGE: (demo.SPECIAL["<img>"], demo.SPECIAL["</img>"]),
            Modality.DNA: (demo.SPECIAL["<dna>"], demo.SPECIAL["</dna>"]),
        },
        codes={
            "image": range(demo.IMAGE_OFFSET, demo.IMAGE_OFFSET + demo.IMAGE_CODES),
            "dna": range(demo.DNA_OFFSET, demo.DEMO_VOCAB_SIZE),
        },
        specials=dict(demo.SPECIAL),
        tokens_per_item={"image": demo.IMAGE_CODES},
        encode_text=lambda s: [demo.TEXT_OFFSET + b for b in s.encode()],
        decode_text=lambda ids: bytes(i - demo.TEXT_OFFSET for i in ids).decode(errors="replace"),
        dna_pieces=tuple(demo.NUCLEOTIDES),
        demo=True,
    )
