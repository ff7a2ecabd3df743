"""The streaming loader: virtual streams -> packed rows -> this rank's micro-batches.

There is one virtual stream per row of the global batch (`mmfm.data.stream`): row i of
every step comes from stream i, so the global batches do not depend on the layout. A
data-parallel rank owns the contiguous block of streams whose rows it trains on and reads
only their shards. `StreamRows`, an `IterableDataset` over those streams, runs in this
process or in `torch.utils.data.DataLoader` workers, which split the streams among
themselves (worker w of W takes the streams at positions w, w + W, ...), yield one item per
step (their streams' rows) and run ahead by `data.prefetch` steps. Every row arrives with
its stream's state as of that row, and the DataLoader hands the workers' items over in
order, so the state saved at a step boundary is exact even though workers run ahead. A
context-parallel rank then keeps its zigzag chunks of every row; on CUDA the micro-batches
are pinned, so that `Batch.to(non_blocking=True)` overlaps the copy with compute. A stream
that has read its share of every capped source gives empty rows (no targets); the step after
the one at which every stream on every rank is dry (the `dry_streams` counter, summed over
ranks by the trainer) raises `SourcesExhausted` on every rank.

State: `{stream id: stream state}` for all streams, gathered from every rank at checkpoint
time; any data-parallel size (and any number of workers) can resume from it. The state lives
in this process (the last row of each stream), not in the DataLoader, so a resume starts
fresh workers from it.

A loader is a context manager: `with build_loader(cfg) as loader:` ends its workers on exit.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmfm.config.schema import Config
from mmfm.core.errors import CheckpointError, ConfigError, DataError, LaunchError
from mmfm.core.modalities import registered, restore
from mmfm.core.torch_compat import (
    dataloader_failure,
    dataloader_workers,
    iter_without_sigchld_handler,
    shutdown_dataloader_workers,
)
from mmfm.core.types import Batch
from mmfm.core.zigzag import zigzag_slice
from mmfm.data import orphans
from mmfm.data.demo import ensure_demo_held_out, ensure_demo_shards
from mmfm.data.megatron import unit_urls
from mmfm.data.odds import natural_odds
from mmfm.data.packing import RowStats
from mmfm.data.raw import warn_ignored
from mmfm.data.settings import SourceSpec, StreamSettings
from mmfm.data.shards import ShardError, expand_paths
from mmfm.data.skips import SKIP_REASONS
from mmfm.data.stream import SourcesExhausted, VirtualStream
from mmfm.data.tario import Interrupted, set_stop_check

STATE_FORMAT = "mmfm-streams/1"
WORKER_DEATH_FIX = (
    "if it ran out of memory, lower data.num_workers, data.shuffle_buffer_tokens or "
    "data.prefetch (or give the job more memory), then resume from the last checkpoint"
)
WAIT_S = 0.25
"""How long one wait for a worker's rows lasts: a stop is honoured between waits."""


@runtime_checkable
class Loader(Protocol):
    """What the trainer needs of a loader: `StreamingLoader`, or a benchmark's fixed rows."""

    def next_step(self, stop: Callable[[], bool] | None = None) -> list[Batch]: ...
    def step_counts(self) -> list[float]: ...
    def note_totals(self, counts: Sequence[float]) -> None: ...
    def describe(self, counts: Sequence[float]) -> dict[str, float]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def merge_states(self, states: Sequence[dict]) -> dict: ...
    def close(self) -> None: ...


def collate(rows: list[dict[str, np.ndarray]]) -> Batch:
    """One micro-batch of rows (or of a stream's stacked rows of a step: decompose)."""
    join = np.concatenate if rows[0]["tokens"].ndim == 2 else np.stack
    return Batch(**{name: torch.from_numpy(join([r[name] for r in rows])) for name in rows[0]})


