"""The types every layer shares: modalities, documents, the records tokenizers take, the batch.

A `Document` is one tokenized document with the modality of every token. A record
(`TextRecord`, `ImageRecord`, ...) is one document before tokenization, as a reader made it.
A `Batch` is a block of packed rows: every tensor is `[rows, seq_len]`. Documents are laid
end to end in a row; `doc_ids` numbers them (padding is a document of its own), `positions`
restart at 0 in each, and `labels` hold the next token of the same document or
`IGNORE_INDEX`. `modality` and `loss_weights` describe the target token (the label).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from mmfm.core.modalities import MODALITY_NAMES as MODALITY_NAMES  # every modality's name
from mmfm.core.modalities import Modality as Modality  # the built-in ones

IGNORE_INDEX = -100


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


@dataclass(frozen=True)
class Document:
    tokens: np.ndarray
    """Token ids, int32 `[n]`."""
    modality: np.ndarray
    """`Modality` of every token, uint8 `[n]`."""
    key: str
    """The document's original id."""
    source: str = ""
    """Where the document came from (corpus name or file)."""
    no_loss: tuple[tuple[int, int], ...] = ()
    """Token spans `[start, end)` that are never targets (e.g. a prompt)."""

    def segments(self) -> list[list]:
        """Runs of equal modality as `[name, start, end]`."""
        if len(self.modality) == 0:
            return []
        change = np.flatnonzero(np.diff(self.modality)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(self.modality)]])
        return [
            [MODALITY_NAMES[self.modality[s]], int(s), int(e)]
            for s, e in zip(starts, ends, strict=True)
        ]


@dataclass(frozen=True)
class TextRecord:
    key: str
    text: str
    source: str = ""


@dataclass(frozen=True)
class ImageRecord:
    key: str
    image: np.ndarray
    """`[H, W, 3]` uint8 RGB; centre-cropped and resized to the tokenizer's size."""
    text: str | None = None
    """A caption, before the image (image-text pairs); see `order`."""
    source: str = ""
    order: str = "text_first"
    """text_first: the caption, then the picture; image_first: the picture, then the caption
    (SEED-LLaMA's reversed pairs). A mask always comes last."""


@dataclass(frozen=True)
class ImageMaskRecord:
    key: str
    image: np.ndarray
    mask: np.ndarray
    """`[H, W]` {0, 1}, aligned with the image."""
    text: str | None = None
    source: str = ""
    void: int = 0
    """Pixels a segmentation set marks void / ignore (VOC's 255): in no class, 0 in the mask."""
    order: str = "text_first"
    """As ImageRecord.order: image_first reads `<img> ... </img> text <mask> ... </mask>`."""


@dataclass(frozen=True)
class VideoRecord:
    key: str
    frames: np.ndarray
    """`[N, H, W, 3]` uint8."""
    text: str | None = None
    source: str = ""
    order: str = "text_first"
    """As ImageRecord.order."""


@dataclass(frozen=True)
class DnaRecord:
    key: str
    sequence: str
    output: str | None = None
    """A task's output text (Omni-DNA framing), or None for plain DNA."""
    source: str = ""


@dataclass(frozen=True)
class SvgRecord:
    key: str
    svg: str
    source: str = ""
    text: str | None = None
    """A caption, before the code (text -> SVG): a raw sample's caption member."""


@dataclass(frozen=True)
class ModalityRecord:
    """A document of a registered modality (`mmfm.core.modalities`): `<s> [text] <open>
    codes <close> </s>`, the codes its spec's `encode` makes of `value`."""

    key: str
    modality: str
    """The registered modality's name."""
    value: Any
    text: str | None = None
    """Text before the span (a caption, a description), or None."""
    source: str = ""


TASK_PARTS = ("text", "dna", "svg", "image", "mask", "video")


@dataclass(frozen=True)
class TaskPart:
    kind: str
    """One of TASK_PARTS."""
    value: str | np.ndarray
    """text, dna, svg: the string; image `[H, W, 3]`, mask `[H, W]` {0, 1}, video
    `[N, H, W, 3]`: the pixels, already square."""


@dataclass(frozen=True)
class TaskRecord:
    """A prompt and its response (completion-only fine-tuning, Omni-DNA's multi-task SFT):
    the prompt's tokens are never targets, so only the response is learned."""

    key: str
    prompt: tuple[TaskPart, ...]
    response: tuple[TaskPart, ...]
    source: str = ""


Record = (
    TextRecord
    | DnaRecord
    | SvgRecord
    | ImageRecord
    | ImageMaskRecord
    | VideoRecord
    | TaskRecord
    | ModalityRecord
)
