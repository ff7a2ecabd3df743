"""Condition dropout and caption order: the choices made for a captioned picture record
(image-text, image-mask, video) before it is tokenized, by `mmfm prepare` (its sources'
rules, mmfm/prepare/shaping.py) and by the training stream for raw shards (`data.sources[]`
with `tokenize`, mmfm/data/raw_stream.py), alike.

Condition dropout (`uncond_ratio`, LWM / Emu3) drops a share of the captions, so that
classifier-free guidance has a trained unconditional branch: the document then starts
`<s> <img>`, exactly the prompt `mmfm generate --cfg-scale` feeds its unconditional branch.
Caption order (`order`, SEED-LLaMA's `reverse_ratio`) puts the picture before its caption
(`<s> <img> ... </img> caption </s>`) for a share of the records, or for all of them.

Each choice is drawn from a generator seeded by (seed, source name, record key), not
by the shard or the worker, so that it is the same with any number of workers or shard size,
and a record keeps its choice when other records are added or rejected; prepared and streamed
documents of one seed (the prepare recipe's, train.seed in the stream) and source name are
the same. `mmfm prepare` counts the realised shares
per source into manifest.json (`sources.<name>.shaping`).

Completion-only (`completion_only`) then makes a record with a condition a prompt / response
task (`TaskRecord`, whose prompt is never a target): DNA -> its text, caption -> picture (or
picture -> caption when image_first), image and phrase -> mask, an SVG's caption -> its code
(an SVG file's caption is its name's words, `svg_caption`; never a raw sample's key).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np

from mmfm.core.types import (
    DnaRecord,
    ImageMaskRecord,
    ImageRecord,
    Record,
    SvgRecord,
    TaskPart,
    TaskRecord,
    VideoRecord,
)

CAPTIONED_RECORDS = (ImageRecord, ImageMaskRecord, VideoRecord)


@dataclass(frozen=True)
class Shaping:
    """A source's rule (the fields of the same names of a prepare recipe's source, or of a
    data.sources[] entry with `tokenize`)."""

    uncond_ratio: float = 0.0
    order: str = "text_first"
    reverse_ratio: float = 0.5
    completion_only: bool = False
    label_repeat: int = 1

    @property
    def draws(self) -> bool:
        """Whether records draw choices (and the manifest gets their realised shares)."""
        return self.uncond_ratio > 0 or self.order != "text_first"


def record_rng(seed: int, source: str, key: str) -> np.random.Generator:
    """A generator of (seed, source, key) alone: the same record draws the same choices."""
    digest = hashlib.sha256(f"{source}\0{key}".encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def shape(record: Record, rule: Shaping | None, seed: int) -> tuple[Record, tuple[str, ...]]:
    """`record` as `rule` makes it, and what to count: `captioned` (it had a caption),
    `uncond` (the caption dropped), `ordered` (a caption to place) and `image_first`.
    Records without a caption, or of a source without a rule, pass unchanged (but for
    completion_only, see `as_task`)."""
    if rule is None:
        return record, ()
    record, tags = _draw(record, rule, seed) if rule.draws else (record, ())
    return (as_task(record, rule.label_repeat) if rule.completion_only else record), tags


def _draw(record: Record, rule: Shaping, seed: int) -> tuple[Record, tuple[str, ...]]:
    if not isinstance(record, CAPTIONED_RECORDS) or not record.text:
        return record, ()
    dropout, reverse = record_rng(seed, record.source, record.key).random(2)
    if dropout < rule.uncond_ratio:
        return replace(record, text=None), ("captioned", "uncond")
    first = rule.order == "image_first" or (rule.order == "both" and reverse < rule.reverse_ratio)
    tags = ("captioned", "ordered", "image_first") if first else ("captioned", "ordered")
    return replace(record, order="image_first" if first else "text_first"), tags


def as_task(record: Record, label_repeat: int = 1) -> Record:
    """`record` as a prompt / response task when it has a condition, else unchanged: the
    same parts in the same order, the condition the prompt (see the module docstring)."""
    task = None
    if isinstance(record, DnaRecord) and record.output:
        label = " ".join([record.output] * label_repeat)
        task = [TaskPart("dna", record.sequence)], [TaskPart("text", label)]
    elif isinstance(record, SvgRecord) and record.text:
        task = [TaskPart("text", record.text)], [TaskPart("svg", record.svg)]
    elif isinstance(record, CAPTIONED_RECORDS) and record.text:
        picture = _picture(record)
        caption = TaskPart("text", record.text)
        if isinstance(record, ImageMaskRecord):
            prompt = [picture, caption] if record.order == "image_first" else [caption, picture]
            task = prompt, [TaskPart("mask", record.mask)]
        else:
            task = (
                ([picture], [caption]) if record.order == "image_first" else ([caption], [picture])
            )
    if task is None:
        return record
    return TaskRecord(record.key, tuple(task[0]), tuple(task[1]), record.source)


def _picture(record: Record) -> TaskPart:
    if isinstance(record, VideoRecord):
        return TaskPart("video", record.frames)
    return TaskPart("image", record.image)


def svg_caption(stem: str) -> str | None:
    """An SVG file's caption for completion_only: its name's words (`zoom_to-rect`: zoom to
    rect), None when it has none."""
    return " ".join(stem.replace("_", " ").replace("-", " ").split()) or None