def micro_batches(rows: list[dict[str, np.ndarray]], size: int, cp_size: int, cp_rank: int):
    """A rank's rows of one global batch as its micro-batches of `size` rows, each cut to the
    rank's context-parallel part: the one way training and evaluation batch their rows."""
    return [
        zigzag_slice(collate(rows[i : i + size]), cp_size, cp_rank)
        for i in range(0, len(rows), size)
    ]


def rank_streams(n_streams: int, dp_rank: int, dp_size: int) -> list[int]:
    """The virtual streams (rows of the global batch) a data-parallel rank reads."""
    assert n_streams % dp_size == 0
    per_rank = n_streams // dp_size
    return list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))


def _pinned(batch: Batch) -> Batch:
    return Batch(**{name: getattr(batch, name).pin_memory() for name in Batch.__dataclass_fields__})


@dataclass
class _Row:
    stream: int
    arrays: dict[str, np.ndarray]
    counts: dict[str, float]
    snapshot: dict


@dataclass
class _Failure:
    """Bad or too little data, or a missing extra, in a worker: the message says what to
    change, so the trainer raises it as it is (a DataLoader would re-raise it with the
    worker's traceback)."""

    message: str
    error: type[DataError | LaunchError] = DataError


def _produce(stream: VirtualStream, names: Sequence[str]) -> _Row:
    """The stream's next row; once it ran dry, empty rows until every stream has."""
    try:
        arrays, stats, skipped = stream.next_row()
    except SourcesExhausted:
        arrays = stream.empty_rows()
        stats, skipped = RowStats(pad=stream.settings.seq_len, dry=True), {}
    counts = {"pad_tokens": float(stats.pad), "split_docs": float(stats.split)}
    counts["dropped_docs"] = float(stats.dropped)
    counts["dropped_tokens"] = float(stats.dropped_tokens)
    counts["seq_len"] = float(stream.length)
    counts["dry_streams"] = float(stats.dry)
    for source, tokens in stats.tokens_by_source.items():
        counts[f"tokens/{names[source]}"] = float(tokens)
    for reason, n in skipped.items():
        counts[f"skipped/{reason}"] = float(n)
    return _Row(stream.id, arrays, counts, stream.snapshot())


class StreamRows(IterableDataset):
    """Streams `ids` from their snapshots, as one item per step: the rows of the streams this
    process runs (all of them, or a DataLoader worker's share)."""

    def __init__(self, ids, sources, settings, snapshots):
        self.ids, self.sources, self.settings = list(ids), list(sources), settings
        self.snapshots = {str(i): snapshots.get(str(i)) for i in ids}
        self.streams: list[VirtualStream] = []

    def __iter__(self) -> Iterator[list[_Row] | _Failure]:
        info = get_worker_info()
        ids = self.ids[info.id :: info.num_workers] if info else self.ids
        names = [s.name for s in self.sources]
        try:
            self.streams = []
            for i in ids:
                self.streams.append(VirtualStream(i, self.sources, self.settings))
                if self.snapshots[str(i)] is not None:
                    self.streams[-1].restore(self.snapshots[str(i)])
            while True:
                yield [_produce(stream, names) for stream in self.streams]
        except (DataError, LaunchError) as e:
            if info is None:
                raise
            yield _Failure(str(e), LaunchError if isinstance(e, LaunchError) else DataError)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _as_is(item):
    return item  # the rows stay numpy: the trainer's process collates them into micro-batches


def _init_worker(stop, modalities: tuple, worker_id: int) -> None:
    """Close ends waits for stalled shards; SIGTERM ends the worker's pipe commands; the
    parent's registered `modalities` name the same ids here."""
    orphans.exit_on_sigterm()
    set_stop_check(stop.is_set)
    restore(modalities)


def _check_tokenize_device(sources: Sequence[SourceSpec], num_workers: int) -> None:
    on_device = [s.name for s in sources if s.tokenize and s.tokenize_device != "cpu"]
    if on_device and num_workers:
        raise ConfigError(
            f"data.sources {on_device}: tokenize_device other than cpu needs "
            "data.num_workers=0 (each worker would hold its own CUDA context and tokenizers)"
        )
    if on_device and not torch.cuda.is_available():
        raise ConfigError(
            f"data.sources {on_device}: tokenize_device is cuda but torch sees no CUDA "
            "device here; set tokenize_device: cpu"
        )


