"""The streaming loader: virtual streams -> packed rows -> this rank's micro-batches.

There is one virtual stream per row of the global batch (`mmfm.data.stream`): row i of
every step comes from stream i, so the global batches do not depend on the layout. A
data-parallel rank owns the contiguous block of streams whose rows it trains on and reads
only their shards; its loader workers (processes) split those streams among themselves and
run ahead by `data.prefetch` steps. Every row arrives with its stream's state as of that
row, so the state saved at a step boundary is exact even though workers run ahead. A
context-parallel rank then keeps its zigzag chunks of every row. A stream that has read its
share of every capped source gives empty rows (no targets); the step after the one at which
every stream on every rank is dry (the `dry_streams` counter, summed over ranks by the
trainer) raises `SourcesExhausted` on every rank.

State: `{stream id: stream state}` for all streams, gathered from every rank at checkpoint
time; any data-parallel size (and any number of workers) can resume from it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmfm.config.schema import Config, SourceConfig
from mmfm.core.errors import DataError
from mmfm.core.types import Batch
from mmfm.core.zigzag import zigzag_slice
from mmfm.data import orphans
from mmfm.data.demo import ensure_demo_shards
from mmfm.data.packing import RowBuilder, RowStats, modality_weight_table
from mmfm.data.shards import ShardError, expand_paths
from mmfm.data.stream import (
    SKIP_REASONS,
    SourcesExhausted,
    SourceSpec,
    StreamSettings,
    VirtualStream,
)
from mmfm.data.tario import Interrupted, set_stop_check

STATE_FORMAT = "mmfm-streams/1"


def collate(rows: list[dict[str, np.ndarray]]) -> Batch:
    return Batch(**{name: torch.from_numpy(np.stack([r[name] for r in rows])) for name in rows[0]})


@dataclass
class _Row:
    stream: int
    arrays: dict[str, np.ndarray]
    counts: dict[str, float]
    snapshot: dict


def _produce(stream: VirtualStream, names: Sequence[str]) -> _Row:
    """The stream's next row; once it ran dry, empty rows until every stream has."""
    try:
        arrays, stats, skipped = stream.next_row()
    except SourcesExhausted:
        settings = stream.settings
        arrays = RowBuilder(settings.seq_len, np.asarray(settings.weights, np.float32)).finish()
        stats, skipped = RowStats(pad=settings.seq_len, dry=True), {}
    counts = {"pad_tokens": float(stats.pad), "split_docs": float(stats.split)}
    counts["dropped_docs"] = float(stats.dropped)
    counts["dry_streams"] = float(stats.dry)
    for source, tokens in stats.tokens_by_source.items():
        counts[f"tokens/{names[source]}"] = float(tokens)
    for reason, n in skipped.items():
        counts[f"skipped/{reason}"] = float(n)
    return _Row(stream.id, arrays, counts, stream.snapshot())


def _build_streams(ids, sources, settings, snapshots) -> list[VirtualStream]:
    streams = []
    for i in ids:
        stream = VirtualStream(i, sources, settings)
        if snapshots.get(str(i)) is not None:
            stream.restore(snapshots[str(i)])
        streams.append(stream)
    return streams


