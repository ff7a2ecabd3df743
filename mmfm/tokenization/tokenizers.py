"""The tokenizer set of a recipe: one call from a raw record to a framed token document.

`Tokenizers.train(recipe)` trains the text model (or imports a pretrained LLM's tokenizer,
`text.pretrained`) and the DNA BPE model, lays out the unified vocabulary and writes
everything to `recipe.output_dir`; `Tokenizers.load(recipe)`
reads it back. `encode(record)` is the interface `mmfm prepare` calls for every modality:

    TextRecord       ->  <s> text </s>
    DnaRecord        ->  <s> <dna> dna </dna> [<sep> output text] </s>
    SvgRecord        ->  <s> [text] <svg> svg code </svg> </s>
    ImageRecord      ->  <s> [text] <img> 32 image codes </img> </s>
    ImageMaskRecord  ->  <s> [text] <img> image codes </img> <mask> mask codes </mask> </s>
    VideoRecord      ->  <s> [text] <vision> f1 <eof> f2 ... <eof> fn <eov> </vision> </s>
    TaskRecord       ->  <s> prompt [<sep>] response </s>, <s> and the prompt never targets
    ModalityRecord   ->  <s> [text] <open> codes <close> </s>, a registered modality's span

A picture record with `order: image_first` puts its caption after the image (or clip):
`<s> <img> ... </img> caption </s>`; a mask always comes last.

`<s>` and `</s>` are the text tokenizer's bos / eos ids (a pretrained tokenizer's own).
Each span carries its modality (delimiters belong to their span), which sets the loss
weights and per-modality metrics downstream.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from mmfm.core.examples import fetch
from mmfm.core.modalities import MODALITY_NAMES, modality_spec
from mmfm.core.types import (
    DnaRecord,
    Document,
    ImageMaskRecord,
    ImageRecord,
    Modality,
    ModalityRecord,
    Record,
    SvgRecord,
    TaskPart,
    TaskRecord,
    TextRecord,
    VideoRecord,
)
from mmfm.tokenization.dna import DnaTokenizer, read_dna
from mmfm.tokenization.document import DocumentBuilder
from mmfm.tokenization.recipe import TokenizerRecipe
from mmfm.tokenization.svg import SvgTokenizer
from mmfm.tokenization.text import (
    AnyTextTokenizer,
    TextTokenizer,
    iter_corpus,
    load_pretrained,
    load_text_tokenizer,
)
from mmfm.tokenization.visual.framing import EMU3_SPECIALS
from mmfm.tokenization.visual.published import load_published, parse_spec
from mmfm.tokenization.visual.records import Spans, VisualTokenizers
from mmfm.tokenization.vocab import (
    RESERVED_CODEBOOKS,
    VOCAB_FILE,
    Vocab,
    VocabError,
    registered_layout,
)

log = logging.getLogger("mmfm")

TEXT_MODEL, DNA_MODEL = "text.model", "dna.model"
TEXT_FILES = {"sentencepiece": TEXT_MODEL, "hf": "tokenizer.json"}
"""Where each kind of text model is written in `output_dir`."""


FRAMED = (Modality.DNA, Modality.SVG, Modality.IMAGE, Modality.MASK, Modality.VIDEO)


class Tokenizers:
    def __init__(
        self, recipe: TokenizerRecipe, vocab: Vocab, text: AnyTextTokenizer, dna: DnaTokenizer
    ):
        self.recipe, self.vocab, self.text, self.dna = recipe, vocab, text, dna
        self.svg = SvgTokenizer(recipe.svg, text)
        self.visual = VisualTokenizers(recipe, vocab)

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def train(cls, recipe: TokenizerRecipe) -> Tokenizers:
        out = Path(recipe.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        text = text_model(recipe)
        text.save(out / TEXT_FILES[text.kind])
        bpe = None
        if recipe.dna.scheme == "bpe":
            log.info("training the DNA BPE model (%d pieces)", recipe.dna.bpe_vocab_size)
            sequences = (r.sequence.upper() for r in _dna_records(recipe.dna.bpe_corpus, recipe))
            bpe = DnaTokenizer.train_bpe(sequences, recipe.dna.bpe_vocab_size)
            (out / DNA_MODEL).write_bytes(bpe)
        dna = DnaTokenizer(recipe.dna, bpe)
        vocab = build_vocab(recipe, text, dna)
        vocab.save(out / VOCAB_FILE)
        log.info("wrote %s: %d ids (%d text)", out / VOCAB_FILE, vocab.size, text.size)
        return cls(recipe, vocab, text, dna)

    @classmethod
    def load(cls, recipe: TokenizerRecipe) -> Tokenizers:
        out = Path(recipe.output_dir)
        if not (out / VOCAB_FILE).is_file():
            raise VocabError(
                f"{out} holds no trained tokenizers ({VOCAB_FILE}): run mmfm tokenizer train "
                f"with this recipe first"
            )
        vocab = Vocab.load(out / VOCAB_FILE)
        text_file = out / TEXT_FILES.get(vocab.text_kind, TEXT_MODEL)
        if not text_file.is_file():
            raise VocabError(
                f"{out} holds no trained tokenizers ({VOCAB_FILE}, {text_file.name}): run "
                f"mmfm tokenizer train with this recipe first"
            )
        text = load_text_tokenizer(
            vocab.text_kind, text_file.read_bytes(), vocab.text_bos, vocab.text_eos
        )
        bpe = (out / DNA_MODEL).read_bytes() if recipe.dna.scheme == "bpe" else None
        dna = DnaTokenizer(recipe.dna, bpe)
        book = vocab.codebook("dna")
        modalities = tuple(recipe.modalities)
        if text.size != vocab.text_size or dna.size != book.size or vocab.modalities != modalities:
            raise VocabError(
                f"{out / VOCAB_FILE} does not match the recipe's tokenizers (text "
                f"{text.size} vs {vocab.text_size}, dna {dna.size} vs {book.size}, modalities "
                f"{list(vocab.modalities)} vs {list(modalities)}): retrain"
            )
        return cls(recipe, vocab, text, dna)

    # -- records <-> documents --------------------------------------------------------------------

    def encode(
        self, record: Record, rng: np.random.Generator | None = None, spans: Spans | None = None
    ) -> Document:
        """`record` as a framed document; a picture record's `spans` may come encoded already
        (`VisualTokenizers.encode_many`, which batches the pictures of many records)."""
        doc = DocumentBuilder().add([self.text.bos_id], Modality.TEXT)
        if isinstance(record, TextRecord):
            doc.add(self.text.encode(record.text), Modality.TEXT)
        elif isinstance(record, DnaRecord):
            ids = self.dna.encode(record.sequence, self.vocab, record.key, rng)
            self._framed(doc, Modality.DNA, ids)
            if record.output is not None:
                doc.add(
                    [self.vocab.special("<sep>"), *self.text.encode(record.output)], Modality.TEXT
                )
        elif isinstance(record, SvgRecord):
            doc.add(self.text.encode(record.text) if record.text else [], Modality.TEXT)
            self._framed(doc, Modality.SVG, self.svg.encode(record.svg, record.key))
        elif isinstance(record, ImageRecord | ImageMaskRecord | VideoRecord):
            self._captioned(doc, record, spans)
        elif isinstance(record, TaskRecord):
            return self._task(doc, record, rng)
        elif isinstance(record, ModalityRecord):
            doc.add(self.text.encode(record.text) if record.text else [], Modality.TEXT)
            self._framed(doc, *self._codes(record.modality, record.value))
        else:
            raise TypeError(f"no tokenizer for {type(record).__name__}")
        return doc.add([self.text.eos_id], Modality.TEXT).build(record.key, record.source)

    def _captioned(self, doc: DocumentBuilder, record, spans: Spans | None) -> None:
        """The caption (if any) and the picture spans in the record's `order`: image_first puts
        the first picture (image or clip) before the caption; a mask stays last, after both."""
        spans = self.visual.encode_many([record])[0] if spans is None else spans
        first = 1 if record.order == "image_first" else 0
        self.visual.add(doc, record, spans[:first])
        doc.add(self.text.encode(record.text) if record.text else [], Modality.TEXT)
        self.visual.add(doc, record, spans[first:])

    def _task(self, doc: DocumentBuilder, record: TaskRecord, rng) -> Document:
        """`<s> prompt [<sep>] response </s>`, `<s>` and the prompt a no_loss span: only the
        response (and `</s>`) are learned. `<sep>` comes before a response that starts with
        text (as in dna-pairs); a framed response opens with its own delimiter, which is also
        what `mmfm generate --modality` ends a prompt with."""
        for part in record.prompt:
            self._part(doc, part, record.key, rng)
        if record.response[0].kind == "text":
            doc.add([self.vocab.special("<sep>")], Modality.TEXT)
        prompt_end = len(doc.tokens)
        for part in record.response:
            self._part(doc, part, record.key, rng)
        built = doc.add([self.text.eos_id], Modality.TEXT).build(record.key, record.source)
        return replace(built, no_loss=((0, prompt_end),))

    def prompt(self, parts: Sequence[TaskPart], key: str = "prompt") -> list[int]:
        """`<s>` and `parts`, tokenized as a task's prompt is (`mmfm generate`'s prompts with
        pictures, DNA or SVG: the spans are those of the training rows)."""
        doc = DocumentBuilder().add([self.text.bos_id], Modality.TEXT)
        for part in parts:
            self._part(doc, part, key, None)
        return doc.tokens

    def _part(self, doc: DocumentBuilder, part: TaskPart, key: str, rng) -> None:
        if part.kind == "text":
            doc.add(self.text.encode(part.value), Modality.TEXT)
        elif part.kind == "dna":
            self._framed(doc, Modality.DNA, self.dna.encode(part.value, self.vocab, key, rng))
        elif part.kind == "svg":
            self._framed(doc, Modality.SVG, self.svg.encode(part.value, key))
        else:
            doc.add(*self.visual.span(part.kind, part.value))

    def _codes(self, name: str, value) -> tuple[int, list[int]]:
        """(modality id, vocabulary ids) of a registered modality's `value`."""
        if name not in self.vocab.modalities:
            have = list(self.vocab.modalities)
            raise VocabError(f"the vocabulary lays out no {name} codebook (modalities {have})")
        book = self.vocab.codebook(name)
        codes = [int(c) for c in modality_spec(name).encode(value)]
        if any(not 0 <= c < book.size for c in codes):
            raise ValueError(f"{name} encode made codes outside 0..{book.size - 1}")
        return MODALITY_NAMES.index(name), [book.offset + c for c in codes]

    def _framed(self, doc: DocumentBuilder, modality: Modality | int, ids: Sequence[int]) -> None:
        start, end = self.vocab.delimiters(modality)
        doc.add([start, *ids, end], modality)

    def decode(self, ids: Iterable[int]) -> list[tuple[str, str | np.ndarray]]:
        """The document as (modality, content) spans: text, DNA sequences and SVG code as
        strings; images, masks and videos as pictures (see VisualTokenizers.decode).

        A span without its closing id (generation cut at its length limit) is decoded as far
        as it goes (a video: its complete frames; SVG: the code, unparsed), with a warning."""
        ids = list(ids)
        spans: list[tuple[str, str | np.ndarray]] = []
        registered = [MODALITY_NAMES.index(name) for name in self.vocab.modalities]
        frames = {self.vocab.delimiters(m)[0]: m for m in (*FRAMED, *registered)}
        i, text = 0, []
        while i < len(ids):
            if ids[i] in frames:
                modality = frames[ids[i]]
                close = self.vocab.delimiters(modality)[1]
                end = ids.index(close, i + 1) if close in ids[i + 1 :] else len(ids)
                body = ids[i + 1 : end]
                if end == len(ids):
                    log.warning(
                        "%s span at %d has no closing id: decoded as far as it goes",
                        MODALITY_NAMES[modality],
                        i,
                    )
                    body = self._complete_frames(body) if modality == Modality.VIDEO else body
                if text:
                    spans.append(("text", self.text.decode(text)))
                    text = []
                if end == len(ids) and modality == Modality.SVG:  # cut code does not parse
                    content = self.text.decode(body)
                else:
                    content = self._decode_span(modality, body)
                spans.append((MODALITY_NAMES[modality], content))
                i = end + 1
            else:
                if self.vocab.lookup(ids[i])[0] == "text":
                    if ids[i] not in (self.text.bos_id, self.text.eos_id):
                        text.append(ids[i])
                elif text:  # a special (e.g. <sep>) ends a text span
                    spans.append(("text", self.text.decode(text)))
                    text = []
                i += 1
        if text:
            spans.append(("text", self.text.decode(text)))
        return spans

    def _complete_frames(self, body: list[int]) -> list[int]:
        """A cut video body up to its last frame end, that end made the last (<eov>)."""
        frame_ends = (self.vocab.special("<eof>"), self.vocab.special("<eov>"))
        ends = [k for k, t in enumerate(body) if t in frame_ends]
        if not ends:
            return body  # no whole frame: VisualTokenizers.decode says so
        return [*body[: ends[-1]], self.vocab.special("<eov>")]

    def _decode_span(self, modality: Modality | int, body: list[int]):
        if modality >= len(Modality):  # registered: its codes, whatever else a model put there
            book = self.vocab.codebook(MODALITY_NAMES[modality])
            codes = [t - book.offset for t in body if book.offset <= t < book.offset + book.size]
            return modality_spec(book.name).decode(codes)
        if modality == Modality.DNA:
            return self.dna.decode(body, self.vocab)
        if modality == Modality.SVG:
            return self.svg.decode(body)
        return self.visual.decode(modality, body)


