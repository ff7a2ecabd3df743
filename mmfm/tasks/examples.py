"""A task's examples: the records `mmfm prepare` reads from its source, made prompt /
response tasks as `completion_only` makes them for training (`as_task`), so that a prompt is
tokenized exactly as the prompts the model learned from.

A record without a condition (a picture without a caption, an SVG file without words in its
name) makes no example; a response of another modality than the task answers in, or a
dna-classify prompt without DNA, is refused in one line naming the record: that source holds
no examples of the task.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mmfm.config.schema import TaskConfig
from mmfm.core.errors import ConfigError, DataError
from mmfm.core.types import TaskPart, TaskRecord
from mmfm.prepare.readers import Rejects, source_records
from mmfm.prepare.recipe import COMPLETION_KINDS, PrepareSource
from mmfm.tokenization.shaping import Shaping, shape

ANSWERS = {"segmentation": "mask", "svg": "svg", "dna-classify": "text", "image": "image"}
ANSWERS |= {"video": "video", "text": "text"}
"""The modality each task's answer is in."""


@dataclass(frozen=True)
class Example:
    where: str
    """The file and record it came from, for messages."""
    prompt: tuple[TaskPart, ...]
    target: TaskPart
    """The response: what the generation is scored against."""


def task_source(task: TaskConfig) -> PrepareSource:
    """The prepare source of the task's `kind`, `paths` and `options` (label_repeat aside:
    the examples keep one label, see `label_repeat`)."""
    options = {k: v for k, v in task.options.items() if k != "label_repeat"}
    names = {f.name for f in dataclasses.fields(PrepareSource)}
    unknown = sorted(set(options) - names - {"kind", "paths"})
    if unknown or {"kind", "paths"} & set(options):
        bad = unknown[0] if unknown else sorted({"kind", "paths"} & set(options))[0]
        raise ConfigError(
            f"eval.tasks[{task.name}].options.{bad}: not an option of a source (set kind and "
            f"paths on the task; options: {', '.join(sorted(names - {'kind', 'paths'}))})"
        )
    # an SVG file's caption (its name's words) is read only for completion_only
    options.setdefault("completion_only", task.kind in COMPLETION_KINDS)
    try:
        return PrepareSource(kind=task.kind, paths=list(task.paths), **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"eval.tasks[{task.name}]: {e}") from None


def label_repeat(task: TaskConfig) -> int:
    repeat = task.options.get("label_repeat", 1)
    if not isinstance(repeat, int) or repeat < 1:
        raise ConfigError(
            f"eval.tasks[{task.name}].options.label_repeat must be an integer >= 1, got {repeat!r}"
        )
    return repeat


def read_examples(task: TaskConfig) -> list[Example]:
    """The first `task.examples` examples of the task's source, in reading order."""
    source = task_source(task)
    rule = Shaping(order=source.order, reverse_ratio=source.reverse_ratio, completion_only=True)
    rejects = Rejects()
    examples: list[Example] = []
    unprompted = 0
    for where, record in source_records(source, rejects):
        record, _ = shape(record, rule, 0)
        if not isinstance(record, TaskRecord):
            unprompted += 1  # no caption or phrase: nothing to prompt with
            continue
        examples.append(_example(task, where, record))
        if len(examples) == task.examples:
            break
    if not examples:
        counts = [f"{n} {reason}" for reason, n in rejects.counts.items()]
        counts += [f"{unprompted} without a caption or phrase"] if unprompted else []
        raise DataError(
            f"eval.tasks[{task.name}]: {', '.join(task.paths)} ({task.kind}) holds no example "
            f"({', '.join(counts) or 'no records'}): give a source of {ANSWERS[task.name]} "
            "answers with their prompts"
        )
    return examples


def _example(task: TaskConfig, where: str, record: TaskRecord) -> Example:
    answer = ANSWERS[task.name]
    kinds = [p.kind for p in record.response]
    if kinds != [answer]:
        raise DataError(
            f"eval.tasks[{task.name}]: {where}: a response of {' + '.join(kinds)}; the task "
            f"scores one {answer} answer: give a source whose responses are {answer}"
        )
    if task.name == "dna-classify" and not any(p.kind == "dna" for p in record.prompt):
        raise DataError(
            f"eval.tasks[dna-classify]: {where}: a prompt without DNA: give DNA -> label tasks"
        )
    return Example(where, record.prompt, record.response[0])
