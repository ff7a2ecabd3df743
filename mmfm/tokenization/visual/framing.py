"""Emu3's framing of an image span: the grid size in a header, an end-of-line after each row.

transformers' Emu3 processor writes an image as `<|image start|> H*W <|image token|>`, then H
rows of W codes each closed by `<|extra_200|>` (end of line), then `<|extra_201|>` (end of
frame) and `<|image end|>` (`Emu3Processor.replace_image_token`, `convert_img2bpe`). mmfm's
span is the same with its own tokens:

    <img> H*W <grid> c_1,1 ... c_1,W <eol> ... c_H,1 ... c_H,W <eol> <eof> </img>

where `H*W` is the text tokenizer's ids of that text. The body (between the delimiters) has a
fixed length, and every position but the codes holds one fixed id: `expected()` lists them,
for the span grammar of `mmfm generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmfm.tokenization.text import text_of_vocab
from mmfm.tokenization.vocab import Vocab, VocabError

EMU3_SPECIALS = ("<grid>", "<eol>")
"""The specials emu3 framing adds to the vocabulary: the header's end, a row's end."""


@dataclass(frozen=True)
class RowFraming:
    header: tuple[int, ...]
    """The ids of the text `H*W`, then <grid>."""
    rows: int
    width: int
    eol: int
    end: int
    """<eof>, after the last row."""

    @classmethod
    def of(cls, vocab: Vocab, rows: int, width: int) -> RowFraming:
        missing = [s for s in (*EMU3_SPECIALS, "<eof>") if s not in vocab.specials]
        if missing or vocab.text_model is None:
            what = f"no {', '.join(missing)}" if missing else "no text model"
            raise VocabError(
                f"emu3 framing needs the grid size as text and {', '.join(EMU3_SPECIALS)}; the "
                f"vocabulary has {what}: run mmfm tokenizer train with this recipe"
            )
        size = text_of_vocab(vocab).encode(f"{rows}*{width}")
        header = (*size, vocab.special("<grid>"))
        return cls(header, rows, width, vocab.special("<eol>"), vocab.special("<eof>"))

    @property
    def length(self) -> int:
        """Ids of a span's body."""
        return len(self.header) + self.rows * (self.width + 1) + 1

    def expected(self) -> list[int | None]:
        """The id each position of the body must hold, None where a code goes."""
        row = [None] * self.width + [self.eol]
        return [*self.header, *row * self.rows, self.end]

    def frame(self, codes: Sequence[int]) -> list[int]:
        """The body of the codes' ids (row-major, rows x width)."""
        assert len(codes) == self.rows * self.width
        body = list(self.header)
        for r in range(self.rows):
            body += [*codes[r * self.width : (r + 1) * self.width], self.eol]
        return [*body, self.end]

    def strip(self, body: Sequence[int]) -> list[int]:
        """The codes' ids of a body; a body of another length or layout is refused."""
        if len(body) != self.length:
            raise VocabError(
                f"an emu3-framed image span of {len(body)} ids; {self.rows}x{self.width} codes "
                f"with their header and row ends take {self.length}"
            )
        for i, (got, want) in enumerate(zip(body, self.expected(), strict=True)):
            if want is not None and got != want:
                raise VocabError(
                    f"an emu3-framed image span holds id {got} at {i}, where its framing has {want}"
                )
        return [got for got, want in zip(body, self.expected(), strict=True) if want is None]
