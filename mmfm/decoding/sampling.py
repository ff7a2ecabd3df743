"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    """Tokens generated after each prompt at most (generation also stops at </s>)."""
    temperature: float = 0.0
    """0: greedy (argmax); otherwise the logits are divided by it before sampling."""
    top_k: int = 0
    """Sample among the k most likely ids only (0: all)."""
    top_p: float = 1.0
    """Sample among the most likely ids whose probabilities sum to p (1: all)."""
    seed: int = 0
    """The same seed, prompts and device give the same tokens."""
    cfg_scale: float = 1.0
    """Classifier-free guidance: logits = uncond + cfg_scale * (cond - uncond); 1: off."""

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "cfg_scale"):  # nan/inf sample garbage or zeros
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not -(2**63) <= self.seed < 2**63:  # torch's generators take a 64-bit seed
            raise ValueError(f"seed must be a 64-bit signed integer, got {self.seed}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"top_k must be >= 0 and top_p in (0, 1]: {self.top_k}, {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """`logits` `[batch, vocab]` with every id outside the top-k / top-p set at -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop an id when the ids before it already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_tokens(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None
) -> torch.Tensor:
    """One id per row of `logits` `[batch, vocab]` (float32)."""
    if sampling.greedy:
        return logits.argmax(-1)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
