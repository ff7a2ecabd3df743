"""`mmfm generate MODEL --prompt TEXT [--modality image] ...`: sample, decode, write files.

Every prompt is encoded as `<s> text` (plus the opening delimiter of `--modality`); a prompt
with files (`{image} segment the cat`, mmfm/decoding/prompts.py) as the prompt of a training
task. The batch is generated with the KV cache under the span grammar, and every generated
span is written to `--out` as a file (mmfm/decoding/outputs.py) with one line per prompt in
`generations.jsonl` (a second run into the same `--out` numbers its files after the first's
and appends its lines). Prompts that are not UTF-8, a prompt plus `--max-new-tokens` beyond
the model's `max_seq_len` (the KV cache holds both) and an `--out` that cannot be a folder
are refused before sampling.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mmfm.core.errors import ConfigError, LaunchError
from mmfm.core.files import make_folder
from mmfm.decoding.engine import generate
from mmfm.decoding.layout import MODALITY_OF, Layout
from mmfm.decoding.outputs import (
    Span,
    SpanWriter,
    numbering,
    split_spans,
    write_generations,
)
from mmfm.decoding.prompts import FITS, Prompt, check_prompt, needs_tokenizers, prompt_parts
from mmfm.decoding.sampling import Sampling
from mmfm.generate.load import Loaded, load_model
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.visual.published import parse_spec
from mmfm.tokenization.visual.records import VisualTokenizers
from mmfm.tokenization.vocab import VOCAB_FILE, Vocab

log = logging.getLogger("mmfm")


@dataclass(frozen=True)
class GenerateArgs:
    model: str
    prompts: Sequence[str | Prompt]
    """Text prompts (`--modality` asked of each) or templates with files
    (mmfm/decoding/prompts.py)."""
    out: str = "generations"
    modality: str = "text"
    sampling: Sampling = field(default_factory=Sampling)
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "fp32"
    tokenizers: str | None = None
    """The tokenizer recipe the model's data was made with: its tokenizers encode a prompt's
    files, its visual tokenizers decode image, mask and video codes."""
    constrain: bool = True
    fit: str = "crop"
    """How a prompt's pictures become square (crop or letterbox), as the data's `fit`."""


def _visual(loaded: Loaded, recipe_path: str | None):
    """(VisualTokenizers or None, the ids of a span's body (a frame's, for video) and
    num_codes of the trained visual tokenizers, the image spans' framing)."""
    if recipe_path is None or loaded.vocab is None:
        return None, {}, {}, None

    recipe = load_recipe(recipe_path)
    visual = VisualTokenizers(recipe, loaded.vocab)
    slots = {"image": recipe.image_tokenizer, "mask": recipe.mask_tokenizer}
    slots["video"] = recipe.video_tokenizer
    models = {name: visual.model(name) for name, path in slots.items() if path}
    sizes = {name: visual.span_length(name) for name in models}
    framing = visual.framing("image") if "image" in models else None
    return visual, sizes, {name: model.num_codes for name, model in models.items()}, framing


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
    if args.fit not in FITS:
        raise ConfigError(f"--fit {args.fit!r} is not one of {', '.join(FITS)}")
    prompts = _prompts(args)
    _check_decoders(prompts, args.tokenizers)
    _check_device(args.device)
    heads = _encode_files(prompts, args)  # before the model: a bad file costs no load
    loaded = load_model(args.model, args.device, args.dtype)
    if any(heads):
        _same_vocabulary(loaded, args.model, args.tokenizers)
    visual, sizes, num_codes, framing = _visual(loaded, args.tokenizers)
    layout = loaded.layout(sizes, num_codes, framing)
    ids = [
        layout.ask(head, p.modality) if head else layout.prompt(p.text, p.modality)
        for p, head in zip(prompts, heads, strict=True)
    ]
    _check_length(max(len(p) for p in ids), args.sampling.max_new_tokens, loaded)
    make_folder(Path(args.out), f"--out {args.out}")  # before sampling, not after
    new: list[list[int]] = []
    for i in range(0, len(ids), args.batch_size):
        chunk = ids[i : i + args.batch_size]
        new += generate(loaded.model, chunk, args.sampling, layout, args.constrain)

    with numbering(args.out) as first:
        records = _write(SpanWriter(layout, args.out, visual), first, prompts, ids, new)
    return records


