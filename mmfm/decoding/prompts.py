"""Prompts with pictures, clips, DNA and SVG: `--prompt "{image} segment the cat" --image cat.png`.

A prompt is a template whose `{image}`, `{video}`, `{dna}` and `{svg}` say where the span of
a file goes (`--image PATH` ..., or a field of a `--prompts` JSONL line). The template is cut
at its placeholders into parts in order (the text between them stripped, as the parts of a
prompt-response task are listed), each file is read as `mmfm prepare` reads it (pictures made
square by `--fit`, a clip's frames at 2 fps, at most 8; a FASTA / FASTQ / GenBank file of
one sequence; SVG code through the hardened parser) and the parts are tokenized by
the tokenizer set the model's data was made with (`--tokenizers`) exactly as a task's prompt
is (`Tokenizers.prompt`): `<s> <img> 32 codes </img> segment the cat`, then the opening
delimiter of the answer's modality. Everything a user can get wrong (a placeholder without
its file, a file without its placeholder, a missing file, a tokenizer set without the
tokenizer a file needs) is refused in one line before the model is loaded; a tokenizer set
whose vocabulary is not the model's, once it is (command.py).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmfm.core.errors import ConfigError, InputNotFound, TokenizerError
from mmfm.core.types import TaskPart
from mmfm.tokenization.dna import read_dna
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.visual import data as vdata
from mmfm.tokenization.vocab import VOCAB_FILE, Vocab

FILE_KINDS = ("image", "video", "dna", "svg")
"""What a prompt can hold besides text, each given by a file and placed by `{kind}`."""
PROMPT_FIELDS = ("prompt", "modality", *FILE_KINDS)
"""The fields of a `--prompts` JSONL line."""
_PLACEHOLDER = re.compile(r"\{(" + "|".join(FILE_KINDS) + r")\}")
FITS = ("crop", "letterbox")
FPS, MAX_FRAMES = 2.0, 8
"""A clip's frames as `mmfm prepare` takes them by default (sources[].fps, max_frames)."""


@dataclass(frozen=True)
class Prompt:
    text: str
    """The template: text with `{image}`, `{video}`, `{dna}`, `{svg}` where files go."""
    files: Mapping[str, str] = field(default_factory=dict)
    """The file of each placeholder kind."""
    modality: str | None = None
    """The answer's modality (None: the command's `--modality`)."""
    origin: str = "--prompt"
    """Where it came from (`--prompt 2`, `prompts.jsonl:3`), for messages."""

    def kinds(self) -> list[str]:
        """The placeholder kinds of the template, in order (repeats included)."""
        return _PLACEHOLDER.findall(self.text)


def check_prompt(prompt: Prompt) -> None:
    """Placeholders and files match one to one and every file exists."""
    used = set(prompt.kinds())
    for kind in FILE_KINDS:
        if kind in used and kind not in prompt.files:
            raise ConfigError(
                f"{prompt.origin}: {{{kind}}} but no {kind} file: pass --{kind} FILE (or a "
                f'"{kind}" field in the --prompts line)'
            )
        if kind in prompt.files and kind not in used:
            raise ConfigError(
                f"{prompt.origin}: a {kind} file ({prompt.files[kind]}) but no {{{kind}}} in "
                f"the prompt {prompt.text!r}: write {{{kind}}} where its span goes"
            )
    for kind, name in prompt.files.items():
        if not Path(name).is_file():
            raise InputNotFound(f"{prompt.origin}: {kind} file {name}: no such file")


def needs_tokenizers(prompts: Sequence[Prompt], recipe_path: str | None) -> None:
    """Prompts with files need the tokenizer set the model's data was made with, and it must
    have the visual tokenizer of each picture kind they hold."""
    kinds = {k for p in prompts for k in p.files}
    if not kinds:
        return
    if recipe_path is None:
        raise ConfigError(
            f"a prompt with a {sorted(kinds)[0]} file needs --tokenizers RECIPE, the tokenizer "
            "set the model's data was prepared with (its vocab.json is the model's)"
        )
    recipe = load_recipe(recipe_path)
    for kind in ("image", "video"):
        if kind in kinds and not getattr(recipe, f"{kind}_tokenizer"):
            raise ConfigError(
                f"--tokenizers {recipe_path} has no {kind}_tokenizer, so a {kind} cannot be put "
                f"in a prompt: give the tokenizer recipe the model's {kind} data was prepared "
                "with"
            )


