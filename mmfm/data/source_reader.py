"""One stream's documents of one source, epoch after epoch, until the source's
`max_epochs`: its share of each epoch's deal (deal.py), read unit by unit (units.py)."""

from __future__ import annotations

from collections.abc import Iterator

from mmfm.core.errors import DataError
from mmfm.data.deal import Unit, deal
from mmfm.data.packing import Pending
from mmfm.data.settings import SourceSpec, StreamSettings
from mmfm.data.skips import Skips
from mmfm.data.units import read_source_unit

EMPTY_EPOCHS_LIMIT = 8
"""Epochs in a row without a document for a stream before its source is called too small."""


class SourceReader:
    """One stream's documents of one source, epoch after epoch (until `max_epochs`)."""

    def __init__(self, index: int, spec: SourceSpec, settings: StreamSettings, stream: int):
        self.index, self.spec, self.settings, self.stream = index, spec, settings, stream
        self.epoch = self.unit = self.sample = 0
        self._docs: Iterator | None = None
        self._empty_epochs = 0
        self._epoch_gave = False
        """Whether the current epoch gave a document yet."""
        self._units: tuple[int, tuple[Unit, ...]] = (-1, ())

    @property
    def exhausted(self) -> bool:
        return bool(self.spec.max_epochs) and self.epoch >= self.spec.max_epochs

    def units(self, epoch: int) -> tuple[Unit, ...]:
        """This stream's share of `epoch` (see `deal`)."""
        if self._units[0] != epoch:
            s = self.settings
            shares = deal(
                self.spec.urls, s.n_streams, epoch, s.seed + self.index, self.spec.members
            )
            self._units = (epoch, shares[self.stream])
        return self._units[1]

    def next(self, skips: Skips) -> Pending | None:
        """The next document of this epoch; None at its end (the reader then stands at the
        start of the next epoch) or once the cap is reached."""
        while not self.exhausted:
            if self._docs is None:
                units = self.units(self.epoch)
                if self.unit >= len(units):
                    self._end_epoch()
                    return None
                unit = units[self.unit]
                self._docs = read_source_unit(self.spec, unit, self.sample, skips, self.settings)
            item = next(self._docs, None)
            if item is None:
                self._docs = None
                self.unit, self.sample = self.unit + 1, 0
                continue
            kept, doc = item
            self.sample = kept + 1
            self._epoch_gave = True
            return Pending(doc, (self.index, self.epoch, self.unit, kept), self.index)
        return None

    def _end_epoch(self) -> None:
        """Next epoch; a source that keeps giving this stream nothing would loop forever."""
        self._empty_epochs = 0 if self._epoch_gave else self._empty_epochs + 1
        if self._empty_epochs >= EMPTY_EPOCHS_LIMIT:
            raise DataError(
                f"source '{self.spec.name}' gave stream {self.stream} no document in "
                f"{EMPTY_EPOCHS_LIMIT} epochs in a row: its {len(self.spec.urls)} shard(s) hold "
                f"too few readable documents for {self.settings.n_streams} streams (one per row "
                "of the global batch; a shard's documents are dealt out across the streams). "
                "Add documents, lower train.global_batch_size, or drop the source"
            )
        self._epoch_gave = False
        self.epoch, self.unit, self.sample = self.epoch + 1, 0, 0

    def state(self) -> list[int]:
        return [self.epoch, self.unit, self.sample]
