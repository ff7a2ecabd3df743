"""Greedy decoding without a KV cache (each step runs the whole prefix): the reference that
tests and bench/generate.py hold the cached path of `mmfm.generate` against."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate_greedy(
    model: nn.Module, prompt: list[int], max_new_tokens: int, eos_id: int | None = None
) -> list[int]:
    """The tokens after `prompt`, one document, argmax at every step."""
    tokens = list(prompt)
    device = next(model.parameters()).device
    for _ in range(max_new_tokens):
        ids = torch.tensor([tokens], device=device)
        positions = torch.arange(len(tokens), device=device)[None]
        logits = model(ids, positions, torch.zeros_like(ids))
        tokens.append(int(logits[0, -1].argmax()))
        if tokens[-1] == eos_id:
            break
    return tokens[len(prompt) :]
