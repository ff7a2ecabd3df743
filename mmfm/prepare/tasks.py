"""Prompt / response tasks (`kind: prompt-response`): jsonl records for completion-only
fine-tuning (Omni-DNA's multi-task SFT, StarVector's text2svg, HiMTok's referring
segmentation), tokenized as `<s> prompt [<sep>] response </s>` with the prompt never a target.

One JSON object a line, `{"prompt": SIDE, "response": SIDE}`. A SIDE is a string (text), an
object of one key naming its modality, or a list of those, in document order:

    {"prompt": {"dna": "TATAAAAGGC..."}, "response": "promoter"}
    {"prompt": "a red circle", "response": {"svg": "<svg ...>...</svg>"}}
    {"prompt": [{"image": "photos/cat.jpg"}, "segment the cat"],
     "response": {"mask": "photos/cat.mask.png"}}

Keys: text, dna (a sequence), svg (the code), image, mask and video (paths relative to the
source's `image_dir`, default the jsonl's folder, and refused outside it). Pictures are made
square by the source's `fit`, a mask with the image of its record; `label_repeat` writes a
text-only response N times, separated by spaces (Omni-DNA's replicated class labels); other
responses stay as they are.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mmfm.core.errors import LaunchError
from mmfm.core.types import TASK_PARTS, TaskPart, TaskRecord
from mmfm.prepare.limits import lines, too_large
from mmfm.tokenization.visual import data as vdata
from mmfm.tokenization.visual.data import PictureError

PICTURES = ("image", "mask", "video")


class TaskError(ValueError):
    """A record that does not make a task; `reason` names it for the reject counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def task_records(path: Path, source, rejects) -> Iterator[TaskRecord]:
    """The tasks of one jsonl file (other files of a directory, e.g. its pictures, are no
    records), every bad line a counted reject."""
    if path.suffix != ".jsonl":
        return
    root = Path(source.image_dir).expanduser() if source.image_dir else path.parent
    limit = source.max_record_bytes
    with open(path, "rb") as f:
        for i, raw in enumerate(lines(f, limit)):
            where = f"{path}:{i + 1}"
            if raw is None:
                rejects.add("too_large", where, f"a line {too_large(limit)}")
                continue
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
                yield _record(obj, f"{path.stem}:{i + 1}", source, root.resolve())
            except UnicodeDecodeError as e:
                rejects.add("invalid_utf8", where, str(e))
            except (json.JSONDecodeError, RecursionError) as e:
                rejects.add("bad_json", where, f"{type(e).__name__}: {e}")
            except (TaskError, PictureError) as e:
                rejects.add(e.reason, where, str(e))
            except LaunchError:  # a missing extra (PyAV): no record of the kind would read
                raise
            except (OSError, ValueError, RuntimeError, SyntaxError) as e:  # Pillow / PyAV
                rejects.add("undecodable", where, f"{type(e).__name__}: {e}")


def _record(obj, key: str, source, root: Path) -> TaskRecord:
    if not isinstance(obj, dict) or "prompt" not in obj or "response" not in obj:
        raise TaskError("missing_field", 'a task is an object {"prompt": ..., "response": ...}')
    prompt, response = _side(obj["prompt"], "prompt"), _side(obj["response"], "response")
    parts = _read_pictures([*prompt, *response], source, root)
    prompt, response = parts[: len(prompt)], parts[len(prompt) :]
    if source.label_repeat > 1:
        response = _repeated(response, source.label_repeat)
    return TaskRecord(key, tuple(prompt), tuple(response), source.name or source.kind)


def _side(value, name: str) -> list[tuple[str, str]]:
    """(kind, value) of each part of a prompt or response."""
    items = value if isinstance(value, list) else [value]
    parts = []
    for item in items:
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict) or len(item) != 1:
            raise TaskError(
                "bad_part", f"{name}: each part is a string or an object of one key, got {item!r}"
            )
        ((kind, content),) = item.items()
        if kind not in TASK_PARTS or not isinstance(content, str):
            raise TaskError(
                "bad_part", f"{name}: {kind!r}: a string under one of {', '.join(TASK_PARTS)}"
            )
        parts.append((kind, content))
    if not parts or all(kind == "text" and not content for kind, content in parts):
        raise TaskError("missing_field", f"an empty {name}")
    return parts


def _read_pictures(parts: list[tuple[str, str]], source, root: Path) -> list[TaskPart]:
    """Every part as a TaskPart, pictures read and made square; a mask must have the size of
    the record's image, if it has one."""
    image_shape = None
    out = []
    for kind, content in parts:
        if kind not in PICTURES:
            out.append(TaskPart(kind, content))
            continue
        file = _inside(root, content)
        if kind == "video":
            frames = vdata.read_video(file, source.fps, source.max_frames, source.max_pixels)
            value = np.stack([vdata.fit_square(f, source.fit) for f in frames])
        elif kind == "image":
            value = vdata.read_image(file, source.max_pixels)
            image_shape = value.shape[:2]
        else:
            with vdata.open_picture(file, source.max_pixels) as im:
                value = (np.asarray(im.convert("L")) > 0).astype(np.uint8)
        out.append(TaskPart(kind, value))
    for i, part in enumerate(out):
        if part.kind == "mask" and image_shape is not None and part.value.shape != image_shape:
            raise PictureError("bad_mask", f"a mask of {part.value.shape}, its image {image_shape}")
        if part.kind in ("image", "mask"):
            out[i] = TaskPart(part.kind, vdata.fit_square(part.value, source.fit))
    return out


def _inside(root: Path, name: str) -> Path:
    file = (root / name).resolve()
    if not file.is_relative_to(root):
        raise TaskError("outside_root", f"{name} is outside {root} (set the source's image_dir)")
    if not file.is_file():
        raise TaskError("missing_file", f"no file {file}")
    return file


def _repeated(response: list[TaskPart], n: int) -> list[TaskPart]:
    if any(p.kind != "text" for p in response):
        return response  # a label is text: other responses stay as they are
    label = "".join(p.value for p in response)
    return [TaskPart("text", " ".join([label] * n))]
