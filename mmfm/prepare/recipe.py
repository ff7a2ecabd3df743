"""The prepare recipe: what to read (sources, each of one kind) and where the shards go."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mmfm.config.loading import load_structured
from mmfm.config.schema import (
    RawFields,
    _require,
    _require_choice,
    _require_positive,
    check_shaping,
)
from mmfm.core.modalities import registered
from mmfm.prepare.segmentation import check_source
from mmfm.tokenization.visual.data import FITS
from mmfm.tokenization.visual.records import MASKS

log = logging.getLogger("mmfm")
KINDS = (
    "text", "dna", "dna-pairs", "svg", "image-text", "image-mask", "video", "webdataset", "voc",
    "coco", "prompt-response",
)  # fmt: skip
"""The built-in kinds; `source_kinds()` adds those of registered modalities."""
CAPTIONED = ("image-text", "image-mask", "video", "voc", "coco", "webdataset")
"""Kinds whose records are a picture (or clip) and its caption: condition dropout and order."""
COMPLETION_KINDS = ("dna-pairs", "svg", *CAPTIONED)
PICTURES = {
    "image-text": ("image",), "image-mask": ("image", "mask"), "voc": ("image", "mask"),
    "coco": ("image", "mask"), "video": ("video",),
}  # fmt: skip
"""The visual tokenizers each kind's records need (a webdataset source: its record's)."""


def source_kinds() -> tuple[str, ...]:
    """Every kind a source may have: the built-in ones, then each registered modality's
    (`ModalitySpec.read`: its reader makes the records)."""
    return (*KINDS, *(s.source_kind for s in registered() if s.read is not None))


@dataclass
class PrepareSource:
    kind: str = "text"
    """text (jsonl records, or one record per other file), dna (FASTA / FASTQ / GenBank
    sequences), dna-pairs (GenBank CDS -> /product task pairs), svg (one record per file),
    image-text (an image and its caption: the sidecar <stem>.txt, else the file name),
    image-mask (an image and its mask: the sidecar <stem>.mask.png, or see `mask`), voc and
    coco (segmentation sets: one referring-segmentation record per image and class present,
    mmfm/prepare/segmentation.py),
    video (a clip's frames, and its caption as for image-text), webdataset (raw WebDataset
    shards, e.g. img2dataset's 000123.jpg + .txt + .json; see `fields`) or prompt-response
    (jsonl of {"prompt": ..., "response": ...} tasks, the prompt never a target:
    mmfm/prepare/tasks.py), or the kind of a registered modality (docs/adding_a_modality.md:
    its reader makes the records)."""
    paths: list[str] = field(default_factory=list)
    """Files, directories, globs, or real:<name> (fetched from a registry); webdataset:
    shards as the training loader takes them (files, directories of *.tar, brace patterns
    `cc3m-{000000..000099}.tar`, http(s):// URLs, pipe: commands)."""
    fields: RawFields = field(default_factory=RawFields)
    """webdataset: which members make which record (`mmfm.config.schema.RawFields`), e.g.
    {record: image-text, image: [jpg, png, webp], text: [txt, json:caption]}."""
    name: str = ""
    """Stored as each document's source; default: the kind."""
    jsonl_field: str = "text"
    """Field of a jsonl record that holds the text."""
    max_length: int = 0
    """dna (and webdataset dna): cut sequences into windows of at most this many bases (0:
    whole sequences)."""
    limit: int = 0
    """Read at most this many records (webdataset: samples) of this source (0: all)."""
    fps: float = 2.0
    """video (and webdataset video): frames per second taken from each clip."""
    max_frames: int = 8
    """video: at most this many frames per clip (each is 257 tokens with its <eof>)."""
    caption_from_name: bool = True
    """image-text, video: without a sidecar <stem>.txt, caption with the file name's words."""
    max_pixels: int = 1 << 26
    """image-text, image-mask, video, webdataset: refuse (count as too_large) a picture, mask
    or frame of more pixels, read from its header before decoding (64M: 8192 x 8192).
    Decompression bombs (over Pillow's ~179M pixels) are refused whatever this says."""
    max_record_mb: float = 64.0
    """Refuse (count as too_large) a record of more MiB of text, DNA or SVG code: a text or
    SVG file, a jsonl line, a raw sample's text, svg or dna member, a DNA sequence (or window,
    see max_length), a task's prompt and response. Refused from its size before reading where
    the format allows; pictures are bounded by max_pixels. A raw WebDataset member (a picture,
    a video) is read only up to the larger of this and 256 MiB (else too_large)."""
    mask: str = "sidecar"
    """image-mask: sidecar (the <stem>.mask.png, nonzero = object; none: rejected as no_mask)
    or otsu (Otsu's threshold of the picture, a guess: only when asked)."""
    fit: str = ""
    """How pictures become the tokenizers' square: crop (the centre square; the rest is lost)
    or letterbox (grey bars, mask 0 under them; nothing lost). Default: letterbox for voc and
    coco, crop for the others."""
    phrase: str = "segment the {name}"
    """voc, coco: the text before the picture, {name} the class name (underscores as spaces)."""
    classes: list[str] = field(default_factory=list)
    """voc: class names by label index (0 background); default: <root>/class_names.txt, else
    the 20 VOC classes."""
    ignore_index: int = 255
    """voc: the void label (VOC borders): in no class mask (background there), counted."""
    split: str = ""
    """voc: read only the images of ImageSets/Segmentation/<split>.txt (e.g. train, val)."""
    image_dir: str = ""
    """coco: the folder of the json's file_name pictures (default: the json's folder);
    prompt-response: the folder its image / mask / video paths are relative to, and must stay
    inside (default: the jsonl's folder)."""
    uncond_ratio: float = 0.0
    """Captioned pictures (image-text, image-mask, video, voc, coco, webdataset of those):
    the share of records whose caption is dropped (condition dropout, LWM / Emu3), so that
    `mmfm generate --cfg-scale` has a trained unconditional branch: `<s> <img> ...`, the very
    prompt generate feeds it. Drawn per record from (recipe seed, source name, record key)."""
    order: str = "text_first"
    """Captioned pictures: text_first (`<s> caption <img> ... </img> </s>`), image_first
    (`<s> <img> ... </img> caption </s>`: captioning) or both, each record drawn
    image_first with probability `reverse_ratio` (SEED-LLaMA). A mask always comes last."""
    reverse_ratio: float = 0.5
    """order: both: the share of records put image_first."""
    label_repeat: int = 1
    """prompt-response (and dna-pairs with completion_only): a text-only response (a class
    label) written this many times, separated by spaces (Omni-DNA repeats class labels 10
    times in its SFT); responses with another modality stay as they are."""
    completion_only: bool = False
    """Make each record a prompt / response task whose prompt is never a target (as
    prompt-response sources are): dna-pairs (DNA -> its text), image-mask, voc and coco
    (image and phrase -> mask: HiMTok's referring segmentation), image-text and video
    (caption -> picture, or with order image_first picture -> caption), svg (the file name's
    words -> code: text2svg, the words added before <svg>). Records without a condition
    (uncaptioned, plain DNA) keep every target. The tokens are those of the plain document,
    but for a <sep> before a text answer and svg's added words."""

    def __post_init__(self) -> None:
        _require_choice("sources[].kind", self.kind, source_kinds())
        _require(bool(self.paths), f"sources: a {self.kind} source needs paths")
        _require(self.max_length >= 0 and self.limit >= 0, "max_length and limit must be >= 0")
        _require(self.fps > 0 and self.max_frames > 0, "fps and max_frames must be > 0")
        _require(self.max_pixels > 0, "sources[].max_pixels must be > 0")
        _require(self.max_record_mb > 0, "sources[].max_record_mb must be > 0")
        self.fit = self.fit or ("letterbox" if self.kind in ("voc", "coco") else "crop")
        _require_choice("sources[].fit", self.fit, FITS)
        _require_choice("sources[].mask", self.mask, MASKS)
        self._check_shaping()
        check_source(self)

    @property
    def max_record_bytes(self) -> int:
        return int(self.max_record_mb * (1 << 20))

    @property
    def visual_tokenizers(self) -> tuple[str, ...]:
        """The visual tokenizers (image, mask, video) its records need; prompt-response
        sources may name pictures too, known only when read."""
        return PICTURES.get(self.fields.record if self.kind == "webdataset" else self.kind, ())

    def _check_shaping(self) -> None:
        check_shaping("sources[].", self.order, self.uncond_ratio, self.reverse_ratio)
        shaped = self.uncond_ratio > 0 or self.order != "text_first"
        captioned = self.kind in CAPTIONED and (
            self.kind != "webdataset" or self.fields.record in CAPTIONED
        )
        _require(
            captioned or not shaped,
            f"sources[].uncond_ratio and order apply to captioned pictures ({', '.join(CAPTIONED)}"
            f" of image-text, image-mask or video), not to a {self.kind} source: remove them",
        )
        _require(self.label_repeat >= 1, "sources[].label_repeat must be >= 1")
        _require(
            self.label_repeat == 1
            or self.kind == "prompt-response"
            or (self.kind == "dna-pairs" and self.completion_only),
            f"sources[].label_repeat applies to prompt-response sources (and dna-pairs with "
            f"completion_only), not {self.kind}",
        )
        _require(
            not self.completion_only or self.kind in COMPLETION_KINDS,
            f"sources[].completion_only applies to {', '.join(COMPLETION_KINDS)} sources, not "
            f"{self.kind} (prompt-response sources are completion-only already)",
        )


@dataclass
class PrepareRecipe:
    name: str = "data"
    """Shard name prefix: <output>/<name>-000000.tar, ..."""
    output: str = "data/out"
    """Directory of the shards, manifest.json and vocab.json."""
    tokenizer: str = "tokenizers/base.yaml"
    """Tokenizer recipe whose trained files tokenize the records."""
    shard_size: int = 1000
    """Records per shard (rejected records leave a shard a little smaller)."""
    seed: int = 0
    """Seed of tokenizer augmentations (DNA reverse complement) and of the sources'
    condition dropout and caption order (`uncond_ratio`, `order: both`)."""
    cache_dir: str = "~/.cache/mmfm"
    """Where real:<name> inputs are fetched to."""
    sources: list[PrepareSource] = field(default_factory=list)
    """What to read, in order."""
    order: str = "as_read"
    """Order of the documents in the shards: as_read (the sources' order) or related
    (In-Context Pretraining: each document next to its most similar, near-duplicates dropped;
    the corpus must fit in memory, mmfm/prepare/order.py). Not the sources' caption `order`."""
    format: str = "webdataset"
    """webdataset (the shards), or megatron: the shards and, from them, a Megatron-LM indexed
    dataset <output>/<name>.bin/.idx with the sidecar <name>.spans.bin/.idx of each document's
    modality spans (mmfm/prepare/megatron_out.py; needs pip install 'mmfm[megatron]')."""

    def __post_init__(self) -> None:
        _require_positive(self, "prepare", "shard_size")
        _require_choice("order", self.order, ("as_read", "related"))
        _require_choice("format", self.format, ("webdataset", "megatron"))
        _require(bool(self.sources), "a prepare recipe needs at least one entry in sources")
        shaping: dict[str, tuple] = {}
        for s in self.sources:  # records know their source by name only
            rule = (s.uncond_ratio, s.order, s.reverse_ratio)
            _require(
                shaping.setdefault(s.name or s.kind, rule) == rule,
                f"sources named {s.name or s.kind!r} differ in uncond_ratio / order / "
                "reverse_ratio: give them different names",
            )


def load_prepare_recipe(path, overrides=()) -> PrepareRecipe:
    return load_structured(PrepareRecipe, path, overrides)