def _worker(ids, sources, settings, snapshots, out: mp.Queue) -> None:
    """Produce rows for `ids`, step after step, until the parent goes away (started through
    `orphans.run`, so it also goes when the parent is killed)."""
    try:
        streams = _build_streams(ids, sources, settings, snapshots)
        names = [s.name for s in sources]
        while True:
            for stream in streams:
                out.put(_produce(stream, names))
    except DataError as e:  # bad or too little data: the message says what to change
        out.put(("data", str(e)))
    except SystemExit:  # stopped by the parent (close) or because it is gone
        out.cancel_join_thread()  # rows nobody will read: exit without flushing them
        raise
    except BaseException:
        out.put(("error", traceback.format_exc()))


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
    ):
        n = settings.n_streams
        assert n % dp_size == 0
        self.sources, self.settings = list(sources), settings
        self.micro_batch_size = micro_batch_size
        self.cp_rank, self.cp_size = cp_rank, cp_size
        per_rank = n // dp_size
        self.stream_ids = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
        self.num_workers = min(num_workers, per_rank)
        self.prefetch = prefetch
        self.snapshots: dict[str, dict | None] = {str(i): None for i in self.stream_ids}
        self._streams: list[VirtualStream] | None = None
        self._procs: list = []
        self._queues: list = []
        self._counts: dict[str, float] = {}
        self._all_dry = False
        """Every stream (on every rank) has run dry: the next step raises SourcesExhausted."""

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    # -- rows --------------------------------------------------------------------------------

    def _start(self) -> None:
        if self.num_workers == 0:
            self._streams = _build_streams(
                self.stream_ids, self.sources, self.settings, self.snapshots
            )
            return
        ctx = mp.get_context("spawn")
        for w in range(self.num_workers):
            ids = self.stream_ids[w :: self.num_workers]
            q = ctx.Queue(maxsize=max(1, self.prefetch * len(ids)))
            snapshots = {str(i): self.snapshots[str(i)] for i in ids}
            payload = pickle.dumps((ids, self.sources, self.settings, snapshots))
            p = ctx.Process(
                target=orphans.run,
                args=(os.getpid(), "mmfm.data.loader:_worker", payload, q),
                daemon=True,
            )
            p.start()
            self._procs.append(p)
            self._queues.append(q)

    def _next_row(self, position: int, stop: Callable[[], bool]) -> _Row:
        if self._streams is not None:
            set_stop_check(stop)
            try:
                return _produce(self._streams[position], self.names)
            finally:
                set_stop_check(None)
        q = self._queues[position % self.num_workers]
        while True:
            try:
                item = q.get(timeout=0.25)  # short, so that a stop is honoured while waiting
                break
            except queue.Empty:
                if stop():
                    raise Interrupted("stopped while waiting for a loader worker") from None
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    raise DataError(
                        f"a loader worker died (exit code {dead[0].exitcode})"
                    ) from None
        if isinstance(item, tuple):
            kind, text = item
            raise DataError(text if kind == "data" else f"a loader worker failed:\n{text}")
        return item

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
        if self._streams is None and not self._procs:
            self._start()
        rows, counts = [], {}
        before = dict(self.snapshots)
        try:
            for position, stream_id in enumerate(self.stream_ids):
                row = self._next_row(position, stop or (lambda: False))
                assert row.stream == stream_id, "loader workers out of order"
                self.snapshots[str(stream_id)] = row.snapshot
                rows.append(row.arrays)
                for key, value in row.counts.items():
                    counts[key] = counts.get(key, 0.0) + value
        except Interrupted:
            self.close()  # workers (or in-process streams) restart from the snapshots
            self._streams = None
            self.snapshots = before
            raise
        self._counts = counts
        self._all_dry = counts.get("dry_streams", 0.0) == self.settings.n_streams
        mbs = self.micro_batch_size
        return [
            zigzag_slice(collate(rows[i : i + mbs]), self.cp_size, self.cp_rank)
            for i in range(0, len(rows), mbs)
        ]

    def close(self) -> None:
        for p in self._procs:
            p.terminate()  # SIGTERM: the worker ends its pipe commands, then exits
        for p in self._procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs, self._queues = [], []

    # -- metrics -----------------------------------------------------------------------------

    def count_keys(self) -> list[str]:
        """The additive counters of a step, in a fixed order (summed over ranks by the trainer)."""
        keys = ["pad_tokens", "split_docs", "dropped_docs", "dry_streams"]
        keys += [f"tokens/{n}" for n in self.names] + [f"skipped/{r}" for r in SKIP_REASONS]
        return keys

    def step_counts(self) -> list[float]:
        return [self._counts.get(k, 0.0) for k in self.count_keys()]

    def describe(self, counts: Sequence[float]) -> dict[str, float]:
        """Metrics from the step's counters summed over data-parallel ranks."""
        c = dict(zip(self.count_keys(), counts, strict=True))
        # streams done with one pass give empty rows; once all are, the next step stops
        self._all_dry = c["dry_streams"] == self.settings.n_streams
        total = self.settings.n_streams * self.settings.seq_len
        metrics = {"data/padding": c["pad_tokens"] / total, "data/split_docs": c["split_docs"]}
        metrics["data/dropped_docs"] = c["dropped_docs"]
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
            raise ShardError("the checkpoint's data state is not a streaming-loader state")
        if state["n_streams"] != self.settings.n_streams:
            raise ShardError(
                f"the checkpoint was made with train.global_batch_size={state['n_streams']} "
                f"(one data stream per row); it is {self.settings.n_streams} now: resume with "
                "the same global batch size (the data-parallel size may change)"
            )
        if state["sources"] != self.fingerprint():
            raise ShardError(
                f"the checkpoint's data sources {state['sources']} differ from data.sources "
                f"now {self.fingerprint()}: resume with the same data"
            )
        self.close()
        self._streams = None
        self.snapshots = {str(i): state["streams"].get(str(i)) for i in self.stream_ids}


def resolve_paths(paths: Sequence[str], cache_dir: str) -> list[str]:
    """Shard URLs of a source's paths; `builtin:<name>` entries are generated on first use."""

    builtin = {"builtin:demo": ensure_demo_shards}
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
    configs = list(cfg.data.sources) or [SourceConfig(name="data", paths=list(cfg.data.paths))]
    specs = []
    for source in configs:
        urls = resolve_paths(source.paths, cfg.data.cache_dir)
        if not urls:
            raise ShardError(f"data source {source.name!r}: its paths match no shards")
        specs.append(SourceSpec(source.name, tuple(urls), source.weight, source.max_epochs))
    return specs


def build_loader(
    cfg: Config, dp_rank: int = 0, dp_size: int = 1, cp_rank: int = 0, cp_size: int = 1
) -> StreamingLoader:
    d = cfg.data
    settings = StreamSettings(
        n_streams=cfg.train.global_batch_size,
        seq_len=d.seq_len,
        seed=cfg.train.seed,
        weights=tuple(modality_weight_table(d.loss_weights).tolist()),
        shuffle_buffer=d.shuffle_buffer,
        shuffle_buffer_tokens=d.shuffle_buffer_tokens,
        packing=d.packing,
        pack_buffer=d.pack_buffer,
        long_docs=d.long_docs,
        max_error_rate=d.max_error_rate,
        vocab_size=cfg.model.vocab_size,
        read_timeout_s=d.read_timeout_s,
    )
    return StreamingLoader(
        source_specs(cfg),
        settings,
        cfg.train.micro_batch_size,
        dp_rank,
        dp_size,
        cp_rank,
        cp_size,
        num_workers=d.num_workers,
        prefetch=d.prefetch,
    )
