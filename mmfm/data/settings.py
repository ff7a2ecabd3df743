"""What a stream reads and how: a source's shards and options (`SourceSpec`), and the
settings every stream of a run shares (`StreamSettings`)."""

from __future__ import annotations

from dataclasses import dataclass

from mmfm.config.schema import RawFields
from mmfm.data.decompose import step_length
from mmfm.data.tario import MAX_MEMBER
from mmfm.tokenization.shaping import Shaping


@dataclass(frozen=True)
class SourceSpec:
    name: str
    urls: tuple[str, ...]
    weight: float
    max_epochs: int = 0
    """Repetition cap: passes over this source (each stream reads its share of each); 0: none."""
    tokenize: str = ""
    """Tokenizer recipe of raw shards, tokenized as they are read (raw_stream.py); empty:
    shards of `mmfm prepare`."""
    fields: RawFields | None = None
    """Raw shards: which members make which record."""
    tokenize_batch: int = 16
    """Raw shards: samples tokenized together (their pictures in one batched call); the
    windows are fixed in the unit (samples 0-15, 16-31, ...), so a resumed read encodes the
    same batches and gives the same codes."""
    tokenize_device: str = "cpu"
    """Raw shards: where the visual tokenizers run."""
    max_length: int = 0
    """Raw DNA: windows of at most this many bases (as mmfm prepare's max_length)."""
    shaping: Shaping | None = None
    """Raw shards: condition dropout, caption order and completion-only of the records, as
    mmfm prepare's sources shape them (drawn from the settings' seed, the name and the key)."""
    ordered: bool = False
    """Give this source's documents out of the shuffle buffer oldest first (`_pull`)."""

    @property
    def members(self) -> tuple[str, ...]:
        """The member extensions a raw source reads; () for prepared shards."""
        return (self.fields or RawFields()).members() if self.tokenize else ()


@dataclass(frozen=True)
class StreamSettings:
    n_streams: int
    seq_len: int
    seed: int
    weights: tuple[float, ...]
    """Loss weight per modality."""
    shuffle_buffer: int = 64
    shuffle_buffer_tokens: int = 1 << 20
    """Tokens the shuffle buffer may hold (and the pack buffer: each at least one document)."""
    packing: str = "best_fit"
    pack_buffer: int = 32
    long_docs: str = "split"
    max_error_rate: float = 0.01
    vocab_size: int = 0
    """Token ids must lie in [0, vocab_size) (0: not checked); others are bad samples."""
    read_timeout_s: float = 300.0
    """A streamed shard that sends no byte for this long is counted (timeout_shard) and left."""
    max_member: int = MAX_MEMBER
    """Bytes of the largest tar member read; a sample with a larger one is `too_large`."""
    attention: str = "document"
    """Rows as documents or as one context (`data.attention`, packing.py)."""
    buckets: tuple[int, ...] = ()
    """packing=decompose: the row lengths (decompose.py)."""
    remainder: str = "drop"
    curriculum: str = "grow_p2"
    num_cycles: int = 8
    curriculum_steps: int = 1
    """The run's length in steps (`train.steps`), which grow_p2 cuts into its cycles."""
    bucket_odds: tuple[float, ...] = ()
    """The natural curriculum's odds per bucket (`natural_odds`)."""

    def row_length(self, step: int) -> int:
        """The row length of `step` (seq_len but under decompose)."""
        if self.packing != "decompose":
            return self.seq_len
        return step_length(
            step, self.buckets, self.curriculum, self.num_cycles, self.curriculum_steps,
            self.bucket_odds, self.seed,
        )  # fmt: skip
