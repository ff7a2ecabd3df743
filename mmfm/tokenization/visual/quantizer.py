"""Vector quantisation with low-dimensional, l2-normalised codes (as in SEED and ViT-VQGAN).

Features are projected to `code_dim` dimensions and normalised; the nearest code by cosine
similarity replaces them (straight-through gradient), with the usual codebook and commitment
losses. Codes left unused for `restart_after` training steps are restarted on random current
features, which keeps a large codebook alive on small data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


def perplexity(codes: torch.Tensor, codebook_size: int) -> float:
    """exp(entropy) of the code histogram: the number of codes effectively in use."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    p = counts / counts.sum()
    return math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())
