"""The batch contract between the data pipeline and the trainer.

A `Batch` is a block of packed rows: every tensor is `[rows, seq_len]`. Documents are laid
end to end in a row; `doc_ids` numbers them (padding is a document of its own), `positions`
restart at 0 in each, and `labels` hold the next token of the same document or
`IGNORE_INDEX`. `modality` and `loss_weights` describe the target token (the label).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum

import torch

IGNORE_INDEX = -100


class Modality(IntEnum):
    TEXT = 0
    IMAGE = 1
    MASK = 2
    DNA = 3
    SVG = 4
    VIDEO = 5


MODALITY_NAMES = tuple(m.name.lower() for m in Modality)


@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor
    """Input token ids, int64."""
    labels: torch.Tensor
    """Next token of the same document, or IGNORE_INDEX where there is no target."""
    positions: torch.Tensor
    """Position of each token inside its document (restarts at 0), int64."""
    doc_ids: torch.Tensor
    """Document index inside the row (0, 1, ...), int64; attention stays within one id."""
    loss_weights: torch.Tensor
    """Weight of each target in the loss, float32; 0 where there is no target."""
    modality: torch.Tensor
    """`Modality` of each target token, int64 (for per-modality metrics)."""

    def __post_init__(self) -> None:
        shape = self.tokens.shape
        assert self.tokens.dim() == 2, f"Batch tensors are [rows, seq_len], got {tuple(shape)}"
        for f in fields(self):
            assert getattr(self, f.name).shape == shape, f"Batch.{f.name} has the wrong shape"

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def select(self, rows: torch.Tensor | slice) -> Batch:
        """The rows `rows` of every field."""
        return Batch(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @staticmethod
    def cat(batches: list[Batch]) -> Batch:
        """The rows of `batches`, one after the other."""
        return Batch(
            **{f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in fields(Batch)}
        )

    def to(self, device: torch.device | str) -> Batch:
        non_blocking = torch.device(device).type == "cuda"
        return Batch(
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )
