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
from mmfm.decoding.engine import check_length, generate
from mmfm.decoding.layout import MODALITY_OF
from mmfm.decoding.outputs import (
    SpanWriter,
    answer_spans,
    numbering,
    visual_decoders,
    write_generations,
)
from mmfm.decoding.prompts import (
    FITS,
    Prompt,
    check_prompt,
    check_recipe_vocab,
    encode_prompts,
    needs_tokenizers,
)
from mmfm.decoding.sampling import Sampling
from mmfm.generate.load import load_model
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.visual.published import parse_spec

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
    # Before the model: a bad file costs no load.
    heads = encode_prompts(prompts, args.tokenizers, args.fit)
    loaded = load_model(args.model, args.device, args.dtype)
    if any(heads):
        check_recipe_vocab(args.tokenizers, "--tokenizers", loaded.vocab, args.model)
    visual, sizes, num_codes, framing = visual_decoders(args.tokenizers, loaded.vocab)
    layout = loaded.layout(sizes, num_codes, framing)
    ids = [
        layout.ask(head, p.modality) if head else layout.prompt(p.text, p.modality)
        for p, head in zip(prompts, heads, strict=True)
    ]
    longest, limit = max(len(p) for p in ids), loaded.model.cfg.max_seq_len
    check_length(longest, args.sampling.max_new_tokens, limit, "--max-new-tokens")
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
        spans = answer_spans(prompt, new_ids, writer.layout)
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


def _check_utf8(prompt: Prompt) -> None:
    """Prompts from argv carry undecodable bytes as lone surrogates: refuse them by number."""
    try:
        prompt.text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(
            f"{prompt.origin} is not valid UTF-8 (byte {prompt.text[e.start]!r} at character "
            f"{e.start}): pass the prompt as UTF-8 text"
        ) from None


def sampling_from(**fields) -> Sampling:
    try:
        return Sampling(**fields)
    except ValueError as e:
        raise ConfigError(str(e)) from None
