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


class PCABasis(nn.Module):
    """A frozen linear analysis / synthesis pair fitted on training pictures: their mean and
    leading principal components, each scaled to unit variance (whitened).

    Pixel auto-encoders learn slowly from scratch at CPU budgets: the pixel spectrum falls off
    steeply, so gradient descent is badly conditioned (bench/README.md: transformer and MLP
    auto-encoders stuck near 15.8 dB with or without a quantiser). Whitened principal
    coefficients make the problem well conditioned, and the basis is stored with the weights
    (buffers), so encoding and decoding need nothing but the checkpoint."""

    def __init__(self, features: int, components: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("components", torch.zeros(features, components))
        self.register_buffer("scale", torch.ones(components))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Fit on `[N, ...]` samples (N >= components), through the N x N Gram matrix: cheaper
        than an SVD of the samples when N is below the pixel count."""
        x = x.flatten(1).double()
        k = self.components.shape[1]
        if len(x) < k:
            raise ValueError(f"fitting {k} principal components needs >= {k} samples, got {len(x)}")
        mean = x.mean(0)
        centred = x - mean
        eigenvalues, vectors = torch.linalg.eigh(centred @ centred.T)
        eigenvalues, vectors = eigenvalues.flip(0)[:k], vectors.flip(1)[:, :k]
        singular = eigenvalues.clamp(min=1e-12).sqrt()
        self.mean.copy_(mean)
        self.components.copy_(centred.T @ vectors / singular)
        self.scale.copy_(singular / len(x) ** 0.5)
        self.fitted.fill_(True)

    def analyse(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, ...]` -> whitened coefficients `[B, components]`."""
        return (x.flatten(1) - self.mean) @ self.components / self.scale

    def synthesise(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Whitened coefficients `[B, components]` -> flat samples `[B, features]`."""
        return (coefficients * self.scale) @ self.components.T + self.mean