class StreamingLoader:
    def __init__(
        self,
        sources: Sequence[SourceSpec],
        settings: StreamSettings,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        cp_rank: int = 0,
        cp_size: int = 1,
        num_workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool = False,
    ):
        n = settings.n_streams
        natural = settings.packing == "decompose" and settings.curriculum == "natural"
        if natural and not settings.bucket_odds:
            settings = replace(settings, bucket_odds=natural_odds(sources, settings))
        self.sources, self.settings = list(sources), settings
        self.micro_batch_size = micro_batch_size
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.stream_ids = rank_streams(n, dp_rank, dp_size)
        self.num_workers = min(num_workers, len(self.stream_ids))
        _check_tokenize_device(sources, self.num_workers)
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        """Pin the micro-batches (CUDA only), so that their copy to the device is async."""
        self.snapshots: dict[str, dict | None] = {str(i): None for i in self.stream_ids}
        self._rows: StreamRows | None = None
        self._items: Iterator | None = None
        self._stop_workers = None
        self._stale = False
        """The rows in flight belong to an unfinished step: restart before the next."""
        self._counts: dict[str, float] = {}
        self._all_dry = False
        """Every stream (on every rank) has run dry: the next step raises SourcesExhausted."""

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def workers(self) -> list:
        """The DataLoader's worker processes (none before the first step or in-process)."""
        return dataloader_workers(self._items)

    # -- rows --------------------------------------------------------------------------------

    def _start(self) -> None:
        self._rows = StreamRows(self.stream_ids, self.sources, self.settings, self.snapshots)
        if self.num_workers == 0:
            self._items = iter(self._rows)
            return
        ctx = orphans.GUARDED_SPAWN  # spawn: the trainer has threads (and CUDA) to not fork
        self._stop_workers = ctx.Event()
        loader = DataLoader(
            self._rows,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch,
            multiprocessing_context=ctx,
            worker_init_fn=functools.partial(_init_worker, self._stop_workers, registered()),
            timeout=WAIT_S,
            generator=torch.Generator(),  # its worker seeds would draw from the trainer's RNG
        )
        self._items = iter_without_sigchld_handler(loader)  # a dead worker: `_receive` says

    def _receive(self, stop: Callable[[], bool]) -> list[_Row]:
        """The next item of the worker whose turn it is (the DataLoader keeps the order)."""
        while True:
            try:
                item = next(self._items)
                break
            except RuntimeError as e:
                if stop():
                    raise Interrupted("stopped while waiting for a loader worker") from None
                failure = dataloader_failure(e)
                if failure == "worker_died":
                    raise DataError(self._worker_death(e)) from None
                if failure != "timeout":
                    raise
        if isinstance(item, _Failure):
            raise item.error(item.message)
        return item

    def _worker_death(self, error: RuntimeError) -> str:
        """What to tell of a dead loader worker: which, how, the likely cause and the fix."""
        dead = [(i, p) for i, p in enumerate(self.workers) if not p.is_alive()]
        if not dead:
            return f"a loader worker died ({error}): {WORKER_DEATH_FIX}"
        told = []
        for i, process in dead:
            code = process.exitcode
            if code is not None and code < 0:
                how = f"was killed by {_signal_name(-code)}"
                if -code == signal.SIGKILL:
                    how += " (most likely by the kernel's out-of-memory killer: see `dmesg`)"
            else:
                how = f"exited with status {code}"
            told.append(f"loader worker {i} (pid {process.pid}) {how}")
        return f"{'; '.join(told)}: {WORKER_DEATH_FIX}"

    def _step_rows(self, stop: Callable[[], bool]) -> list[_Row]:
        """This rank's rows of the next step, in stream order."""
        if self._stale:
            self.close()
        if self._items is None:
            self._start()
        if self.num_workers == 0:
            set_stop_check(stop)
            try:
                return next(self._items)
            finally:
                set_stop_check(None)
        rows: list = [None] * len(self.stream_ids)
        for w in range(self.num_workers):  # worker w runs the streams at w, w + W, ...
            rows[w :: self.num_workers] = self._receive(stop)
        return rows

    def next_step(self, stop: Callable[[], bool] | None = None) -> list[Batch]:
        """This rank's rows of the next global batch, as micro-batches.

        When `stop()` turns true while waiting for data, raise `Interrupted` with the state
        as it was before this step (the next call starts again from there).
        """
        if self._all_dry:
            raise SourcesExhausted(
                "every source reached its max_epochs (every stream read its share of every "
                "epoch): raise data.sources[*].max_epochs or train for fewer steps"
            )
        try:
            rows = self._step_rows(stop or (lambda: False))
        except Exception:  # a stop, bad data, a dead worker: nothing of this step is kept
            self._abandon()  # workers (or in-process streams) restart from the snapshots
            raise
        counts: dict[str, float] = {}
        for row, stream_id in zip(rows, self.stream_ids, strict=True):
            assert row.stream == stream_id, "loader workers out of order"
            self.snapshots[str(stream_id)] = row.snapshot
            for key, value in row.counts.items():
                counts[key] = counts.get(key, 0.0) + value
        self._counts = counts
        self._all_dry = counts.get("dry_streams", 0.0) == self.settings.n_streams
        batches = micro_batches(
            [r.arrays for r in rows], self.micro_batch_size, self.cp_size, self.cp_rank
        )
        return [_pinned(b) for b in batches] if self.pin_memory else batches

    def _abandon(self) -> None:
        """End the workers' waits for stalled shards now and restart them before the next
        step; they are joined then (or at close), as a worker still starting up takes seconds."""
        self._stale = True
        if self._stop_workers is not None:
            self._stop_workers.set()

    def close(self) -> None:
        """End the workers; the next step restarts them from the snapshots."""
        self._abandon()
        shutdown_dataloader_workers(self._items)
        self._items, self._stop_workers, self._stale = None, None, False

    def __enter__(self) -> StreamingLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- metrics -----------------------------------------------------------------------------

    def count_keys(self) -> list[str]:
        """The additive counters of a step, in a fixed order (summed over ranks by the trainer)."""
        keys = ["pad_tokens", "split_docs", "dropped_docs", "dry_streams"]
        keys += ["dropped_tokens", "seq_len"]
        keys += [f"tokens/{n}" for n in self.names] + [f"skipped/{r}" for r in SKIP_REASONS]
        return keys

    def step_counts(self) -> list[float]:
        return [self._counts.get(k, 0.0) for k in self.count_keys()]

    def note_totals(self, counts: Sequence[float]) -> None:
        """Take in the step's counters summed over data-parallel ranks: streams done with
        their last pass give empty rows, and once every stream on every rank is, the next
        step raises `SourcesExhausted`."""
        c = dict(zip(self.count_keys(), counts, strict=True))
        self._all_dry = c["dry_streams"] == self.settings.n_streams

    def describe(self, counts: Sequence[float]) -> dict[str, float]:
        """Metrics from the step's counters summed over data-parallel ranks."""
        c = dict(zip(self.count_keys(), counts, strict=True))
        total = self.settings.n_streams * self.settings.seq_len
        metrics = {"data/padding": c["pad_tokens"] / total, "data/split_docs": c["split_docs"]}
        metrics["data/dropped_docs"] = c["dropped_docs"]
        if self.settings.packing == "decompose":  # the step's row length, tokens dropped
            metrics["data/seq_len"] = c["seq_len"] / self.settings.n_streams
            metrics["data/dropped_tokens"] = c["dropped_tokens"]
        used = sum(c[f"tokens/{n}"] for n in self.names) or 1.0
        for n in self.names:
            metrics[f"data/mix/{n}"] = c[f"tokens/{n}"] / used
        for r in SKIP_REASONS:
            if c[f"skipped/{r}"]:
                metrics[f"data/skipped/{r}"] = c[f"skipped/{r}"]
        if c["dry_streams"]:
            metrics["data/dry_streams"] = c["dry_streams"]
        return metrics

    # -- state -------------------------------------------------------------------------------

    def fingerprint(self) -> list:
        return [[s.name, len(s.urls), s.urls[0]] for s in self.sources]

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "n_streams": self.settings.n_streams,
            "sources": self.fingerprint(),
            "streams": dict(self.snapshots),
        }

    @staticmethod
    def merge_states(states: Sequence[dict]) -> dict:
        """One state from every data-parallel rank's (each holds its own streams)."""
        merged = dict(states[0])
        merged["streams"] = {k: v for s in states for k, v in s["streams"].items()}
        return merged

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError("the checkpoint's data state is not a streaming-loader state")
        if state["n_streams"] != self.settings.n_streams:
            raise CheckpointError(
                f"the checkpoint was made with train.global_batch_size={state['n_streams']} "
                f"(one data stream per row); it is {self.settings.n_streams} now: resume with "
                "the same global batch size (the data-parallel size may change)"
            )
        if state["sources"] != self.fingerprint():
            raise CheckpointError(
                f"the checkpoint's data sources {state['sources']} differ from data.sources "
                f"now {self.fingerprint()}: resume with the same data"
            )
        self.close()
        self.snapshots = {str(i): state["streams"].get(str(i)) for i in self.stream_ids}