def text_model(recipe: TokenizerRecipe) -> AnyTextTokenizer:
    """The recipe's text tokenizer: the pretrained one it names, or one trained on its corpus."""
    if recipe.text.pretrained:
        text = load_pretrained(recipe.text.pretrained, recipe.text.bos_token, recipe.text.eos_token)
        log.info("imported %s: %d text ids", recipe.text.pretrained, text.size)
        return text
    texts = iter_corpus(
        recipe.text.corpus,
        recipe.text.jsonl_field,
        int(recipe.text.max_corpus_mb * 2**20),
        recipe.cache_dir,
    )
    log.info(
        "training the %s text model (%d pieces)", recipe.text.model_type, recipe.text.vocab_size
    )
    return TextTokenizer.train(texts, recipe.text)


def build_vocab(recipe: TokenizerRecipe, text: AnyTextTokenizer, dna: DnaTokenizer) -> Vocab:
    """The unified vocabulary: `text`'s ids, then the specials and codebooks. The same for
    `mmfm tokenizer train` and `mmfm convert from-hf --extend-vocab`, so shards and the
    imported checkpoint share one fingerprint. A pretrained text part records its bos / eos."""
    own = text.kind == "sentencepiece" and not recipe.text.pretrained
    delimiters, books = registered_layout(recipe.modalities)
    image = parse_spec(recipe.image_tokenizer, "image_tokenizer")
    rows = EMU3_SPECIALS if image is not None and image.framing == "emu3" else ()
    return Vocab.build(
        text.size,
        [*recipe.task_tokens, *delimiters, *rows],
        [*reserved_codebooks(recipe), ("dna", dna.size, dna.pieces), *books],
        text_kind=text.kind,
        text_pieces=text.pieces(),
        text_model=text.proto,
        text_bos=None if own else text.bos_id,
        text_eos=None if own else text.eos_id,
    )


def reserved_codebooks(recipe: TokenizerRecipe) -> list[tuple]:
    """Image, mask and video ranges: reserved at their defaults, or (a published image or
    per-frame video tokenizer) its own codebook, named by its `source`, so that its changes
    change the fingerprint."""
    books: list[tuple] = list(RESERVED_CODEBOOKS)
    for i, (name, _) in enumerate(RESERVED_CODEBOOKS):
        spec = parse_spec(getattr(recipe, f"{name}_tokenizer"), f"{name}_tokenizer")
        if spec is not None:
            model = load_published(spec)
            books[i] = (name, model.num_codes, (), model.source, spec.describe())
            log.info("%s codes: %d of %s", name, model.num_codes, model.source)
    return books


def _dna_records(sources: Iterable[str], recipe: TokenizerRecipe):

    for source in sources:
        paths = (
            sorted(fetch(source[5:], recipe.cache_dir).iterdir())
            if source.startswith("real:")
            else [Path(source)]
        )
        for path in paths:
            yield from read_dna(path)
