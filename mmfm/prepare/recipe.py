"""The prepare recipe: what to read (sources, each of one kind) and where the shards go."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mmfm.config.loading import load_structured
from mmfm.config.schema import RawFields, _require, _require_choice, _require_positive
from mmfm.prepare.segmentation import check_source
from mmfm.tokenization.visual.data import FITS
from mmfm.tokenization.visual.records import MASKS

log = logging.getLogger("mmfm")
MANIFEST = "manifest.json"
KINDS = (
    "text", "dna", "dna-pairs", "svg", "image-text", "image-mask", "video", "webdataset", "voc",
    "coco",
)  # fmt: skip


@dataclass
class PrepareSource:
    kind: str = "text"
    """text (jsonl records, or one record per other file), dna (FASTA / FASTQ / GenBank
    sequences), dna-pairs (GenBank CDS -> /product task pairs), svg (one record per file),
    image-text (an image and its caption: the sidecar <stem>.txt, else the file name),
    image-mask (an image and its mask: the sidecar <stem>.mask.png, or see `mask`), voc and
    coco (segmentation sets: one referring-segmentation record per image and class present,
    mmfm/prepare/segmentation.py),
    video (a clip's frames, and its caption as for image-text) or webdataset (raw WebDataset
    shards, e.g. img2dataset's 000123.jpg + .txt + .json; see `fields`)."""
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
    """coco: the folder of the json's file_name pictures (default: the json's folder)."""

    def __post_init__(self) -> None:
        _require_choice("sources[].kind", self.kind, KINDS)
        _require(bool(self.paths), f"sources: a {self.kind} source needs paths")
        _require(self.max_length >= 0 and self.limit >= 0, "max_length and limit must be >= 0")
        _require(self.fps > 0 and self.max_frames > 0, "fps and max_frames must be > 0")
        _require(self.max_pixels > 0, "sources[].max_pixels must be > 0")
        self.fit = self.fit or ("letterbox" if self.kind in ("voc", "coco") else "crop")
        _require_choice("sources[].fit", self.fit, FITS)
        _require_choice("sources[].mask", self.mask, MASKS)
        check_source(self)


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
    """Seed of tokenizer augmentations (DNA reverse complement)."""
    cache_dir: str = "~/.cache/mmfm"
    """Where real:<name> inputs are fetched to."""
    sources: list[PrepareSource] = field(default_factory=list)
    """What to read, in order."""

    def __post_init__(self) -> None:
        _require_positive(self, "prepare", "shard_size")
        _require(bool(self.sources), "a prepare recipe needs at least one entry in sources")


def load_prepare_recipe(path, overrides=()) -> PrepareRecipe:
    return load_structured(PrepareRecipe, path, overrides)