def resolve_paths(paths: Sequence[str], cache_dir: str) -> list[str]:
    """Shard URLs of a source's paths; `builtin:<name>` entries are generated on first use."""

    builtin = {"builtin:demo": ensure_demo_shards, "builtin:demo:held_out": ensure_demo_held_out}
    urls: list[str] = []
    for path in paths:
        if path.startswith("builtin:"):
            if path not in builtin:
                raise ShardError(
                    f"data.paths: unknown built-in dataset {path!r}; have {sorted(builtin)}"
                )
            urls.extend(builtin[path](cache_dir))
        else:
            urls.extend(expand_paths([path]))
    return urls


def source_specs(cfg: Config) -> list[SourceSpec]:
    """`data.sources`, or `data.paths` as one source named `data`."""
    specs = []
    for source in cfg.data.source_list():
        if source.kind == "megatron":  # .bin/.idx prefixes: units of their index
            urls = unit_urls(source.paths)
        else:
            urls = resolve_paths(source.paths, cfg.data.cache_dir)
        if not urls:
            raise ShardError(f"data source {source.name!r}: its paths match no shards")
        if source.tokenize:
            warn_ignored(source.fields, f"data source {source.name!r}")
        specs.append(SourceSpec.from_config(source, urls))
    return specs


def stream_settings(cfg: Config) -> StreamSettings:
    """The streams' settings: `data.*` with the batch, seed, steps and vocabulary they need."""
    return StreamSettings.from_config(
        cfg.data,
        n_streams=cfg.train.global_batch_size,
        seed=cfg.train.seed,
        steps=cfg.train.steps,
        vocab_size=cfg.model.vocab_size,
    )


def build_loader(
    cfg: Config, dp_rank: int = 0, dp_size: int = 1, cp_rank: int = 0, cp_size: int = 1
) -> StreamingLoader:
    d = cfg.data
    return StreamingLoader(
        source_specs(cfg),
        stream_settings(cfg),
        cfg.train.micro_batch_size,
        dp_rank,
        dp_size,
        cp_rank,
        cp_size,
        num_workers=d.num_workers,
        prefetch=d.prefetch,
        pin_memory=cfg.train.device != "cpu" and torch.cuda.is_available(),
    )