def _write(writer: SpanWriter, first: int, prompts: list[Prompt], ids, new) -> list[dict]:
    """Every span a file, numbered from `first`, and a line per prompt in generations.jsonl."""
    records, all_spans = [], []
    for n, (p, prompt, new_ids) in enumerate(zip(prompts, ids, new, strict=True), first):
        spans = _spans(prompt, new_ids, writer.layout)
        for k, span in enumerate(spans):
            writer.write(span, f"{n:04d}-{k}-{span.modality}")
            where = span.path or "(no file)"
            print(f"[{n}] {span.modality}: {where}" + (f"  ({span.note})" if span.note else ""))
        records.append(
            {
                "index": n,
                "prompt": p.text,
                **({"files": dict(p.files)} if p.files else {}),
                "modality": p.modality,
                "prompt_ids": prompt,
                "new_ids": new_ids,
            }
        )
        all_spans.append(spans)
    path = write_generations(writer.out, records, all_spans)
    print(f"{path}: {len(records)} prompt(s)")
    return records


def _prompts(args: GenerateArgs) -> list[Prompt]:
    """Every prompt as a checked template whose modality is set (text prompts ask for
    `--modality`), numbered for messages."""
    prompts = []
    for n, p in enumerate(args.prompts, 1):
        p = Prompt(p, origin=f"--prompt {n}") if isinstance(p, str) else p
        p = replace(p, modality=p.modality or args.modality)
        if p.modality not in MODALITY_OF:
            raise ConfigError(
                f"{p.origin}: modality {p.modality!r} is not one of {', '.join(MODALITY_OF)}"
            )
        _check_utf8(p)
        check_prompt(p)
        prompts.append(p)
    needs_tokenizers(prompts, args.tokenizers)
    return prompts


def _check_decoders(prompts: list[Prompt], recipe_path: str | None) -> None:
    """An answer whose tokenizer cannot turn codes into pictures (transformers'
    ChameleonVQVAE) is refused before the model is loaded, not found out after sampling."""
    if recipe_path is None:
        return
    recipe = load_recipe(recipe_path)
    for p in prompts:
        if p.modality not in ("image", "video"):
            continue
        slot = f"{p.modality}_tokenizer"
        spec = parse_spec(getattr(recipe, slot), slot)
        if spec is not None and spec.no_decoder:
            raise ConfigError(
                f"{p.origin}: a {p.modality} answer cannot be decoded: --tokenizers "
                f"{recipe_path} has {slot} {spec.class_name}, and {spec.no_decoder}; ask for "
                "text (a picture in the prompt is fine) or use a tokenizer with a decoder"
            )


def _encode_files(prompts: list[Prompt], args: GenerateArgs) -> list[list[int] | None]:
    """`<s>` and the parts of each prompt with files, tokenized by `--tokenizers` as the
    prompts of training tasks are; None for a text prompt (the model's layout encodes it)."""
    if not any(p.files for p in prompts):
        return [None] * len(prompts)
    tokenizers = Tokenizers.load(load_recipe(args.tokenizers))
    return [
        tokenizers.prompt(prompt_parts(p, args.fit), p.origin) if p.files else None for p in prompts
    ]


def _same_vocabulary(loaded: Loaded, model: str, recipe_path: str) -> None:
    """A prompt's files were tokenized with the recipe's vocabulary: it must be the model's."""
    theirs = Vocab.load(Path(load_recipe(recipe_path).output_dir) / VOCAB_FILE)
    if loaded.vocab is None or loaded.vocab.fingerprint != theirs.fingerprint:
        mine = "no vocab.json" if loaded.vocab is None else f"vocabulary {loaded.vocab.fingerprint}"
        raise ConfigError(
            f"--tokenizers {recipe_path} has vocabulary {theirs.fingerprint}, the model "
            f"{model} {mine}: give the tokenizer recipe its data was prepared with"
        )


def _check_utf8(prompt: Prompt) -> None:
    """Prompts from argv carry undecodable bytes as lone surrogates: refuse them by number."""
    try:
        prompt.text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(
            f"{prompt.origin} is not valid UTF-8 (byte {prompt.text[e.start]!r} at character "
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
