"""Building a tokenized document span by span, each span tagged with its modality."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from mmfm.core.types import Document, Modality


class DocumentBuilder:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.modality: list[int] = []

    def add(self, ids: Iterable[int], modality: Modality) -> DocumentBuilder:
        ids = list(ids)
        self.tokens += ids
        self.modality += [int(modality)] * len(ids)
        return self

    def build(self, key: str, source: str = "") -> Document:
        return Document(
            np.array(self.tokens, dtype=np.int32),
            np.array(self.modality, dtype=np.uint8),
            key,
            source,
        )
