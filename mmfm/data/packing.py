"""Greedy packing of documents into fixed-length rows.

Documents are laid end to end. One that does not fit the rest of a row starts the next row
(the rest is padding); one longer than a row is split into row-sized pieces. The packer
keeps no state between rows except "how many tokens of the current document are placed",
which is what makes the loader's resume exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from mmfm.data.batch import IGNORE_INDEX, MODALITY_NAMES, Batch, Modality

PAD_ID = 0


def modality_weight_table(loss_weights: Mapping[str, float]) -> np.ndarray:
    """Loss weight indexed by `Modality`; unlisted modalities weigh 1."""
    return np.array([loss_weights.get(name, 1.0) for name in MODALITY_NAMES], dtype=np.float32)


@dataclass
class RowBuilder:
    """One row being filled; `add` places a piece of a document, `finish` pads the rest."""

    seq_len: int
    weights: np.ndarray

    def __post_init__(self) -> None:
        n = self.seq_len
        self.tokens = np.full(n, PAD_ID, dtype=np.int64)
        self.labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
        self.positions = np.zeros(n, dtype=np.int64)
        self.doc_ids = np.zeros(n, dtype=np.int64)
        self.loss_weights = np.zeros(n, dtype=np.float32)
        self.modality = np.zeros(n, dtype=np.int64)
        self.used = 0
        self.n_docs = 0

    @property
    def free(self) -> int:
        return self.seq_len - self.used

    def add(self, tokens: np.ndarray, modality: np.ndarray, start: int, end: int) -> None:
        """Place tokens[start:end]; its targets are the following tokens of the document."""
        n, lo = end - start, self.used
        hi = lo + n
        self.tokens[lo:hi] = tokens[start:end]
        self.positions[lo:hi] = np.arange(n)
        self.doc_ids[lo:hi] = self.n_docs
        # Targets: tokens[start+1 : end+1]; the document's last token has none.
        n_targets = min(end + 1, len(tokens)) - (start + 1)
        self.labels[lo : lo + n_targets] = tokens[start + 1 : start + 1 + n_targets]
        target_modality = modality[start + 1 : start + 1 + n_targets]
        self.modality[lo : lo + n_targets] = target_modality
        self.loss_weights[lo : lo + n_targets] = self.weights[target_modality]
        self.used, self.n_docs = hi, self.n_docs + 1

    def finish(self) -> dict[str, np.ndarray]:
        """The row as arrays; padding is one more document with no targets."""
        self.doc_ids[self.used :] = self.n_docs
        self.positions[self.used :] = np.arange(self.free)
        self.modality[self.used :] = Modality.TEXT
        return {
            "tokens": self.tokens,
            "labels": self.labels,
            "positions": self.positions,
            "doc_ids": self.doc_ids,
            "loss_weights": self.loss_weights,
            "modality": self.modality,
        }


def collate(rows: list[dict[str, np.ndarray]]) -> Batch:
    return Batch(**{name: torch.from_numpy(np.stack([r[name] for r in rows])) for name in rows[0]})
