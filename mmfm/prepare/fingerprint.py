"""What an output of `mmfm prepare` was made from: one fingerprint of recipe, tokenizers, inputs.

Stored in manifest.json and in each finished shard's marker (`.stats/<shard>.json`), so that
a rerun with a changed recipe into the same output is refused (or, with `--overwrite`, rebuilds
the shards) instead of keeping old shards as "already done" under a manifest of two recipes.
Inputs are fingerprinted by name, size and modification time (remote shards by URL): hashing
their contents would read the whole corpus before the first shard. Options left at their
defaults are left out, so that an option a later mmfm adds (with a default that keeps the old
behaviour) does not make every earlier output look changed. The output format is left out
too: the shards are the same whichever it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from mmfm.prepare.recipe import PrepareRecipe
from mmfm.tokenization.recipe import TokenizerRecipe

_NOT_THE_OUTPUT = ("output", "cache_dir", "tokenizer", "format")
"""Where, not what (the tokenizer counts by content). `format: megatron` only adds an indexed
dataset written from the finished shards: a rerun that asks for it resumes from them."""


def fingerprint(recipe: PrepareRecipe, tokenizer: TokenizerRecipe, inputs: list[list[str]]) -> dict:
    """{"recipe", "tokenizer", "inputs", "all"}: 16 hex digits each; `inputs` lists each
    source's files or shard URLs."""
    what = {k: v for k, v in non_default_options(recipe).items() if k not in _NOT_THE_OUTPUT}
    parts = {
        "recipe": _digest(what),
        "tokenizer": _digest(_tokenizer_contents(tokenizer)),
        "inputs": _digest([[_describe(url) for url in urls] for urls in inputs]),
    }
    return {**parts, "all": _digest(parts)}


def changed(old: dict | None, new: dict) -> str:
    """What differs from fingerprint parts `old` to `new`, in words."""
    if not isinstance(old, dict):
        return "no fingerprint recorded: another or an older mmfm made them"
    names = [f"the {p}" for p in ("recipe", "tokenizer", "inputs") if old.get(p) != new[p]]
    return f"{' and '.join(names) or 'the fingerprint'} changed"


def _tokenizer_contents(recipe: TokenizerRecipe) -> dict:
    """What the encoded ids depend on: the encoding options and the trained files."""
    files = sorted(p for p in Path(recipe.output_dir).glob("*") if p.is_file())
    for slot in (recipe.image_tokenizer, recipe.mask_tokenizer, recipe.video_tokenizer):
        if isinstance(slot, str):  # a published one counts by its source, in vocab.json
            files += [Path(slot) / "config.json", Path(slot) / "model.safetensors"]
    published = isinstance(recipe.image_tokenizer, dict)  # e.g. its fit, besides vocab.json
    return {
        "dna": non_default_options(recipe.dna),
        "svg": non_default_options(recipe.svg),
        "task_tokens": recipe.task_tokens,
        "files": [[p.name, _file_digest(p)] for p in files],
        **({"image_tokenizer": recipe.image_tokenizer} if published else {}),
    }


def non_default_options(value):
    """A dataclass as a dict of the fields that differ from their defaults, recursively (lists
    and dicts of dataclasses too); other values as they are."""
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            if v != default:
                out[f.name] = non_default_options(v)
        return out
    if isinstance(value, list | tuple):
        return [non_default_options(v) for v in value]
    if isinstance(value, dict):
        return {k: non_default_options(v) for k, v in value.items()}
    return value


def _describe(url: str) -> list:
    if "://" in url or url.startswith("pipe:"):
        return [url]
    stat = Path(url).stat()
    return [url, stat.st_size, stat.st_mtime_ns]


def _file_digest(path: Path) -> str | None:
    if not path.is_file():
        return None  # a tokenizer not trained yet: the run fails when it is first needed
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _digest(value) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
