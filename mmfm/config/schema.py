"""The one configuration tree of mmfm.

Every section is a dataclass whose fields carry a docstring (shown by `mmfm config --doc`).
Each section checks its own fields in `__post_init__`; `Config.__post_init__` checks the
combinations that span sections. Messages say which field to change and how.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mmfm.config.layout import LayoutError, layout_problems
from mmfm.core.errors import ConfigError
from mmfm.core.types import MODALITY_NAMES

ATTENTION_BACKENDS = ("auto", "sdpa_masked", "docs", "flex")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
LR_DECAYS = ("cosine", "linear", "constant")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}")


def _require_positive(section: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _require(value > 0, f"{prefix}.{name} must be positive, got {value}")


ROUTING_KINDS = ("text", "special")
"""Kinds of id range besides the codebooks' modalities (`model.mot.ranges`)."""


@dataclass
class MotConfig:
    """Mixture-of-Transformers (Liang et al. 2024, arXiv 2411.04996): every block holds, per
    group of modalities, its own attention projections, norms and feed-forward; attention stays
    global over the whole packed row; the embeddings and the output layer are shared. A token
    is routed by the vocabulary range of its input id (docs/sparse_models.md)."""

    groups: dict[str, list[str]] = field(default_factory=dict)
    """Named groups of modalities, e.g. {language: [text, dna, svg], vision: [image, mask,
    video]}: every modality (the built-in ones and those registered) in exactly one group,
    svg with text (SVG code is text ids). One group is the dense model. Empty: dense."""
    specials: str = ""
    """The group of the special and delimiter tokens (<bos>, <img>, </img>, <sep>, ...),
    whose ids belong to no modality's range; empty: the group holding text."""
    share_attention: bool = False
    """One set of q/k/v/o projections for every group (the norms and the feed-forward stay
    per group); false: each group has its own (the paper's and BAGEL's split)."""
    ranges: list[str] = field(default_factory=list)
    """The vocabulary's id ranges as `first_id:kind` from id 0 upwards (kind: text, special
    or a codebook's modality), e.g. [0:special, 8:text, 264:image, 328:dna] for the demo
    corpus. Empty: filled by mmfm train from data.vocab (or the demo corpus's layout) and
    saved with the run's config."""

    def __post_init__(self) -> None:
        if not self.groups:
            _require(
                not self.share_attention and not self.specials and not self.ranges,
                "model.mot.share_attention / specials / ranges need model.mot.groups: name the "
                "groups of modalities, e.g. {language: [text, dna, svg], vision: [image, mask, "
                "video]}",
            )
            return
        owner: dict[str, str] = {}
        for group, members in self.groups.items():
            _require(
                group.isidentifier() and bool(members),
                f"model.mot.groups.{group}: a group is an identifier with at least one modality",
            )
            for name in members:
                _require(
                    name in MODALITY_NAMES,
                    f"model.mot.groups.{group} names {name!r}, which is no modality: choose "
                    f"among {', '.join(MODALITY_NAMES)}",
                )
                _require(
                    name not in owner,
                    f"model.mot.groups puts {name} in both {owner.get(name)} and {group}: "
                    "keep it in one",
                )
                owner[name] = group
        missing = [n for n in MODALITY_NAMES if n not in owner]
        _require(
            not missing,
            f"model.mot.groups leaves out {', '.join(missing)}: put every modality in a group",
        )
        _require(
            owner["svg"] == owner["text"],
            f"model.mot.groups puts svg ({owner['svg']}) apart from text ({owner['text']}): SVG "
            "code is text ids and routing goes by id, so put svg in text's group",
        )
        _require(
            not self.specials or self.specials in self.groups,
            f"model.mot.specials={self.specials!r} is no group of model.mot.groups "
            f"({', '.join(self.groups)})",
        )
        self.id_groups()  # checks ranges

    @property
    def enabled(self) -> bool:
        return bool(self.groups)

    def group_of(self, kind: str) -> int:
        """The index of the group of id-range kind `kind` (text, special or a modality)."""
        if kind == "special" and self.specials:
            return list(self.groups).index(self.specials)
        kind = "text" if kind == "special" else kind
        return next(i for i, members in enumerate(self.groups.values()) if kind in members)

    def id_groups(self) -> list[tuple[int, int]]:
        """(first id, group index) of each id range in `ranges`, increasing; adjacent ranges of
        one group merged."""
        out: list[tuple[int, int]] = []
        previous = -1
        for entry in self.ranges:
            first, _, kind = str(entry).partition(":")
            _require(
                first.strip().isdigit() and kind in (*ROUTING_KINDS, *MODALITY_NAMES),
                f"model.mot.ranges entry {entry!r}: write first_id:kind, kind one of "
                f"{', '.join((*ROUTING_KINDS, *MODALITY_NAMES))}",
            )
            start, group = int(first), self.group_of(kind)
            _require(
                start == 0 if previous < 0 else start > previous,
                f"model.mot.ranges must start at 0 and increase: {entry!r}",
            )
            previous = start
            if not out or out[-1][1] != group:
                out.append((start, group))
        return out


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    """Rows of the embedding table: every token id of the unified vocabulary is below it."""
    dim: int = 512
    """Hidden size of the residual stream."""
    n_layers: int = 8
    """Number of transformer blocks."""
    n_heads: int = 8
    """Number of query heads; must divide `dim`."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; must divide `n_heads`. None: same as n_heads."""
    ffn_dim: int | None = None
    """Hidden size of the SwiGLU MLP. None: Llama's rule, 8/3 * dim rounded up to
    `ffn_multiple_of`."""
    ffn_multiple_of: int = 256
    """Rounding for the automatic `ffn_dim`."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding (Llama 2: 1e4, Llama 3: 5e5, LWM: up to 5e7)."""
    max_seq_len: int = 4096
    """Longest document (in tokens) the model is meant for; data.seq_len may not exceed it.
    Exported as max_position_embeddings."""
    tie_embeddings: bool = False
    """Use the input embedding matrix as the output projection."""
    qkv_bias: bool = False
    """Biases on the query/key/value projections (Qwen2 has them; Llama and Mistral not)."""
    attention: str = "auto"
    """Attention kernel, all exact and document-masked: `docs` (causal SDPA per document,
    equal lengths batched; CPU default), `flex` (FlexAttention with a document block mask,
    compiled; GPU default, no backward on CPU), `sdpa_masked` (dense SDPA with an explicit
    mask: the slow reference), or `auto`."""
    init_std: float = 0.02
    """Standard deviation of the truncated-normal init; output projections of each block are
    further scaled by 1/sqrt(2 * n_layers)."""
    neftune_alpha: float = 0.0
    """NEFTune (Jain et al. 2023) for fine-tuning: in training only, uniform noise in
    [-1, 1] x alpha / sqrt(L x dim) is added to the input embeddings, L being the row length
    (data.seq_len); off in eval and generation. The paper uses 5-15; 0: off."""
    mot: MotConfig = field(default_factory=MotConfig)
    """Mixture-of-Transformers: per-modality-group blocks (empty groups: a dense model)."""

    def __post_init__(self) -> None:
        _require_positive(self, "model", "vocab_size", "dim", "n_layers", "n_heads", "max_seq_len")
        _require_positive(self, "model", "ffn_multiple_of", "rope_theta", "init_std", "norm_eps")
        _require(
            self.dim % self.n_heads == 0,
            f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads}): "
            "change one of them",
        )
        _require(
            self.head_dim % 2 == 0,
            f"model.dim / model.n_heads = {self.head_dim} must be even for rotary embeddings",
        )
        kv = self.num_kv_heads
        _require(
            kv > 0 and self.n_heads % kv == 0,
            f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({kv}): "
            f"choose n_kv_heads among the divisors of {self.n_heads}",
        )
        _require(self.ffn_dim is None or self.ffn_dim > 0, "model.ffn_dim must be positive")
        _require_choice("model.attention", self.attention, ATTENTION_BACKENDS)
        _require(self.neftune_alpha >= 0, "model.neftune_alpha must be >= 0 (0: off)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def num_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        m = self.ffn_multiple_of
        return m * -(-int(8 * self.dim / 3) // m)


@dataclass
class SourceConfig:
    name: str = "data"
    """Name of the source in the metrics (data/mix/<name>)."""
    paths: list[str] = field(default_factory=list)
    """Its shards: directories, files, brace patterns (`web-{000000..000099}.tar`),
    `http(s)://` URLs, `pipe:` commands, or `builtin:demo` (`builtin:demo:held_out`: its
    held-out shard); with kind megatron: prefixes of .bin/.idx pairs
    (`/data/corpus_text_document`), directories of them or globs."""
    kind: str = "webdataset"
    """webdataset (tar shards) or megatron (Megatron-LM indexed datasets, read by megatron-core:
    pip install 'mmfm[megatron]'; text unless written by mmfm prepare with format: megatron)."""
    weight: float = 1.0
    """Relative share of tokens drawn from this source (normalised over the sources)."""
    max_epochs: int = 0
    """Repetition cap: passes over this source before it stops contributing; 0: no cap."""
    tokenize: str = ""
    """Tokenizer recipe (tokenizers/multimodal.yaml) of raw WebDataset shards (000123.txt,
    .svg, .jpg + .json, ...), which the loader workers then decode and tokenize as they read
    them, by `fields`; its trained vocabulary is the source's. Empty: shards of mmfm prepare."""
    fields: RawFields = field(default_factory=lambda: RawFields())
    """With `tokenize`: which members make which record, as for mmfm prepare's webdataset
    sources, e.g. {record: text, text: txt}."""
    ordered: bool = False
    """Keep this source's documents in shard order inside each stream (shards of
    `mmfm prepare` with `order: related`): the shuffle buffer still mixes the sources and the
    deal still shuffles the shards between streams, but gives this source's documents out
    oldest first."""
    tokenize_batch: int = 16
    """With `tokenize`: samples read ahead and tokenized together, their pictures (images,
    masks, video frames) encoded in one batched call of the visual tokenizers (1: alone)."""
    tokenize_device: str = "cpu"
    """With `tokenize`: where the visual tokenizers run: cpu, or cuda (the training device)
    with data.num_workers=0 only."""
    max_length: int = 0
    """With `tokenize` and fields.record dna: windows of at most this many bases, cut as
    mmfm prepare's max_length cuts them (0: whole sequences)."""
    uncond_ratio: float = 0.0
    """With `tokenize`, captioned pictures (fields.record image-text, image-mask, video): the
    share of records whose caption is dropped (condition dropout), as a prepare recipe's
    sources[].uncond_ratio. Drawn per record from (train.seed, this source's name, the
    sample's key): the documents `mmfm prepare` makes with that seed and source name."""
    order: str = "text_first"
    """With `tokenize`, captioned pictures: text_first (the caption, then the picture),
    image_first (the picture, then the caption) or both (each record image_first with
    probability `reverse_ratio`), as a prepare recipe's sources[].order."""
    reverse_ratio: float = 0.5
    """order: both: the share of records put image_first."""
    completion_only: bool = False
    """With `tokenize`: each record with a condition becomes a prompt / response task whose
    prompt is never a target, as a prepare recipe's sources[].completion_only: caption ->
    picture (picture -> caption when image_first), image and caption -> mask, caption -> SVG.
    Records without a condition (no caption member) keep every target."""

    def __post_init__(self) -> None:
        _require(bool(self.name), "data.sources: every source needs a name")
        _require(bool(self.paths), f"data.sources: source {self.name!r} has no paths")
        _require(self.weight > 0, f"data.sources: {self.name!r} weight must be > 0")
        _require(self.max_epochs >= 0, f"data.sources: {self.name!r} max_epochs must be >= 0")
        _require(
            not self.tokenize or not any(p.startswith("builtin:") for p in self.paths),
            f"data.sources: {self.name!r}: builtin: shards are prepared already; drop tokenize",
        )
        _require_choice(f"data.sources.{self.name}.kind", self.kind, ("webdataset", "megatron"))
        _require(
            self.kind == "webdataset" or not self.tokenize,
            f"data.sources: {self.name!r}: a megatron source holds token ids; drop tokenize",
        )
        _require(
            self.tokenize_batch >= 1 and self.max_length >= 0,
            f"data.sources: {self.name!r}: tokenize_batch must be >= 1, max_length >= 0",
        )
        _require(
            self.tokenize_device == "cpu" or self.tokenize_device.startswith("cuda"),
            f"data.sources: {self.name!r}: tokenize_device must be cpu or cuda[:N], "
            f"not {self.tokenize_device!r}",
        )
        self._check_shaping()

    def _check_shaping(self) -> None:
        where = f"data.sources: {self.name!r}:"
        shaped = self.uncond_ratio > 0 or self.order != "text_first"
        _require(
            bool(self.tokenize) or not (shaped or self.completion_only),
            f"{where} uncond_ratio, order and completion_only shape raw shards tokenized in the "
            "stream (tokenize); shards of mmfm prepare are shaped already: set them in its recipe",
        )
        check_shaping(f"{where} ", self.order, self.uncond_ratio, self.reverse_ratio)
        _require(
            self.fields.record in CAPTIONED_RECORDS or not shaped,
            f"{where} uncond_ratio and order apply to captioned pictures (fields.record "
            f"{', '.join(CAPTIONED_RECORDS)}), not to record {self.fields.record}: remove them",
        )


TRAINING_SOURCE = "data"
"""The name of the one source of `data.paths`."""
HELD_OUT_SOURCE = "eval"
"""The name of the one held-out source of `eval.paths` (and of `mmfm eval`'s data)."""


def _source_list(paths: list[str], sources: list[SourceConfig], name: str) -> list[SourceConfig]:
    return list(sources) or [SourceConfig(name=name, paths=list(paths))]


@dataclass
class DataConfig:
    ALTERNATIVES: ClassVar[tuple[str, ...]] = ("paths", "sources")
    """Fields of which a later layer (an override after the recipe) setting one drops the
    others an earlier one set (config/loading.py): the last word wins, as for any key."""

    paths: list[str] = field(default_factory=list)
    """Shards of one source (shorthand for a single entry in `sources`): directories,
    files, brace patterns (`shards-{000000..000009}.tar`), `http(s)://`, `pipe:` or
    `builtin:demo` (the generated demo corpus; `builtin:demo:held_out`, its held-out shard)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several sources mixed by weight (instead of `paths`)."""
    seq_len: int = 2048
    """Tokens per packed row."""
    loss_weights: dict[str, float] = field(default_factory=dict)
    """Loss weight per target modality (text, image, mask, dna, svg, video); unlisted
    modalities weigh 1.0, 0 removes a modality from the loss."""
    cache_dir: str = "~/.cache/mmfm"
    """Where built-in datasets (`builtin:...` paths) are generated."""
    vocab: str | None = None
    """vocab.json of the tokenizers the shards were made with (see tokenizers/); copied into
    the run dir and every checkpoint. model.vocab_size must cover it. A source prepared with
    another vocabulary (its manifest.json or vocab.json says so), or a resumed / init_from
    checkpoint of another, is refused at start-up."""
    shuffle_buffer: int = 64
    """Documents each data stream shuffles among (one stream per global-batch row)."""
    shuffle_buffer_tokens: int = 1 << 20
    """Tokens a stream's shuffle buffer may hold, and its pack buffer too (each takes at least
    one document): a source of a few huge documents fills neither with gigabytes."""
    packing: str = "best_fit"
    """best_fit (largest pending document that fits; fills rows), greedy (arrival order) or
    decompose (Dataset Decomposition: one document per row, rows of one bucket length per
    step, see data.buckets)."""
    pack_buffer: int = 32
    """Pending documents best_fit chooses from, per stream."""
    long_docs: str = "split"
    """Documents longer than data.seq_len: split (row-sized pieces) or drop (counted)."""
    attention: str = "document"
    """document (a token attends to its own document) or row (to the earlier documents of its
    row too, positions counting on across the row: In-Context Pretraining). Targets stay per
    document either way."""
    buckets: list[int] = field(default_factory=list)
    """packing=decompose: the row lengths, consecutive powers of two, shortest first (e.g.
    [256, 512, ..., 8192]); the largest must divide data.seq_len. Every step holds
    train.global_batch_size x data.seq_len tokens, in rows of one bucket length."""
    remainder: str = "drop"
    """packing=decompose: a document's tail shorter than the smallest bucket: drop (counted,
    data/dropped_tokens) or pad (a row of the smallest bucket, padded)."""
    curriculum: str = "natural"
    """packing=decompose: the row length of each step. natural (drawn with each bucket's
    share of the tokens), grow_p2 (cycles from the shortest bucket to the longest) or fixed
    (the largest bucket)."""
    num_cycles: int = 8
    """packing=decompose, curriculum=grow_p2: short-to-long cycles over train.steps."""
    num_workers: int = 1
    """Loader processes per rank (0: in the training process)."""
    prefetch: int = 2
    """Steps each loader worker may run ahead."""
    max_error_rate: float = 0.01
    """Stop when more than this fraction of a stream's documents were bad (after 100); a
    damaged or cut shard counts the documents it lost (its manifest.json says how many)."""
    read_timeout_s: float = 300.0
    """A streamed shard (http, pipe:) that sends no byte for this long is counted
    (`timeout_shard`) and left; a warning is logged every min(30, half of it) seconds of waiting.
    A stream that gives fewer than 64 KiB in this much waiting (a drip) counts the same."""
    max_member_mb: float = 256.0
    """Largest tar member a shard may hold (in MiB, after gzip): a sample with a larger member
    is skipped without being held and counted (`too_large`)."""

    def __post_init__(self) -> None:
        _require_positive(self, "data", "seq_len", "shuffle_buffer", "pack_buffer", "prefetch")
        _require_positive(self, "data", "shuffle_buffer_tokens")
        _require_choice("data.packing", self.packing, ("best_fit", "greedy", "decompose"))
        _require_choice("data.remainder", self.remainder, ("drop", "pad"))
        _require_choice("data.curriculum", self.curriculum, ("natural", "grow_p2", "fixed"))
        _require(self.num_cycles > 0, "data.num_cycles must be positive")
        if self.packing == "decompose":
            self._check_buckets()
        _require_choice("data.long_docs", self.long_docs, ("split", "drop"))
        _require_choice("data.attention", self.attention, ("document", "row"))
        _require(self.num_workers >= 0, "data.num_workers must be >= 0")
        _require(0 <= self.max_error_rate <= 1, "data.max_error_rate must be within [0, 1]")
        _require(self.read_timeout_s > 0, "data.read_timeout_s must be > 0 (seconds)")
        _require(self.max_member_mb > 0, "data.max_member_mb must be > 0 (MiB)")
        _require(
            not (self.paths and self.sources),
            "set data.paths (one source) or data.sources (several), not both",
        )
        names = [s.name for s in self.sources]
        _require(len(set(names)) == len(names), f"data.sources names must be unique: {names}")
        for s in self.sources:
            _require(
                s.tokenize_device == "cpu" or self.num_workers == 0,
                f"data.sources: {s.name!r}: tokenize_device={s.tokenize_device} needs "
                f"data.num_workers=0 (not {self.num_workers}): each loader worker would hold "
                "its own CUDA context and tokenizers on the training GPU; or use cpu",
            )
        _check_modality_weights("data.loss_weights", self.loss_weights)

    def _check_buckets(self) -> None:
        b = self.buckets
        _require(
            bool(b),
            "data.packing=decompose needs data.buckets: the row lengths, consecutive powers of "
            "two up to data.seq_len (e.g. [256, 512, 1024, 2048])",
        )
        powers = all(x > 0 and x & (x - 1) == 0 for x in b)
        _require(
            powers and all(b[i + 1] == 2 * b[i] for i in range(len(b) - 1)),
            f"data.buckets {b} must be consecutive powers of two, shortest first (e.g. "
            "[256, 512, 1024])",
        )
        _require(
            self.seq_len % b[-1] == 0,
            f"data.buckets: the largest ({b[-1]}) must divide data.seq_len ({self.seq_len}), "
            "the tokens of every stream in every step",
        )
        _require(
            self.attention == "document",
            "data.attention=row joins the documents of a row, and data.packing=decompose "
            "puts one document in each: use data.attention=document",
        )

    def source_list(self) -> list[SourceConfig]:
        """`sources`, or `paths` as one source named `data` (`TRAINING_SOURCE`)."""
        return _source_list(self.paths, self.sources, TRAINING_SOURCE)


STAGE_SET_KEYS = ("train.run_dir", "train.steps", "train.init_from", "train.init_data",
                  "train.resume", "train.stages")  # fmt: skip
"""Keys a context stage of train.stages gets from the run, not from its own entry."""


def _check_stage(k: int, stage: dict[str, Any]) -> None:
    steps = stage.get("steps")
    _require(
        isinstance(steps, int) and not isinstance(steps, bool) and steps > 0,
        f"train.stages[{k}] needs steps: a positive number of steps (got {steps!r})",
    )
    taken = sorted(key for key in stage if key in STAGE_SET_KEYS)
    _require(
        not taken,
        f"train.stages[{k}] sets {taken}: a stage's run dir, steps and starting checkpoint "
        "come from the run (<run_dir>/stage-<k>, its steps, the last stage's final checkpoint)",
    )


def _check_modality_weights(name: str, weights: dict[str, float]) -> None:
    for modality, weight in weights.items():
        _require(
            modality in MODALITY_NAMES,
            f"{name} has unknown modality {modality!r}; known: {', '.join(MODALITY_NAMES)}",
        )
        _require(weight >= 0, f"{name}.{modality} must be >= 0, got {weight}")


LOSS_NORMALIZATIONS = ("tokens", "modality_mean")


@dataclass
class LossConfig:
    normalize: str = "tokens"
    """How a step's per-target losses become one number. tokens: sum of weighted losses over
    the step's targets with weight > 0 (every target counts the same). modality_mean: the
    mean over the modalities present in the step of each modality's mean weighted loss (LWM:
    0.5 x (image CE + text CE)), weighted by `modality_weights`: a modality's share no longer
    depends on how many tokens it has."""
    modality_weights: dict[str, float] = field(default_factory=dict)
    """modality_mean only: weight of each modality's mean (text, image, mask, dna, svg,
    video; unlisted: 1.0), normalised over the modalities present in the step. Unlike
    data.loss_weights, which scale each target's loss before any normalisation (and 0 drops
    it from the counts), these weigh the per-modality means against each other."""
    z_loss: float = 0.0
    """Coefficient of the z-loss, z x logsumexp(logits)^2 per target (Chameleon, Lumina-mGPT:
    1e-5), weighted and normalised like the cross-entropy; logged apart as loss/z. 0: off."""

    def __post_init__(self) -> None:
        _require_choice("loss.normalize", self.normalize, LOSS_NORMALIZATIONS)
        _require(self.z_loss >= 0, f"loss.z_loss must be >= 0 (0: off), got {self.z_loss}")
        _require(
            not self.modality_weights or self.normalize == "modality_mean",
            "loss.modality_weights apply with loss.normalize=modality_mean only: set it, or "
            "use data.loss_weights to weigh the targets of a modality",
        )
        _check_modality_weights("loss.modality_weights", self.modality_weights)


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    """Replicated data-parallel degree (the outer dimension of HSDP, e.g. across nodes)."""
    dp_shard: int = 1
    """Fully-sharded data-parallel degree (FSDP2: parameters, gradients and optimizer state
    sharded over these ranks). -1: what the other dimensions leave of the job (world size /
    (dp_replicate x cp x tp x pp)), resolved where the world size is known (at launch, or from
    `--nproc` and `mmfm slurm submit --nodes/--gpus-per-node`)."""
    cp: int = 1
    """Context-parallel degree: each rank holds 2 of the 2 x cp zigzag chunks of every row and
    attention runs as a ring; data.seq_len must be divisible by 2 x cp."""
    cp_attention: str = "ring"
    """Context-parallel attention: ring (keys/values travel rank to rank) or allgather (the
    baseline: every rank gathers all keys/values)."""
    cp_kernel: str = "auto"
    """Local kernel of the ring: sdpa (PyTorch's fused CPU flash attention), math (explicit
    softmax, any device), or auto (sdpa on CPU, math elsewhere)."""
    tp: int = 1
    """Tensor-parallel degree; must divide n_heads, n_kv_heads, vocab_size and the MLP size."""
    pp: int = 1
    """Pipeline-parallel degree (number of ranks the layer stack is split over)."""
    sequence_parallel: bool = True
    """With tp > 1, also shard norms and the residual stream along the sequence (Megatron SP);
    data.seq_len must then be divisible by tp."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: gpipe, 1f1b, interleaved_1f1b, interleaved_zb (zero bubble, looped
    stages) or zbv (zero bubble, V-shaped stages; pp_virtual_stages must be 2)."""
    pp_virtual_stages: int = 1
    """Stages per pipeline rank; > 1 for the interleaved schedules and zbv."""
    pp_layers: list[int] = field(default_factory=list)
    """Transformer blocks per stage, first stage first (length pp x pp_virtual_stages, summing
    to model.n_layers); empty: balanced, with any remainder given to the middle stages."""
    activation_checkpoint: int = 0
    """Recompute activations in the backward pass: 0 off, 1 every block, k every k-th block."""
    compile: bool = False
    """torch.compile each transformer block."""
    collective_timeout_s: float = 1800.0
    """Seconds a collective may wait for the other ranks before the job fails (NCCL's
    watchdog aborts it): long enough for checkpoint loading and compilation on rank 0, short
    enough that a hung node does not hold the whole allocation for hours."""

    def __post_init__(self) -> None:
        _require_positive(self, "parallel", "dp_replicate", "cp", "tp", "pp")
        _require(
            self.dp_shard > 0 or self.dp_shard == -1,
            f"parallel.dp_shard must be positive, or -1 to fill the job, got {self.dp_shard}",
        )
        _require_positive(self, "parallel", "pp_virtual_stages")
        _require_choice("parallel.pp_schedule", self.pp_schedule, PP_SCHEDULES)
        _require_choice("parallel.cp_attention", self.cp_attention, ("ring", "allgather"))
        _require_choice("parallel.cp_kernel", self.cp_kernel, ("auto", "sdpa", "math"))
        _require(self.activation_checkpoint >= 0, "parallel.activation_checkpoint must be >= 0")
        _require(self.collective_timeout_s > 0, "parallel.collective_timeout_s must be > 0")
        looped = self.pp_schedule in ("interleaved_1f1b", "interleaved_zb", "zbv")
        if self.pp > 1 and looped:
            _require(
                self.pp_virtual_stages >= 2,
                f"parallel.pp_schedule={self.pp_schedule} needs parallel.pp_virtual_stages >= 2",
            )
        if self.pp > 1 and not looped:
            _require(
                self.pp_virtual_stages == 1,
                f"parallel.pp_schedule={self.pp_schedule} runs one stage per rank: set "
                "parallel.pp_virtual_stages=1 or choose interleaved_1f1b",
            )
        if self.pp > 1 and self.pp_schedule == "zbv":
            _require(
                self.pp_virtual_stages == 2, "parallel.pp_schedule=zbv needs pp_virtual_stages=2"
            )
        if self.pp_layers:
            _require(
                len(self.pp_layers) == self.num_stages,
                f"parallel.pp_layers has {len(self.pp_layers)} entries; it needs one per stage "
                f"(pp x pp_virtual_stages = {self.num_stages})",
            )
            _require(all(n > 0 for n in self.pp_layers), "parallel.pp_layers must be positive")

    @property
    def world_size(self) -> int:
        assert self.dp_shard > 0, "parallel.dp_shard=-1: resolve it first (config/layout.py)"
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def dp_size(self) -> int:
        assert self.dp_shard > 0, "parallel.dp_shard=-1: resolve it first (config/layout.py)"
        return self.dp_replicate * self.dp_shard

    @property
    def num_stages(self) -> int:
        return self.pp * self.pp_virtual_stages


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr` at the end of the decay."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to `lr`."""
    decay: str = "cosine"
    """Shape of the decay after warmup: cosine, linear or constant."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices (not to norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still
    logged)."""

    def __post_init__(self) -> None:
        _require_positive(self, "optim", "lr", "eps")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio must be within [0, 1]")
        _require(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _require(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _require(self.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, f"optim.{name} must be within [0, 1)")
        _require_choice("optim.decay", self.decay, LR_DECAYS)


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to train for."""
    global_batch_size: int = 8
    """Packed rows per optimizer step, summed over data-parallel ranks and accumulation."""
    micro_batch_size: int = 8
    """Packed rows per forward/backward on one rank; gradient accumulation makes up the rest
    of the global batch."""
    seed: int = 0
    """Seed of the weight init and the data order; the same seed gives the same weights
    whatever the parallel layout."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    precision: str = "fp32"
    """fp32, or bf16 (autocast; parameters and optimizer state stay fp32)."""
    run_dir: str = "runs/default"
    """Directory of this run: resolved config, metrics.jsonl, tb/, checkpoints/, train.log."""
    resume: str = "none"
    """none (refuse a run_dir that already has checkpoints), auto (continue from the newest
    complete checkpoint if any), or the path of one checkpoint directory."""
    init_from: str | None = None
    """Start from the model weights of this checkpoint (e.g. one written by `mmfm convert
    from-hf`), with a fresh optimizer at step 0; ignored when resuming."""
    init_data: bool = False
    """With init_from: continue that checkpoint's data streams too, so that the next context
    stage (a new data.seq_len, model.rope_theta, parallel.cp) reads on where the last one
    stopped: no document lost or repeated. Needs the same global_batch_size and sources."""
    stages: list[dict[str, Any]] = field(default_factory=list)
    """Context stages in one run, e.g. `[{steps: 100}, {steps: 50, data.seq_len: 2048,
    model.max_seq_len: 2048, model.rope_theta: 1e6, parallel.cp: 2}]`: each stage's dotted
    keys override this config; stage k trains its `steps` in `<run_dir>/stage-<k>`, from the
    second on starting from the last stage's final checkpoint with its data streams (as
    init_from + init_data). A stopped run resumes inside the stage it stopped in. Every stage's
    config is checked at start-up; train.steps is then unused."""
    max_requeues: int = 20
    """Under SLURM, after a signal-triggered checkpoint the job requeues itself, at most this
    many times (errors never requeue)."""
    max_nonfinite_steps: int = 5
    """Stop with an error after this many consecutive steps with a non-finite loss or
    gradient norm (each such step is skipped and counted)."""

    def __post_init__(self) -> None:
        _require_positive(self, "train", "steps", "global_batch_size", "micro_batch_size")
        for k, stage in enumerate(self.stages):
            _check_stage(k, stage)
        _require_positive(self, "train", "max_nonfinite_steps")
        _require_choice("train.device", self.device, DEVICES)
        _require_choice("train.precision", self.precision, PRECISIONS)
        _require(bool(self.run_dir), "train.run_dir must not be empty")


@dataclass
class CheckpointConfig:
    every: int = 500
    """Save a checkpoint every this many steps; 0 saves only at the end and on signals."""
    keep: int = 3
    """Number of newest complete checkpoints to keep; older ones are deleted."""
    at_end: bool = True
    """Save a checkpoint when training finishes."""
    async_save: bool = False
    """Write checkpoints in the background (DCP's async_save): the step waits only while this
    rank's state is copied to host memory, a thread writes the files while training goes on,
    and the checkpoint gets its COMPLETE marker once every rank's files are on disk. At most
    one save is in flight: the next save, the end of the run and a stop signal wait for it. A
    failed write stops the run at the next step; the previous checkpoint stays the one
    train.resume=auto picks. Costs host memory for one copy of the rank's state."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, "checkpoint.every must be >= 0 (0: only at the end)")
        _require_positive(self, "checkpoint", "keep")


WANDB_MODES = ("online", "offline")


@dataclass
class WandbConfig:
    enabled: bool = False
    """Log the scalars of metrics.jsonl (same steps) and the config to Weights & Biases, from
    rank 0; needs the `wandb` extra. The run id is kept in <run_dir>/trackers.json, so a
    resumed run continues the same W&B run."""
    project: str = "mmfm"
    """The W&B project."""
    entity: str | None = None
    """The W&B team or user; None: the logged-in user's default entity."""
    name: str | None = None
    """The run's display name; None: the name of train.run_dir."""
    mode: str = "online"
    """online: stream to the server (needs `wandb login`); offline: write the run under
    <run_dir>/wandb/ only, never contacting a server (upload it later with `wandb sync`)."""
    tags: list[str] = field(default_factory=list)
    """Tags of the W&B run, 1 to 64 characters each (W&B's limit)."""

    def __post_init__(self) -> None:
        _require_choice("logging.wandb.mode", self.mode, WANDB_MODES)
        for tag in self.tags:
            _require(
                1 <= len(tag) <= 64,
                f"logging.wandb.tags: a tag of {len(tag)} characters ({tag[:20]!r}); "
                "W&B takes 1 to 64",
            )


@dataclass
class MlflowConfig:
    enabled: bool = False
    """Log the scalars of metrics.jsonl (same steps, `/` in names as `.`) and the config (as
    params) to MLflow, from rank 0; needs the `mlflow` extra. The run id is kept in
    <run_dir>/trackers.json, so a resumed run continues the same MLflow run."""
    tracking_uri: str | None = None
    """Where MLflow stores the run: a server (http://host:5000), a database (sqlite:///f.db)
    or a folder (file:///path); None: the local file store <run_dir>/mlruns."""
    experiment: str = "mmfm"
    """The MLflow experiment (created when missing)."""
    run_name: str | None = None
    """The run's name; None: the name of train.run_dir."""


@dataclass
class LoggingConfig:
    every: int = 1
    """Log metrics (metrics.jsonl, TensorBoard, W&B, MLflow) every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under <run_dir>/tb/."""
    progress: bool = True
    """Show a progress bar on a terminal (plain log lines every `print_every` steps otherwise;
    train.log gets those lines either way)."""
    print_every: int = 10
    """Print (and write to train.log) a metrics line every this many steps."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases (optional)."""
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    """MLflow (optional)."""

    def __post_init__(self) -> None:
        _require_positive(self, "logging", "every", "print_every")


TASKS = {
    "segmentation": ("voc", "coco", "image-mask", "prompt-response"),
    "svg": ("svg", "prompt-response"),
    "dna-classify": ("prompt-response", "dna-pairs"),
    "image": ("image-text", "prompt-response"),
    "video": ("video", "prompt-response"),
    "text": ("prompt-response",),
}
"""The tasks scored from generations (mmfm/tasks/) and the source kinds each reads (the
first is its default)."""


@dataclass
class TaskConfig:
    name: str = ""
    """The task: segmentation (image and phrase -> mask: IoU), svg (caption -> SVG: validity,
    render MSE / SSIM), dna-classify (DNA -> label: accuracy, MCC), image (caption -> picture:
    PSNR / SSIM against the tokenizer's reconstruction), video (caption -> clip: the same, per
    frame) or text (prompt -> text: exact match, token accuracy); its metrics are
    task/<name>/<metric> (docs/generate_eval.md)."""
    paths: list[str] = field(default_factory=list)
    """The examples' files, as a prepare recipe's sources[].paths (a VOC root, a COCO json,
    a folder of pictures, SVG files, a prompt-response jsonl, ...)."""
    kind: str = ""
    """How `paths` are read, a prepare source kind: segmentation voc, coco, image-mask or
    prompt-response; svg svg or prompt-response; dna-classify prompt-response or dna-pairs;
    image image-text or prompt-response; video video or prompt-response; text
    prompt-response. Empty: the first of these."""
    options: dict[str, Any] = field(default_factory=dict)
    """More fields of the source, as a prepare recipe's sources[] takes them (phrase, classes,
    split, image_dir, fit, order, jsonl_field, max_pixels, ...): the examples are the records
    `mmfm prepare` reads with them, made prompt / response tasks as `completion_only` makes
    them. dna-classify: label_repeat, the times each label was written in training."""
    tokenizers: str = ""
    """The tokenizer recipe the model's data was prepared with: it tokenizes the prompts as
    training tasks' prompts and its visual tokenizers decode the generated pictures."""
    examples: int = 16
    """Examples scored: the first this many records of the source, in reading order."""
    batch_size: int = 8
    """Prompts generated together."""
    seed: int = 0
    """Seed of the sampling (batch i samples with seed + i): the same seed, model and
    examples give the same generations and metrics."""
    max_new_tokens: int = 0
    """Tokens generated per example at most; 0: what the answer needs (a mask's or image's
    codes and its closer, the longest target clip's frames of codes with their ends; the
    longest target's tokens and 9 more for text and SVG)."""
    temperature: float = 0.0
    """0: greedy (the usual for task metrics); otherwise sampled at this temperature."""
    top_k: int = 0
    """Sample among the k most likely ids only (0: all)."""
    top_p: float = 1.0
    """Sample among the most likely ids whose probabilities sum to p (1: all)."""
    cfg_scale: float = 1.0
    """Classifier-free guidance for caption -> picture (1: off)."""
    prefixes: list[int] = field(default_factory=list)
    """segmentation: the mask-token prefix lengths of the coarse-to-fine IoU curve
    (miou@k); empty: 1, 2, 4, ... up to the mask tokenizer's tokens."""
    render_size: int = 128
    """svg: the side in pixels both SVGs are rendered at before they are compared."""

    def __post_init__(self) -> None:
        where = f"eval.tasks[{self.name or '?'}]"
        _require_choice("eval.tasks[].name", self.name, tuple(TASKS))
        self.kind = self.kind or TASKS[self.name][0]
        _require_choice(f"{where}.kind", self.kind, TASKS[self.name])
        _require(bool(self.paths), f"{where}.paths: name the examples' files")
        _require(
            bool(self.tokenizers),
            f"{where}.tokenizers: name the tokenizer recipe the model's data was prepared with",
        )
        _require_positive(self, where, "examples", "batch_size", "render_size")
        _require(self.max_new_tokens >= 0, f"{where}.max_new_tokens must be >= 0 (0: automatic)")
        _require(
            self.temperature >= 0 and self.top_k >= 0 and 0 < self.top_p <= 1,
            f"{where}: temperature >= 0, top_k >= 0 and top_p in (0, 1], got "
            f"{self.temperature}, {self.top_k}, {self.top_p}",
        )
        _require(
            all(k > 0 for k in self.prefixes),
            f"{where}.prefixes: mask-token counts, each >= 1, got {self.prefixes}",
        )
        _require(
            "label_repeat" not in self.options or self.name == "dna-classify",
            f"{where}.options.label_repeat is for dna-classify only",
        )


@dataclass
class SampleConfig:
    """One prompt sampled during training (`eval.samples`), as `mmfm generate` samples it."""

    prompt: str = ""
    """Text, or a template whose `{image}`, `{video}`, `{dna}`, `{svg}` say where the file
    of that field goes: `{image} segment the cat` with `image: cat.png`."""
    modality: str = "text"
    """The modality to answer in: text, image, mask, svg, dna, video (or a registered one):
    the prompt ends with its opening delimiter."""
    image: str | None = None
    """The picture of `{image}` (a file)."""
    video: str | None = None
    """The clip of `{video}` (a file; its frames at 2 fps, at most 8)."""
    dna: str | None = None
    """The FASTA / FASTQ / GenBank file of one sequence for `{dna}`."""
    svg: str | None = None
    """The SVG file of `{svg}`."""
    max_new_tokens: int = 64
    """Tokens generated at most (generation also stops at </s>); prompt plus these must fit
    model.max_seq_len."""
    temperature: float = 0.0
    """0: greedy; otherwise the logits are divided by it before sampling."""
    top_k: int = 0
    """Sample among the k most likely ids only (0: all)."""
    top_p: float = 1.0
    """Sample among the most likely ids whose probabilities sum to p (1: all)."""
    cfg_scale: float = 1.0
    """Classifier-free guidance (1: off), as `mmfm generate --cfg-scale`."""
    seed: int = 0
    """The sampler's seed: the same weights, prompt and seed give the same sample, whatever
    the training layout; the training run's own random state is never touched."""

    def files(self) -> dict[str, str]:
        """The file of each placeholder kind the sample sets."""
        kinds = {"image": self.image, "video": self.video, "dna": self.dna, "svg": self.svg}
        return {kind: path for kind, path in kinds.items() if path is not None}


SAMPLE_FILES = ("image", "video", "dna", "svg")
SAMPLES_OFF = (
    *("eval.samples=[]", "eval.samples_every=0", "eval.samples_tokenizers=null"),
    "eval.tasks_every=0",
)
"""Overrides for a checkpoint's saved config read to rebuild its model: the samples and in-loop
task scores of the run that wrote it play no part, and their files may have moved since."""


def _check_sample(k: int, sample: SampleConfig, tokenizers: str | None) -> None:
    """Refuse, before anything is built, a sample that could only fail at its first step."""
    where = f"eval.samples[{k}]"
    _require(bool(sample.prompt.strip()), f"{where}.prompt is empty: write the prompt's text")
    _require(
        sample.modality in MODALITY_NAMES,
        f"{where}.modality={sample.modality!r} is not one of {', '.join(MODALITY_NAMES)}",
    )
    for kind in SAMPLE_FILES:
        path, placed = getattr(sample, kind), "{" + kind + "}" in sample.prompt
        _require(
            path is None or placed,
            f"{where}.{kind}={path} but its prompt has no {{{kind}}}: write {{{kind}}} where "
            "the file's span goes",
        )
        _require(
            path is not None or not placed,
            f"{where}.prompt has {{{kind}}} but no {kind} file: set {where}.{kind}=FILE",
        )
        _require(
            path is None or Path(path).is_file(),
            f"{where}.{kind}={path}: no such file (paths are relative to where mmfm runs)",
        )
    _require(
        not sample.files() or tokenizers is not None,
        f"{where}.{next(iter(sample.files()), '')} is a file to encode: set "
        "eval.samples_tokenizers to the tokenizer recipe the training data was prepared with",
    )
    _require(sample.max_new_tokens >= 1, f"{where}.max_new_tokens must be positive")
    for name in ("temperature", "top_p", "cfg_scale"):
        value = getattr(sample, name)
        _require(math.isfinite(value), f"{where}.{name} must be a finite number, got {value}")
    _require(sample.temperature >= 0, f"{where}.temperature must be >= 0 (0: greedy)")
    _require(sample.top_k >= 0, f"{where}.top_k must be >= 0 (0: all ids)")
    _require(0 < sample.top_p <= 1, f"{where}.top_p must be in (0, 1], got {sample.top_p}")
    _require(-(2**63) <= sample.seed < 2**63, f"{where}.seed must be a 64-bit signed integer")


@dataclass
class EvalConfig:
    ALTERNATIVES: ClassVar[tuple[str, ...]] = DataConfig.ALTERNATIVES

    paths: list[str] = field(default_factory=list)
    """Held-out shards of one source, as in `data.paths`; validation is on when these (or
    `sources`) are set. Rows are packed like the training data (data.seq_len, the same loss
    weights), in global batches of train.global_batch_size rows."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several held-out sources (instead of `paths`), with the syntax of `data.sources`;
    each is read at most once per evaluation (max_epochs is ignored)."""
    every: int = 500
    """Evaluate every this many optimizer steps, and after the last step."""
    steps: int = 0
    """Global batches per evaluation; 0: one whole pass over the held-out data. The same
    rows are read every time (a fresh reader per evaluation)."""
    tasks: list[TaskConfig] = field(default_factory=list)
    """Tasks scored from the model's generations (TaskConfig, docs/generate_eval.md): run by
    `mmfm eval CKPT --task NAME`, by name, and during training every `tasks_every` steps."""
    tasks_every: int = 0
    """Score every `tasks` entry every this many optimizer steps, and after the last step
    (rank 0 generates from a gathered copy of the model, as samples do): task/<name>/<metric>
    joins the step's metrics (metrics.jsonl, TensorBoard, W&B, MLflow); 0: never in training."""
    keep_best: bool = False
    """Also keep the checkpoint with the lowest val/loss so far as <run_dir>/checkpoints/best:
    an evaluation that improves on it saves step_<N> (if that step has none yet) and links
    its files there. Never pruned, never picked by train.resume=auto."""
    samples: list[SampleConfig] = field(default_factory=list)
    """Prompts the model answers every `samples_every` steps (rank 0 generates from a
    gathered copy of the model; docs/generate_eval.md): each answer is decoded to a file
    under <run_dir>/samples/step_<N>/, a line of <run_dir>/samples/samples.jsonl, and media
    in TensorBoard, W&B and MLflow."""
    samples_every: int = 0
    """Sample `samples` every this many optimizer steps, and after the last step; 0: never."""
    samples_tokenizers: str | None = None
    """The tokenizer recipe the training data was prepared with (as `mmfm generate
    --tokenizers`): it encodes the samples' files and its visual tokenizers decode image,
    mask and video codes. Needed by samples with files and by picture answers outside the
    demo corpus."""

    def __post_init__(self) -> None:
        _require_positive(self, "eval", "every")
        _require(self.steps >= 0, "eval.steps must be >= 0 (0: a whole pass)")
        _require(
            not (self.paths and self.sources),
            "set eval.paths (one source) or eval.sources (several), not both",
        )
        names = [s.name for s in self.sources]
        _require(len(set(names)) == len(names), f"eval.sources names must be unique: {names}")
        tasks = [t.name for t in self.tasks]
        _require(len(set(tasks)) == len(tasks), f"eval.tasks names must be unique: {tasks}")
        _require(
            self.enabled or not self.keep_best,
            "eval.keep_best needs held-out data: set eval.paths or eval.sources",
        )
        _require(self.samples_every >= 0, "eval.samples_every must be >= 0 (0: no samples)")
        _require(self.tasks_every >= 0, "eval.tasks_every must be >= 0 (0: not in training)")
        _require(
            bool(self.tasks) or self.tasks_every == 0,
            f"eval.tasks_every={self.tasks_every} but eval.tasks is empty: list the tasks to "
            "score, or set eval.tasks_every=0",
        )
        _require(
            bool(self.samples) or self.samples_every == 0,
            f"eval.samples_every={self.samples_every} but eval.samples is empty: list the "
            "prompts to sample, or set eval.samples_every=0",
        )
        _require(
            self.samples_tokenizers is None or Path(self.samples_tokenizers).is_file(),
            f"eval.samples_tokenizers={self.samples_tokenizers}: no such tokenizer recipe",
        )
        for k, sample in enumerate(self.samples):
            _check_sample(k, sample, self.samples_tokenizers)

    @property
    def sampling(self) -> bool:
        """Whether samples are generated during training."""
        return bool(self.samples) and self.samples_every > 0

    @property
    def scoring(self) -> bool:
        """Whether tasks are scored during training."""
        return bool(self.tasks) and self.tasks_every > 0

    @property
    def enabled(self) -> bool:
        return bool(self.paths or self.sources)

    def source_list(self) -> list[SourceConfig]:
        """`sources`, or `paths` as one source named `eval` (`HELD_OUT_SOURCE`)."""
        return _source_list(self.paths, self.sources, HELD_OUT_SOURCE)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The transformer."""
    data: DataConfig = field(default_factory=DataConfig)
    """What is read and how it is packed."""
    loss: LossConfig = field(default_factory=LossConfig)
    """How the per-target losses are normalised, and the z-loss."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How the model and data are split over processes."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When checkpoints are written and how many are kept."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics, TensorBoard and the progress bar."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation on held-out data during training (and the defaults of `mmfm eval`), and
    samples of the model during training."""

    def __post_init__(self) -> None:
        """A context stage is a run with train.init_from: its errors name the stage it
        continues, so a stage whose seq_len/cp/buckets break a rule says which one."""
        stage = None
        if self.train.init_from is not None:
            stage = f"the context stage from train.init_from={self.train.init_from}"
        try:
            self._check_shapes()
        except LayoutError as e:
            raise LayoutError(e.problems, self, stage) from None
        except ConfigError as e:
            if stage is None:
                raise
            raise ConfigError(f"{stage}: {e}") from None
        self._check_mot()
        _require(
            not self.train.stages or self.checkpoint.at_end,
            "train.stages needs checkpoint.at_end=true: each stage starts from the last "
            "one's final checkpoint",
        )
        _require(
            not (self.eval.sampling and self.parallel.pp > 1),
            f"eval.samples with parallel.pp={self.parallel.pp}: samples gather the model from "
            "tensor and data-parallel shards, not from pipeline stages; sample a checkpoint "
            "with `mmfm generate` instead, or set eval.samples_every=0",
        )
        _require(
            not (self.eval.scoring and self.parallel.pp > 1),
            f"eval.tasks_every with parallel.pp={self.parallel.pp}: tasks gather the model from "
            "tensor and data-parallel shards, not from pipeline stages; score a checkpoint "
            "with `mmfm eval CKPT --task NAME` instead, or set eval.tasks_every=0",
        )
        _require(
            not self.train.stages or self.train.resume in ("none", "auto"),
            f"train.stages with train.resume={self.train.resume}: a run of stages resumes "
            "with train.resume=auto (each stage from its own newest checkpoint)",
        )

    def _check_mot(self) -> None:
        if not self.model.mot.enabled:
            return
        p = self.parallel
        _require(
            p.tp == 1 or not p.sequence_parallel,
            "model.mot with parallel.tp > 1 needs parallel.sequence_parallel=false (a group's "
            "tokens are gathered from the whole row; MoT has no sequence-parallel plan yet)",
        )
        _require(
            not p.compile,
            "model.mot with parallel.compile=true: the per-batch group sizes would recompile "
            "every block each step; set parallel.compile=false",
        )

    def _check_shapes(self) -> None:
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len "
            f"({self.model.max_seq_len}): raise model.max_seq_len or lower data.seq_len",
        )
        problems = layout_problems(self)
        if problems:
            raise LayoutError(problems, self)

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches each data-parallel rank runs per optimizer step (gradient
        accumulation; the pipeline's micro-batches). A step is one optimizer step
        (`train.steps` of them); `train/step_runner.py` runs one."""
        return self.train.global_batch_size // (self.train.micro_batch_size * self.parallel.dp_size)


RAW_RECORDS = ("image-text", "image-mask", "text", "svg", "dna", "video")
"""What one raw WebDataset sample becomes (`RawFields.record`)."""
RAW_FIELDS = ("image", "text", "mask", "video", "svg", "dna")
CAPTIONED_RECORDS = ("image-text", "image-mask", "video")
"""Raw records of a picture (or clip) and its caption: condition dropout and caption order."""
ORDERS = ("text_first", "image_first", "both")
"""Where a caption goes (sources[].order): before its picture, after it, or drawn per record."""


def check_shaping(prefix: str, order: str, uncond_ratio: float, reverse_ratio: float) -> None:
    """A source's caption order and shares (a prepare recipe's or a data.sources[] entry's)."""
    _require_choice(f"{prefix}order", order, ORDERS)
    for name, value in (("uncond_ratio", uncond_ratio), ("reverse_ratio", reverse_ratio)):
        _require(0 <= value <= 1, f"{prefix}{name} must be in [0, 1], got {value}")


@dataclass
class RawFields:
    """Which members of a raw WebDataset sample (`000123.jpg`, `000123.txt`, `000123.json`
    as img2dataset writes them) make which part of a record. Each field lists alternatives,
    tried in order: a member's extension (`jpg`, `mask.png`) or `EXT:KEY`, a string under KEY
    of the JSON object in member EXT (`json:caption`). The first one present is used."""

    record: str = "image-text"
    """What a sample becomes: image-text (a picture and its caption), image-mask (a picture,
    its mask and, if any, a caption), text, svg (its code and, if any, a caption), dna (one
    record per sequence of a FASTA / FASTQ / GenBank member) or video (a clip's frames and
    its caption)."""
    image: str | list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    """image-text, image-mask: the picture."""
    text: str | list[str] = field(default_factory=lambda: ["txt", "json:caption"])
    """The caption (image-text, image-mask, video, svg: before the code; stripped of
    surrounding white space) or the document (text, kept as it is)."""
    mask: str | list[str] = field(default_factory=lambda: ["mask.png"])
    """image-mask: the mask picture, nonzero = 1, of the image's size."""
    video: str | list[str] = field(
        default_factory=lambda: ["mp4", "webm", "mkv", "mov", "avi", "gif"]
    )
    """video: the clip."""
    svg: str | list[str] = field(default_factory=lambda: ["svg"])
    """svg: the SVG code."""
    dna: str | list[str] = field(
        default_factory=lambda: ["fasta", "fa", "fna", "fastq", "fq", "gb", "gbk", "fna.gz"]
    )
    """dna: the sequence file; its format follows the extension (a .gz suffix is read
    through: fasta.gz)."""
    require_text: bool = True
    """image-text, image-mask, video: a sample without any `text` member is rejected
    (missing_text); false: it becomes a record without a caption. An svg sample's caption
    is optional (without one: the code alone, with a warning)."""

    def __post_init__(self) -> None:
        _require_choice("fields.record", self.record, RAW_RECORDS)
        for name in RAW_FIELDS:
            value = getattr(self, name)
            alternatives = [value] if isinstance(value, str) else list(value)
            for alt in alternatives:
                ext, _, key = alt.partition(":")
                _require(
                    bool(ext) and "/" not in alt and (":" not in alt or bool(key)),
                    f"fields.{name}: {alt!r} must be a member extension (jpg, mask.png) or "
                    "EXT:KEY for a key of a JSON member (json:caption)",
                )
            setattr(self, name, alternatives)  # one string or a list in YAML; a list here

    def used(self) -> tuple[str, ...]:
        """The fields a sample of this `record` reads."""
        return {
            "image-text": ("image", "text"),
            "image-mask": ("image", "mask", "text"),
            "text": ("text",),
            "svg": ("svg", "text"),
            "dna": ("dna",),
            "video": ("video", "text"),
        }[self.record]

    def ignored(self) -> list[str]:
        """The fields set away from their defaults that a sample of this `record` never
        reads (`image: png` on a text record): a mapping that does nothing."""
        default = RawFields(record=self.record)
        unread = [f for f in RAW_FIELDS if f not in self.used()]
        if self.record not in CAPTIONED_RECORDS:
            unread.append("require_text")
        return [f for f in unread if getattr(self, f) != getattr(default, f)]

    def members(self) -> tuple[str, ...]:
        """The member extensions a sample of this `record` is read with (others are skipped
        in the tar, undecoded)."""
        return tuple(
            dict.fromkeys(alt.partition(":")[0] for f in self.used() for alt in getattr(self, f))
        )
