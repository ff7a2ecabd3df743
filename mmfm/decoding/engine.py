"""The decoding loop: left-padded prompts prefilled once into a KV cache, then one token per
step for every sequence, until each has produced </s> or `max_new_tokens`.

Ragged prompts are left-padded: the padding slots are never attended to and positions count
from each prompt's first real token, so every prompt gets the tokens it gets alone.

Classifier-free guidance (`cfg_scale != 1`, as LWM samples images and video): each prompt
runs twice in one batch, conditioned and unconditioned, and the logits mixed are
`uncond + cfg_scale * (cond - uncond)`; both branches are then fed the chosen token. The
unconditional prompt is made by `unconditional_prompt`: the prompt with its condition (the
text between `<s>` and the trailing opening delimiter) removed, i.e. `<s> <img>`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mmfm.core.errors import ConfigError
from mmfm.decoding.constraints import SpanConstraint
from mmfm.decoding.layout import Layout
from mmfm.decoding.sampling import Sampling, next_tokens
from mmfm.model.cache import KVCache


def unconditional_prompt(prompt: Sequence[int], layout: Layout) -> list[int]:
    """`prompt` without its condition: `<s>` plus the opening delimiter it ends with, if any
    (the unconditional branch of classifier-free guidance)."""
    opens = {pair[0] for pair in layout.delimiters.values()}
    tail = [prompt[-1]] if prompt and prompt[-1] in opens else []
    return [layout.bos, *tail]


def check_length(prompt: int, max_new_tokens: int, limit: int, option="--max-new-tokens") -> None:
    """Prompt and answer fit the model's positions (`limit`, its max_seq_len): the KV cache is
    allocated for both. `option` names the setting to change in the message."""
    if prompt + max_new_tokens > limit:
        fix = (
            f"ask for at most {limit - prompt} new tokens"
            if prompt < limit
            else "shorten the prompt"
        )
        raise ConfigError(
            f"{option} {max_new_tokens} after a prompt of {prompt} tokens makes "
            f"{prompt + max_new_tokens}, beyond the model's max_seq_len {limit}: {fix}"
        )


def left_pad(prompts: Sequence[Sequence[int]], device: torch.device):
    """(tokens, positions, doc ids) `[batch, longest]`: padding on the left has doc id -1."""
    longest = max(len(p) for p in prompts)
    pads = torch.tensor([longest - len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        tokens[row, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
    slots = torch.arange(longest, device=device)[None, :]
    positions = (slots - pads[:, None]).clamp(min=0)
    doc_ids = torch.where(slots >= pads[:, None], 0, -1)
    return tokens, positions, doc_ids


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    layout: Layout | None = None,
    constrain: bool = True,
    eos_id: int | None = None,
    stop_at_eos: bool = True,
) -> list[list[int]]:
    """The new ids after each prompt (ending with </s> when it was produced).

    `layout` gives the span grammar (when `constrain`), </s> and the unconditional prompts of
    classifier-free guidance; without one, decoding is unconstrained and stops at `eos_id`.
    `stop_at_eos=False` always runs `max_new_tokens` steps (benchmarks).
    """
    assert prompts and all(prompts), "generate needs non-empty prompts"
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    eos = layout.eos if layout is not None else eos_id
    eos = eos if stop_at_eos else None
    guided = sampling.cfg_scale != 1.0
    if guided and layout is None:
        raise ValueError("classifier-free guidance needs the vocabulary layout")
    rows = [*prompts, *(unconditional_prompt(p, layout) for p in prompts)] if guided else prompts
    batch = len(prompts)

    tokens, positions, doc_ids = left_pad(rows, device)
    cache = KVCache(model.cfg, len(rows), tokens.shape[1] + sampling.max_new_tokens, dtype, device)
    constraint = None
    if layout is not None and constrain:
        constraint = SpanConstraint(layout, model.cfg.vocab_size, batch, device)
        for column, keep in zip(tokens[:batch].T, doc_ids[:batch].T >= 0, strict=True):
            constraint.update(column, keep)
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)

    logits = model(tokens, positions, doc_ids, cache)[:, -1].float()
    next_position = positions[:, -1] + 1
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = []
    for step in range(sampling.max_new_tokens):
        if guided:
            cond, uncond = logits[:batch], logits[batch:]
            logits = uncond + sampling.cfg_scale * (cond - uncond)
        if constraint is not None:
            logits = constraint(logits)
        token = next_tokens(logits, sampling, generator)
        if eos is not None:
            token = torch.where(done, eos, token)
        steps.append(token)
        if constraint is not None:
            constraint.update(token, ~done)
        if eos is not None:
            done |= token == eos
            if bool(done.all()):
                break
        if step + 1 == sampling.max_new_tokens:
            break
        feed = torch.cat([token, token]) if guided else token
        logits = model(feed[:, None], next_position[:, None], doc_ids[:, :1] * 0, cache)
        logits = logits[:, -1].float()
        next_position = next_position + 1
    return _trim(torch.stack(steps, 1).tolist(), eos)


def _trim(rows: list[list[int]], eos: int | None) -> list[list[int]]:
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]
