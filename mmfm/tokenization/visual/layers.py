"""Transformer stacks for the visual tokenizers (PyTorch's own encoder / decoder layers)."""

from __future__ import annotations

import torch
from torch import nn


def encoder(dim: int, layers: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def decoder(dim: int, layers: int, heads: int) -> nn.TransformerDecoder:
    """Self-attention among the queries, cross-attention to a memory, MLP."""
    layer = nn.TransformerDecoderLayer(
        dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
    )
    return nn.TransformerDecoder(layer, layers)


def causal_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)  # True: not attended


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, (H/p)(W/p), C p p]`."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(x: torch.Tensor, patch: int, channels: int, size: int) -> torch.Tensor:
    b, g = x.shape[0], size // patch
    x = x.reshape(b, g, g, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, size, size)
