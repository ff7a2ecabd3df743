"""What a stream reads and how: a source's shards and options (`SourceSpec`), and the
settings every stream of a run shares (`StreamSettings`).

Both are built from the configuration (`from_config`) and have no defaults of their own:
`DataConfig` and `SourceConfig` (config/schema.py) are the one place a default lives, so a
test or benchmark that builds its streams gets what a user gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmfm.config.schema import DataConfig, RawFields, SourceConfig
from mmfm.data.decompose import step_length
from mmfm.data.packing import modality_weight_table
from mmfm.tokenization.shaping import Shaping


@dataclass(frozen=True)
class SourceSpec:
    name: str
    urls: tuple[str, ...]
    weight: float
    max_epochs: int
    """Repetition cap: passes over this source (each stream reads its share of each); 0: none."""
    tokenize: str
    """Tokenizer recipe of raw shards, tokenized as they are read (raw_stream.py); empty:
    shards of `mmfm prepare`."""
    fields: RawFields
    """Raw shards: which members make which record."""
    tokenize_batch: int
    """Raw shards: samples tokenized together (their pictures in one batched call); the
    windows are fixed in the unit (samples 0-15, 16-31, ...), so a resumed read encodes the
    same batches and gives the same codes."""
    tokenize_device: str
    """Raw shards: where the visual tokenizers run."""
    max_length: int
    """Raw DNA: windows of at most this many bases (as mmfm prepare's max_length)."""
    shaping: Shaping | None
    """Raw shards: condition dropout, caption order and completion-only of the records, as
    mmfm prepare's sources shape them (drawn from the settings' seed, the name and the key);
    None: shaped as they are."""
    ordered: bool
    """Give this source's documents out of the shuffle buffer oldest first (`_pull`)."""

    @classmethod
    def from_config(cls, source: SourceConfig, urls: Sequence[str]) -> SourceSpec:
        """The source `source` of the configuration, whose paths resolved to `urls`."""
        rule = Shaping(
            source.uncond_ratio, source.order, source.reverse_ratio, source.completion_only
        )
        return cls(
            name=source.name,
            urls=tuple(urls),
            weight=source.weight,
            max_epochs=source.max_epochs,
            tokenize=source.tokenize,
            fields=source.fields,
            tokenize_batch=source.tokenize_batch,
            tokenize_device=source.tokenize_device,
            max_length=source.max_length,
            shaping=rule if rule.draws or rule.completion_only else None,
            ordered=source.ordered,
        )

    @property
    def members(self) -> tuple[str, ...]:
        """The member extensions a raw source reads; () for prepared shards."""
        return self.fields.members() if self.tokenize else ()


@dataclass(frozen=True)
class StreamSettings:
    n_streams: int
    """One stream per row of the global batch (`train.global_batch_size`)."""
    seq_len: int
    seed: int
    weights: tuple[float, ...]
    """Loss weight per modality."""
    shuffle_buffer: int
    shuffle_buffer_tokens: int
    """Tokens the shuffle buffer may hold (and the pack buffer: each at least one document)."""
    packing: str
    pack_buffer: int
    long_docs: str
    max_error_rate: float
    vocab_size: int
    """Token ids must lie in [0, vocab_size) (0: not checked); others are bad samples."""
    read_timeout_s: float
    """A streamed shard that sends no byte for this long is counted (timeout_shard) and left."""
    max_member: int
    """Bytes of the largest tar member read; a sample with a larger one is `too_large`."""
    attention: str
    """Rows as documents or as one context (`data.attention`, packing.py)."""
    buckets: tuple[int, ...]
    """packing=decompose: the row lengths (decompose.py)."""
    remainder: str
    curriculum: str
    num_cycles: int
    curriculum_steps: int
    """The run's length in steps (`train.steps`), which grow_p2 cuts into its cycles."""
    bucket_odds: tuple[float, ...] = ()
    """The natural curriculum's odds per bucket (`natural_odds`), measured by the loader
    (not configured): () until then."""

    @classmethod
    def from_config(
        cls, data: DataConfig, *, n_streams: int, seed: int, steps: int, vocab_size: int
    ) -> StreamSettings:
        """The settings of `data`, for a run of `n_streams` streams (train.global_batch_size),
        `seed` (train.seed) and `steps` (train.steps) checking ids against `vocab_size`
        (model.vocab_size; 0: not checked)."""
        return cls(
            n_streams=n_streams,
            seq_len=data.seq_len,
            seed=seed,
            weights=tuple(modality_weight_table(data.loss_weights).tolist()),
            shuffle_buffer=data.shuffle_buffer,
            shuffle_buffer_tokens=data.shuffle_buffer_tokens,
            packing=data.packing,
            pack_buffer=data.pack_buffer,
            long_docs=data.long_docs,
            max_error_rate=data.max_error_rate,
            vocab_size=vocab_size,
            read_timeout_s=data.read_timeout_s,
            max_member=int(data.max_member_mb * 2**20),
            attention=data.attention,
            buckets=tuple(data.buckets),
            remainder=data.remainder,
            curriculum=data.curriculum,
            num_cycles=data.num_cycles,
            curriculum_steps=steps,
        )

    def row_length(self, step: int) -> int:
        """The row length of `step` (seq_len but under decompose)."""
        if self.packing != "decompose":
            return self.seq_len
        return step_length(
            step, self.buckets, self.curriculum, self.num_cycles, self.curriculum_steps,
            self.bucket_odds, self.seed,
        )  # fmt: skip
