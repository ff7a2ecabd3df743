"""Quantisers of the visual tokenizers: a learned codebook (VQ) or a fixed grid (FSQ).

`VectorQuantizer`: low-dimensional, l2-normalised codes (as in SEED and ViT-VQGAN). Features
are projected to `code_dim` dimensions and normalised; the nearest code by cosine similarity
replaces them (straight-through gradient), with the usual codebook and commitment losses.
Codes left unused for `restart_after` training steps are restarted on random current
features, which keeps a large codebook alive on small data.

`FiniteScalarQuantizer` (FSQ, Mentzer et al. 2023): features are projected to one dimension
per entry of `levels`, bounded and rounded to that many values; the code is the mixed-radix
number of the rounded values (as many codes as the levels' product). No codebook to learn
or restart and no auxiliary loss, so no code dies of disuse; the encoder can still crowd a
few cells (it did on masks, not on images: bench/README.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.core.errors import ConfigError


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        dim: int,
        codebook_size: int,
        code_dim: int = 16,
        beta: float = 0.25,
        restart_after: int = 100,
    ):
        super().__init__()
        self.codebook_size, self.beta, self.restart_after = codebook_size, beta, restart_after
        self.proj_in = nn.Linear(dim, code_dim)
        self.proj_out = nn.Linear(code_dim, dim)
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim))
        self.register_buffer("last_used", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(quantised features, codes, VQ loss) for features `[..., dim]`."""
        u = F.normalize(self.proj_in(z), dim=-1)
        if self.training:  # before the codebook enters this step's graph
            self._restart_dead_codes(u)
        e = F.normalize(self.codebook, dim=-1)
        codes = (u @ e.t()).argmax(-1)
        q = e[codes]
        loss = F.mse_loss(q, u.detach()) + self.beta * F.mse_loss(u, q.detach())
        if self.training:
            with torch.no_grad():
                self.steps += 1
                self.last_used[codes.flatten().unique()] = self.steps
        return self.proj_out(u + (q - u).detach()), codes, loss

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Features of given codes (what the decoder sees)."""
        return self.proj_out(F.normalize(self.codebook, dim=-1)[codes])

    @torch.no_grad()
    def _restart_dead_codes(self, u: torch.Tensor) -> None:
        dead = (self.steps - self.last_used > self.restart_after).nonzero().flatten()
        if len(dead):
            pool = u.reshape(-1, u.shape[-1])
            pick = torch.randint(len(pool), (len(dead),), device=u.device)
            self.codebook[dead] = pool[pick] + 0.01 * torch.randn_like(pool[pick])
            self.last_used[dead] = self.steps


class FiniteScalarQuantizer(nn.Module):
    def __init__(self, dim: int, levels: tuple[int, ...]):
        super().__init__()
        self.levels = tuple(levels)
        self.codebook_size = math.prod(self.levels)
        self.proj_in = nn.Linear(dim, len(self.levels))
        self.proj_out = nn.Linear(len(self.levels), dim)
        radix = torch.tensor([math.prod(self.levels[:i]) for i in range(len(self.levels))])
        self.register_buffer("radix", radix, persistent=False)
        self.register_buffer("count", torch.tensor(self.levels), persistent=False)

    def _bound(self, u: torch.Tensor) -> torch.Tensor:
        """Squash to (-L/2, L/2) so that rounding gives exactly L values (even L: shifted)."""
        half = (self.count - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.count % 2 == 0, 0.5, 0.0)
        return torch.tanh(u + torch.atanh(offset / half)) * half - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(quantised features, codes, a zero loss) for features `[..., dim]`."""
        bounded = self._bound(self.proj_in(z))
        rounded = bounded + (bounded.round() - bounded).detach()
        digits = rounded.detach().long() + self.count // 2
        codes = (digits * self.radix).sum(-1)
        return self.proj_out(rounded / (self.count // 2)), codes, z.new_zeros(())

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        digits = codes[..., None] // self.radix % self.count
        return self.proj_out((digits - self.count // 2) / (self.count // 2))


def quantizer(
    kind: str, dim: int, codebook_size: int, code_dim: int, beta: float, levels: tuple[int, ...]
) -> nn.Module:
    """The `kind` (vq or fsq) quantiser of a model config; fsq's levels multiply to the book."""
    if kind == "fsq":
        if math.prod(levels) != codebook_size:
            raise ConfigError(
                f"model.fsq_levels {tuple(levels)} give {math.prod(levels)} codes, not "
                f"codebook_size {codebook_size}: choose levels whose product is the codebook size"
            )
        return FiniteScalarQuantizer(dim, levels)
    if kind != "vq":
        raise ConfigError(f"model.quantizer {kind!r} is not vq or fsq")
    return VectorQuantizer(dim, codebook_size, code_dim, beta)


def perplexity(codes: torch.Tensor, codebook_size: int) -> float:
    """exp(entropy) of the code histogram: the number of codes effectively in use."""
    return perplexity_of_counts(torch.bincount(codes.flatten(), minlength=codebook_size))


def perplexity_of_counts(counts: torch.Tensor) -> float:
    """exp(entropy) of a code histogram."""
    p = counts.float() / counts.sum().clamp(min=1)
    return math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())
