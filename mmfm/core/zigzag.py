"""Zigzag split of packed rows for context parallelism (data side, before the model).

A row of `seq_len` tokens is cut into `2 * cp` equal chunks and context-parallel rank `r`
keeps chunks `r` and `2 * cp - 1 - r`: with causal attention every rank then has the same
amount of work (an early chunk, cheap, and a late one, expensive). All fields of the batch
are sliced together; positions keep their values, so rotary embeddings stay correct.
"""

from __future__ import annotations

import torch

from mmfm.core.types import Batch


def zigzag_indices(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """Row positions of the tokens context-parallel rank `rank` holds, in its local order."""
    assert seq_len % (2 * cp) == 0, "the config check guarantees seq_len % (2 * cp) == 0"
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk)
    last_start = (2 * cp - 1 - rank) * chunk
    return torch.cat([first, torch.arange(last_start, last_start + chunk)])


def zigzag_slice(batch: Batch, cp: int, rank: int) -> Batch:
    """This rank's tokens of every row; the identity for cp == 1."""
    if cp == 1:
        return batch
    index = zigzag_indices(batch.tokens.shape[1], cp, rank)
    return Batch(**{name: getattr(batch, name)[:, index] for name in Batch.__dataclass_fields__})
