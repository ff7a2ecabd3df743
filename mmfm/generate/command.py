"""`mmfm generate MODEL --prompt TEXT [--modality image] ...`: sample, decode, write files.

Every prompt is encoded as `<s> text` (plus the opening delimiter of `--modality`), the batch
is generated with the KV cache under the span grammar, and every generated span is written
to `--out` as a file (outputs.py) with one line per prompt in `generations.jsonl` (a second
run into the same `--out` numbers its files after the first's and appends its lines). Prompts
that are not UTF-8, a prompt plus `--max-new-tokens` beyond the model's `max_seq_len` (the KV
cache holds both) and an `--out` that cannot be a folder are refused before sampling.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmfm.core.errors import ConfigError, LaunchError
from mmfm.core.files import make_folder
from mmfm.generate.engine import generate
from mmfm.generate.layout import MODALITY_OF, Layout
from mmfm.generate.load import Loaded, load_model
from mmfm.generate.outputs import (
    Span,
    SpanWriter,
    next_index,
    split_spans,
    write_generations,
)
from mmfm.generate.sampling import Sampling
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.visual.records import VisualTokenizers

log = logging.getLogger("mmfm")


@dataclass(frozen=True)
class GenerateArgs:
    model: str
    prompts: Sequence[str]
    out: str = "generations"
    modality: str = "text"
    sampling: Sampling = field(default_factory=Sampling)
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "fp32"
    tokenizers: str | None = None
    """A tokenizer recipe whose visual tokenizers decode image, mask and video codes."""
    constrain: bool = True


def _visual(loaded: Loaded, recipe_path: str | None):
    """(VisualTokenizers or None, tokens_per_item and num_codes of the trained visual
    tokenizers)."""
    if recipe_path is None or loaded.vocab is None:
        return None, {}, {}

    recipe = load_recipe(recipe_path)
    visual = VisualTokenizers(recipe, loaded.vocab)
    slots = {"image": recipe.image_tokenizer, "mask": recipe.mask_tokenizer}
    slots["video"] = recipe.video_tokenizer
    models = {name: visual.model(name) for name, path in slots.items() if path}
    sizes = {name: model.tokens_per_item for name, model in models.items()}
    return visual, sizes, {name: model.num_codes for name, model in models.items()}


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LaunchError(f"--device {name} but no CUDA device is visible; use --device cpu")


def run(args: GenerateArgs) -> list[dict]:
    """Generate for every prompt, write the files and generations.jsonl; return its records."""
    if args.modality not in MODALITY_OF:
        raise ConfigError(f"--modality {args.modality!r} is not one of {', '.join(MODALITY_OF)}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    _check_device(args.device)
    _check_utf8(args.prompts)
    loaded = load_model(args.model, args.device, args.dtype)
    visual, sizes, num_codes = _visual(loaded, args.tokenizers)
    layout = loaded.layout(sizes, num_codes)
    prompts = [layout.prompt(text, args.modality) for text in args.prompts]
    _check_length(max(len(p) for p in prompts), args.sampling.max_new_tokens, loaded)
    make_folder(Path(args.out), f"--out {args.out}")  # before sampling, not after
    new: list[list[int]] = []
    for i in range(0, len(prompts), args.batch_size):
        chunk = prompts[i : i + args.batch_size]
        new += generate(loaded.model, chunk, args.sampling, layout, args.constrain)

    writer = SpanWriter(layout, args.out, visual)
    first = next_index(args.out)
    records, all_spans = [], []
    for n, (text, prompt, ids) in enumerate(zip(args.prompts, prompts, new, strict=True), first):
        spans = _spans(prompt, ids, layout)
        for k, span in enumerate(spans):
            writer.write(span, f"{n:04d}-{k}-{span.modality}")
            where = span.path or "(no file)"
            print(f"[{n}] {span.modality}: {where}" + (f"  ({span.note})" if span.note else ""))
        records.append(
            {
                "index": n,
                "prompt": text,
                "modality": args.modality,
                "prompt_ids": prompt,
                "new_ids": ids,
            }
        )
        all_spans.append(spans)
    path = write_generations(args.out, records, all_spans)
    print(f"{path}: {len(records)} prompt(s)")
    return records


def _check_utf8(prompts: Sequence[str]) -> None:
    """Prompts from argv carry undecodable bytes as lone surrogates: refuse them by number."""
    for n, text in enumerate(prompts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(
                f"--prompt {n + 1} is not valid UTF-8 (byte {text[e.start]!r} at character "
                f"{e.start}): pass the prompt as UTF-8 text"
            ) from None


def _check_length(prompt: int, max_new_tokens: int, loaded: Loaded) -> None:
    """Prompt and answer fit the model's positions: the KV cache is allocated for both."""
    limit = loaded.model.cfg.max_seq_len
    if prompt + max_new_tokens > limit:
        fix = (
            f"ask for at most {limit - prompt} new tokens"
            if prompt < limit
            else "shorten the prompt"
        )
        raise ConfigError(
            f"--max-new-tokens {max_new_tokens} after a prompt of {prompt} tokens makes "
            f"{prompt + max_new_tokens}, beyond the model's max_seq_len {limit}: {fix}"
        )


def _spans(prompt: list[int], new: list[int], layout: Layout) -> list[Span]:
    """The spans of the generated part; a span the prompt opened (`--modality`) starts at its
    opening delimiter. Offsets index the prompt and new ids laid end to end."""
    opens = {pair[0] for pair in layout.delimiters.values()}
    offset = len(prompt) - 1 if prompt[-1] in opens else len(prompt)
    spans = split_spans([*prompt[offset:], *new], layout)
    for span in spans:
        span.start += offset
        span.end += offset
    return spans


def sampling_from(**fields) -> Sampling:
    try:
        return Sampling(**fields)
    except ValueError as e:
        raise ConfigError(str(e)) from None
