"""Whether a parallel layout is valid: its rules (`layout_problems`: the product of the
dimensions, heads vs tp, the global batch vs micro-batch x data-parallel size, pipeline
stages vs layers, ...), which `Config` checks when it is built; the layout against the size of
the job (`parallel.dp_shard=-1` filled); and every broken rule reported at once, with one
layout that fits.

Scaling a recipe to another job usually breaks several rules together (the product of the
dimensions, heads vs tp, the global batch vs micro-batch x data-parallel size); one error per
attempt would make that as many round trips. Here they come in one message, with the layout
of the same number of processes nearest the asked one that keeps every rule: each split of
the world size is tried, so the suggestion is itself checked. `dp_shard=-1` takes what the
other dimensions leave, as torchtitan's `ParallelDims` does, wherever the world size is known:
at launch, from `mmfm train --nproc`, or from `mmfm slurm submit`'s nodes x tasks.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mmfm.core.errors import ConfigError, LaunchError

if TYPE_CHECKING:  # annotations only: schema.py imports this module to check a Config
    from mmfm.config.schema import Config, ParallelConfig

DIMS = ("dp_replicate", "dp_shard", "cp", "tp", "pp")
"""The dimensions of the layout, in the order of the messages (`pp` outermost in the mesh)."""


class LayoutError(ConfigError):
    """The parallel layout breaks one or more rules; `problems` lists each, and `cfg` is the
    config that broke them, from which `suggest_layout` finds a layout that fits."""

    def __init__(self, problems: list[str], cfg: object, context: str | None = None) -> None:
        self.problems, self.cfg, self.context = problems, cfg, context
        body = problems[0] if len(problems) == 1 else _numbered(problems)
        super().__init__(f"{context}: {body}" if context else body)

    def __reduce__(self):  # crosses processes as the plain ConfigError its message is
        return ConfigError, (str(self),)


def _numbered(problems: list[str]) -> str:
    items = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
    return f"the parallel layout breaks {len(problems)} rules: {items}"


def _failed(*rules: tuple[bool, str]) -> list[str]:
    """The messages of the rules whose condition is false."""
    return [message for ok, message in rules if not ok]


def layout_problems(cfg: Config) -> list[str]:
    """Every rule of the parallel layout `cfg` breaks, all at once (scaling a
    recipe to another job usually breaks several). While parallel.dp_shard is -1 the
    rules on the data-parallel size wait for the world size (`problems_on`)."""
    p = cfg.parallel
    split = p.cp > 1 or (p.tp > 1 and p.sequence_parallel)
    problems = _batch_problems(cfg) if p.dp_shard != -1 else []
    problems += _tensor_parallel_problems(cfg)
    problems += _decompose_problems(cfg)
    problems += _pipeline_problems(cfg)
    return problems + _failed(
        (
            not (cfg.model.neftune_alpha and split),
            "model.neftune_alpha draws the noise for the whole row each rank holds: it "
            "needs parallel.cp=1 and, with parallel.tp > 1, parallel.sequence_parallel=false",
        ),
        (
            cfg.data.seq_len % (2 * p.cp) == 0,
            f"data.seq_len ({cfg.data.seq_len}) must be divisible by 2 x parallel.cp "
            f"({2 * p.cp}): context parallelism splits every row into 2 x cp equal chunks",
        ),
    )


def _batch_problems(cfg: Config) -> list[str]:
    """The rules on the data-parallel size: rows per step and pipeline micro-batches."""
    p, t = cfg.parallel, cfg.train
    rows_per_pass = t.micro_batch_size * p.dp_size
    if t.global_batch_size % rows_per_pass:
        return [
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size x data-parallel size ({t.micro_batch_size} x "
            f"{p.dp_size} = {rows_per_pass})"
        ]
    if p.pp == 1:
        return []
    interleaved = p.pp_schedule in ("interleaved_1f1b", "interleaved_zb")
    return _failed(
        (
            cfg.micro_batches_per_step >= p.pp,
            f"pipeline parallelism runs the {cfg.micro_batches_per_step} micro-batches of a "
            f"step through {p.pp} ranks and needs at least {p.pp}: lower "
            "train.micro_batch_size or raise train.global_batch_size",
        ),
        (
            not interleaved or cfg.micro_batches_per_step % p.pp == 0,
            f"parallel.pp_schedule={p.pp_schedule} needs the micro-batch count "
            f"({cfg.micro_batches_per_step}) to be a multiple of parallel.pp ({p.pp})",
        ),
    )


def _tensor_parallel_problems(cfg: Config) -> list[str]:
    tp, m = cfg.parallel.tp, cfg.model
    if tp == 1:
        return []
    rules = [
        (
            value % tp == 0,
            f"{name} ({value}) must be divisible by parallel.tp ({tp}): change one of them",
        )
        for name, value in (
            ("model.n_heads", m.n_heads),
            ("model.n_kv_heads", m.num_kv_heads),
            ("model.vocab_size", m.vocab_size),
            ("the MLP size (model.ffn_dim)", m.hidden_dim),
        )
    ]
    if cfg.parallel.sequence_parallel:
        local = cfg.data.seq_len // cfg.parallel.cp
        rules.append(
            (
                local % tp == 0,
                f"the tokens per rank (data.seq_len / parallel.cp = {local}) must be "
                f"divisible by parallel.tp ({tp}) with sequence parallelism (or set "
                "parallel.sequence_parallel=false)",
            )
        )
    rules.append(
        (
            not m.tie_embeddings,
            "model.tie_embeddings is not supported with parallel.tp > 1 yet: set it to false",
        )
    )
    return _failed(*rules)


def _decompose_problems(cfg: Config) -> list[str]:
    """Every bucket length must split as data.seq_len must (CP chunks, SP shards)."""
    p = cfg.parallel
    if cfg.data.packing != "decompose":
        return []
    rules = [
        (
            p.pp == 1,
            "data.packing=decompose changes the micro-batch shape every step, and a "
            "pipeline schedule is built for one shape: set parallel.pp=1 (or use packing "
            "best_fit)",
        )
    ]
    for b in cfg.data.buckets:
        rules.append(
            (
                b % (2 * p.cp) == 0,
                f"data.buckets: bucket {b} must be divisible by 2 x parallel.cp "
                f"({2 * p.cp}): context parallelism splits every row into 2 x cp chunks; "
                "drop the bucket",
            )
        )
        rules.append(
            (
                p.tp == 1 or not p.sequence_parallel or (b // p.cp) % p.tp == 0,
                f"data.buckets: bucket {b} / parallel.cp ({p.cp}) must be divisible by "
                f"parallel.tp ({p.tp}) with sequence parallelism: drop the bucket or set "
                "parallel.sequence_parallel=false",
            )
        )
    return _failed(*rules)


def _pipeline_problems(cfg: Config) -> list[str]:
    p, m = cfg.parallel, cfg.model
    if p.pp == 1:
        return []
    return _failed(
        (
            m.n_layers >= p.num_stages,
            f"parallel.pp x parallel.pp_virtual_stages = {p.num_stages} stages, but "
            f"model.n_layers is {m.n_layers}: every stage needs at least one block",
        ),
        (
            not p.pp_layers or sum(p.pp_layers) == m.n_layers,
            f"parallel.pp_layers sums to {sum(p.pp_layers)}, model.n_layers is {m.n_layers}",
        ),
        (
            not m.tie_embeddings,
            "model.tie_embeddings is not supported with parallel.pp > 1 yet (the embedding "
            "and the output live on different stages): set it to false",
        ),
    )


def filled_dp_shard(p: ParallelConfig, world_size: int) -> int | None:
    """dp_shard on `world_size` processes: the one asked for or, for -1, what the other
    dimensions leave (None when they do not divide the world size)."""
    if p.dp_shard != -1:
        return p.dp_shard
    others = p.dp_replicate * p.cp * p.tp * p.pp
    return world_size // others if world_size % others == 0 else None


def describe_layout(p: ParallelConfig, filled: bool = False) -> str:
    """`dp_replicate=1 x dp_shard=8 (-1: filled) x cp=1 x tp=2 x pp=1 = 16 processes`."""
    parts = [f"{d}={getattr(p, d)}" for d in DIMS]
    if filled:
        parts[1] += " (-1: filled)"
    return f"{' x '.join(parts)} = {p.world_size} processes"


def problems_on(cfg: Config, world_size: int, job: str | None = None) -> list[str]:
    """Every rule `cfg`'s layout breaks on `world_size` processes; `job` says where that
    number comes from (default: that many processes were started)."""
    problems = _count_problems(cfg.parallel, world_size, job)
    fill = filled_dp_shard(cfg.parallel, world_size)
    checked = cfg if fill is None else _variant(cfg, {"dp_shard": fill})
    return problems + layout_problems(checked)


def resolve_layout(cfg: Config, world_size: int, job: str | None = None) -> Config:
    """`cfg` with parallel.dp_shard=-1 filled for `world_size` processes, once every layout
    rule holds. Otherwise one error names every broken rule and a layout that fits: a
    LaunchError when only the number of started processes is wrong (no `job`), else a
    ConfigError (the recipe, an override or the job size must change). A config already
    resolved for `world_size` is returned as it is: it was checked when it was built."""
    if cfg.parallel.dp_shard != -1 and cfg.parallel.world_size == world_size:
        return cfg
    problems = problems_on(cfg, world_size, job)
    if problems:
        only_count = problems == _count_problems(cfg.parallel, world_size, job)
        error = LaunchError if only_count and job is None else ConfigError
        raise error(layout_message(cfg, problems, world_size))
    if cfg.parallel.dp_shard != -1:
        return cfg
    fill = filled_dp_shard(cfg.parallel, world_size)
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp_shard=fill))


def explain(error: LayoutError, world_size: int | None = None, job: str | None = None):
    """`error`, raised while a config was built, as one ConfigError listing every rule its
    config breaks (on `world_size` processes when known) and a layout that fits."""
    cfg: Config = error.cfg  # type: ignore[assignment]
    if world_size is None:
        return ConfigError(layout_message(cfg, error.problems, None, error.context))
    problems = problems_on(cfg, world_size, job)
    return ConfigError(layout_message(cfg, problems, world_size, error.context))


def layout_message(
    cfg: Config, problems: list[str], world_size: int | None, context: str | None = None
) -> str:
    """The problems on one line, then the nearest layout that keeps every rule on
    `world_size` processes (None: as many as the asked layout has)."""
    message = str(LayoutError(problems, cfg, context))
    if world_size is None:
        if cfg.parallel.dp_shard == -1:
            return f"{message} (the layout is checked against the number of processes at launch)"
        world_size = cfg.parallel.world_size
    fit = suggest_layout(cfg, world_size)
    if fit is None:
        return f"{message}; no layout of {world_size} processes fits this model and data"
    return f"{message}; a layout that fits {world_size} processes: {' '.join(fit)}"


def suggest_layout(cfg: Config, world_size: int) -> list[str] | None:
    """The overrides of the layout nearest `cfg`'s (tp, pp, cp kept where they can be, the
    micro-batch before the global batch adjusted) that keeps every rule on `world_size`
    processes; None if no split of the world size does without changing the model or data."""
    candidates = [
        (dims, batch)
        for dims in _splits(cfg, world_size)
        for batch in _batches(cfg, dims["dp_replicate"] * dims["dp_shard"], dims["pp"])
    ]
    candidates.sort(key=lambda c: _distance(cfg, *c))
    for dims, batch in candidates:
        if not layout_problems(_variant(cfg, dims, batch)) and _builds(cfg, dims, batch):
            return _overrides(cfg, dims, batch)
    return None


def _count_problems(p: ParallelConfig, world_size: int, job: str | None) -> list[str]:
    job = job or f"{world_size} processes were started"
    others = p.dp_replicate * p.cp * p.tp * p.pp
    if p.dp_shard == -1:
        if world_size % others == 0:
            return []
        return [
            f"parallel.dp_shard=-1 takes what dp_replicate x cp x tp x pp = {p.dp_replicate} "
            f"x {p.cp} x {p.tp} x {p.pp} = {others} leave, but {others} does not divide the "
            f"number of processes ({job})"
        ]
    product = others * p.dp_shard
    if product == world_size:
        return []
    sizes = " x ".join(str(getattr(p, d)) for d in DIMS)
    return [
        f"parallel.dp_replicate x dp_shard x cp x tp x pp = {sizes} = {product}, but {job}: "
        "make the product equal the number of processes (or set parallel.dp_shard=-1)"
    ]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _splits(cfg: Config, world_size: int) -> Iterator[dict[str, int]]:
    """Every (dp_replicate, dp_shard, cp, tp, pp) multiplying to `world_size`; pp only up to
    one block per stage, and kept when parallel.pp_layers fixes the stages."""
    p = cfg.parallel
    pps = [p.pp] if p.pp_layers else _divisors(world_size)
    for pp in pps:
        if world_size % pp or (pp > 1 and pp * p.pp_virtual_stages > cfg.model.n_layers):
            continue
        for tp in _divisors(world_size // pp):
            for cp in _divisors(world_size // (pp * tp)):
                rest = world_size // (pp * tp * cp)
                for dp_replicate in _divisors(rest):
                    dims = {"dp_replicate": dp_replicate, "dp_shard": rest // dp_replicate}
                    yield {**dims, "cp": cp, "tp": tp, "pp": pp}


def _batches(cfg: Config, dp: int, pp: int) -> Iterator[tuple[int, int]]:
    """(micro-batch, global batch) pairs to try: the global batch kept, or the multiple of
    micro-batch x dp (x pp for the interleaved schedules) nearest it, at least pp of them."""
    t, p = cfg.train, cfg.parallel
    interleaved = pp > 1 and p.pp_schedule in ("interleaved_1f1b", "interleaved_zb")
    asked = t.micro_batch_size
    halves = {asked >> k for k in range(asked.bit_length())}  # asked, asked/2, ..., 1
    for micro in sorted(halves | set(_divisors(asked))):
        step = micro * dp * (pp if interleaved else 1)
        least = micro * dp * pp
        yield micro, t.global_batch_size
        yield micro, max(least, math.ceil(t.global_batch_size / step) * step)
        if t.global_batch_size // step * step >= least:
            yield micro, t.global_batch_size // step * step


def _distance(cfg: Config, dims: dict[str, int], batch: tuple[int, int]) -> tuple[float, int]:
    """How far a candidate moves from the asked layout, per factor of 2: raising tp, pp or
    cp 4 (more communication, and cp only pays off on long rows), lowering them 1,
    dp_replicate 0.5, dp_shard 0.25 (it is what fills the job), the micro-batch 0.5 (memory
    and speed only); changing the global batch (the optimisation itself) costs 2 plus 2 per
    factor of 2. Ties go to the larger tp."""
    p, t = cfg.parallel, cfg.train
    moved = 0.0
    for d in ("tp", "pp", "cp"):
        factor = math.log2(dims[d] / getattr(p, d))
        moved += 4 * factor if factor > 0 else -factor
    moved += 0.5 * abs(math.log2(dims["dp_replicate"] / p.dp_replicate))
    if p.dp_shard != -1:
        moved += 0.25 * abs(math.log2(dims["dp_shard"] / p.dp_shard))
    moved += 0.5 * abs(math.log2(batch[0] / t.micro_batch_size))
    if batch[1] != t.global_batch_size:
        moved += 2 + 2 * abs(math.log2(batch[1] / t.global_batch_size))
    return moved, -dims["tp"]


def _variant(cfg: Config, dims: dict[str, int], batch: tuple[int, int] | None = None) -> Config:
    """A shallow copy of `cfg` with other dimensions (and batch sizes), built without running
    the validation: `layout_problems` on it says whether they fit."""
    new = copy.copy(cfg)
    new.parallel = copy.copy(cfg.parallel)
    for name, value in dims.items():
        setattr(new.parallel, name, value)
    if batch is not None:
        new.train = copy.copy(cfg.train)
        new.train.micro_batch_size, new.train.global_batch_size = batch
    return new


def _builds(cfg: Config, dims: dict[str, int], batch: tuple[int, int]) -> bool:
    """Whether the candidate passes every check of the config tree, not only the layout's."""
    micro, global_batch = batch
    try:
        parallel = dataclasses.replace(cfg.parallel, **dims)
        train = dataclasses.replace(
            cfg.train, micro_batch_size=micro, global_batch_size=global_batch
        )
        dataclasses.replace(cfg, parallel=parallel, train=train)
    except ConfigError:
        return False
    return True


def _overrides(cfg: Config, dims: dict[str, int], batch: tuple[int, int]) -> list[str]:
    p, t = cfg.parallel, cfg.train
    changed = [
        f"parallel.{d}={dims[d]}"
        for d in DIMS
        if dims[d] != getattr(p, d) and not (d == "dp_shard" and p.dp_shard == -1)
    ]
    if batch[0] != t.micro_batch_size:
        changed.append(f"train.micro_batch_size={batch[0]}")
    if batch[1] != t.global_batch_size:
        changed.append(f"train.global_batch_size={batch[1]}")
    return changed
