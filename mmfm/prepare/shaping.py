"""Condition dropout and caption order: the choices `mmfm prepare` makes for a captioned
picture record (image-text, image-mask, video) before it is tokenized.

Condition dropout (`uncond_ratio`, LWM / Emu3) drops a share of the captions, so that
classifier-free guidance has a trained unconditional branch: the document then starts
`<s> <img>`, exactly the prompt `mmfm generate --cfg-scale` feeds its unconditional branch.
Caption order (`order`, SEED-LLaMA's `reverse_ratio`) puts the picture before its caption
(`<s> <img> ... </img> caption </s>`) for a share of the records, or for all of them.

Each choice is drawn from a generator seeded by (recipe seed, source name, record key), not
by the shard or the worker, so that it is the same with any number of workers or shard size,
and a record keeps its choice when other records are added or rejected. The realised shares
are counted per source into manifest.json (`sources.<name>.shaping`).

Completion-only (`completion_only`) then makes a record with a condition a prompt / response
task (`TaskRecord`, whose prompt is never a target): DNA -> its text, caption -> picture (or
picture -> caption when image_first), image and phrase -> mask, an SVG file's name -> its code.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
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

log = logging.getLogger("mmfm")

CAPTIONED_RECORDS = (ImageRecord, ImageMaskRecord, VideoRecord)


@dataclass(frozen=True)
class Shaping:
    """A source's rule (its PrepareSource fields of the same names)."""

    uncond_ratio: float = 0.0
    order: str = "text_first"
    reverse_ratio: float = 0.5
    completion_only: bool = False
    label_repeat: int = 1

    @property
    def draws(self) -> bool:
        """Whether records draw choices (and the manifest gets their realised shares)."""
        return self.uncond_ratio > 0 or self.order != "text_first"


def rules(recipe) -> dict[str, Shaping]:
    """The rule of every source that shapes its records, by source name."""
    out = {}
    for s in recipe.sources:
        rule = Shaping(s.uncond_ratio, s.order, s.reverse_ratio, s.completion_only, s.label_repeat)
        if rule.draws or rule.completion_only:
            out[s.name or s.kind] = rule
    return out


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
    elif isinstance(record, SvgRecord):
        name = " ".join(record.key.replace("_", " ").replace("-", " ").split())
        task = ([TaskPart("text", name)], [TaskPart("svg", record.svg)]) if name else None
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


def realised(counts: Mapping[str, int]) -> dict[str, dict]:
    """{"uncond": {count, of, ratio}, "image_first": {...}} from a source's summed tags:
    uncond of the captioned documents, image_first of those that kept their caption."""
    shares = {}
    for name, of in (("uncond", "captioned"), ("image_first", "ordered")):
        n, total = int(counts.get(name, 0)), int(counts.get(of, 0))
        shares[name] = {"count": n, "of": total, "ratio": round(n / total, 4) if total else 0.0}
    return shares


def log_realised(sources: Mapping[str, dict]) -> None:
    """One line per shaped source: `photos: uncond 0.098 (49 of 500), image_first 0.51 ...`."""
    for name, counts in sources.items():
        if "shaping" in counts:
            parts = [
                f"{k} {v['ratio']:.3g} ({v['count']} of {v['of']})"
                for k, v in counts["shaping"].items()
            ]
            log.info("%s: %s", name, ", ".join(parts))