def encode_prompts(
    prompts: Sequence[Prompt], recipe_path: str | None, fit: str = "crop"
) -> list[list[int] | None]:
    """`<s>` and the parts of each prompt with files, tokenized by the recipe's tokenizers as
    the prompts of training tasks are; None for a text prompt (the layout encodes it)."""
    if not any(p.files for p in prompts):
        return [None] * len(prompts)
    assert recipe_path is not None, "needs_tokenizers refuses file prompts without a recipe"
    tokenizers = Tokenizers.load(load_recipe(recipe_path))
    return [tokenizers.prompt(prompt_parts(p, fit), p.origin) if p.files else None for p in prompts]


def check_recipe_vocab(recipe_path: str, option: str, vocab: Vocab | None, model: str) -> None:
    """A prompt's files are tokenized with the vocabulary of the recipe (`option`, where it
    was given): it must be the vocabulary of `model` (`vocab`)."""
    theirs = Vocab.load(Path(load_recipe(recipe_path).output_dir) / VOCAB_FILE)
    if vocab is None or vocab.fingerprint != theirs.fingerprint:
        mine = "no vocab.json" if vocab is None else f"vocabulary {vocab.fingerprint}"
        raise ConfigError(
            f"{option} {recipe_path} has vocabulary {theirs.fingerprint}, the model {model} "
            f"{mine}: give the tokenizer recipe its data was prepared with"
        )


def prompt_parts(prompt: Prompt, fit: str = "crop") -> list[TaskPart]:
    """The template as task parts in order, each file read (pictures made square by `fit`)."""
    parts, values = [], {}
    pieces = _PLACEHOLDER.split(prompt.text)  # text, kind, text, kind, ..., text
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            if piece.strip():
                parts.append(TaskPart("text", piece.strip()))
            continue
        if piece not in values:
            values[piece] = _read(piece, Path(prompt.files[piece]), prompt.origin, fit)
        parts.append(TaskPart(piece, values[piece]))
    return parts


def _read(kind: str, path: Path, origin: str, fit: str) -> str | np.ndarray:
    where = f"{origin}: --{kind} {path}"
    try:
        if kind == "image":
            return vdata.fit_square(vdata.read_image(path), fit)
        if kind == "video":
            frames = vdata.read_video(path, FPS, MAX_FRAMES)
            return np.stack([vdata.fit_square(f, fit) for f in frames])
        if kind == "svg":
            return path.read_bytes().decode("utf-8")
        records = list(itertools.islice(read_dna(path), 2))
    except TokenizerError as e:
        raise TokenizerError(f"{where}: {e}") from None
    except (OSError, ValueError, RuntimeError, SyntaxError) as e:  # Pillow, PyAV, UTF-8
        raise TokenizerError(
            f"{where}: cannot read it as {kind} ({type(e).__name__}: {e})"
        ) from None
    if len(records) != 1:
        held = "no sequence" if not records else "more than one sequence"
        raise TokenizerError(f"{where}: holds {held}; a prompt takes a file of one")
    return records[0].sequence


def read_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a JSONL file: one object a line, `{"prompt": "{image} segment the cat",
    "image": "cat.png", "modality": "mask"}`; file paths are relative to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"--prompts {path}: no such file")
    prompts = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                prompts.append(_prompt_line(raw, f"{path}:{n}", path.parent))
    if not prompts:
        raise ConfigError(f"--prompts {path} holds no prompt (one JSON object a line)")
    return prompts


def _prompt_line(raw: bytes, where: str, root: Path) -> Prompt:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{where}: not a line of JSON ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise ConfigError(f'{where}: a prompt line is an object with a string "prompt"')
    unknown = sorted(set(obj) - set(PROMPT_FIELDS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(PROMPT_FIELDS)})"
        )
    for key in ("modality", *FILE_KINDS):
        if key in obj and not isinstance(obj[key], str):
            raise ConfigError(f"{where}: {key!r} must be a string, got {obj[key]!r}")
    files = {k: str(root / obj[k]) for k in FILE_KINDS if k in obj}
    return Prompt(obj["prompt"], files, obj.get("modality"), where)
