"""Run a function on N local processes, the way `torchrun` would, and collect the results.

    results = run_distributed(fn, world_size=4, args=(...))   # fn(*args) on ranks 0..3

Each process gets RANK, WORLD_SIZE, LOCAL_RANK and a free MASTER_PORT in its environment (so
`ParallelEnv.from_config` starts gloo on CPU), one thread, and its return value or traceback
travels back. Used by the tests and benchmarks to compare layouts against one process.
The ranks fork from a `forkserver` that imported torch and the trainer once per calling
process (a fresh interpreter, single-threaded when it forks): a `spawn`ed rank spent 3-10 s
importing them, up to 8 ranks a test.

The other helpers are what spawned ranks and the benchmarks need as well as the tests: the
tiny model's overrides (`tiny_shape`, `tiny_demo_model`), packed rows built by hand
(`packed_batch`), a training run's rows of metrics.jsonl (`train_metrics`, `read_metrics`) and a
small VOC-style segmentation export (`voc_export`), and streams' settings and sources built
from the configuration, so with a user's defaults (`stream_settings`, `source_spec`). What
only the tests use is in tests/helpers.py.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import pickle
import random
import socket
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from mmfm.config.schema import DataConfig, SourceConfig
from mmfm.core.types import IGNORE_INDEX, Batch
from mmfm.data.settings import SourceSpec, StreamSettings


class DistributedError(RuntimeError):
    """A rank raised; the message holds its traceback."""


_PORT_LOCKS: collections.deque = collections.deque(maxlen=32)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, for a listener started after this call
    returns (the rendezvous store of `run_distributed`, SLURM's daemons).

    A port the kernel picks (bind to 0) sits in the ephemeral range, which the kernel goes on
    handing out, to the gloo connections of other tests among others, between this call and the
    listener's bind. So the port comes from just below that range, which the kernel never hands
    out by itself, and is reserved under a lock file (held for this process's 32 latest ports,
    dropped at its exit) so that two test processes never get the same one."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:  # not Linux
        low = 0
    first = max(1024, low - 16384)
    if low - first < 1024:  # no room below the range (or unknown): the kernel's pick
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    locks = Path(tempfile.gettempdir()) / "mmfm-ports"
    locks.mkdir(exist_ok=True)
    rng = random.Random()  # not the tests' seeded generator: workers must not all agree
    for _ in range(200):
        port = rng.randrange(first, low)
        lock = open(locks / str(port), "a")  # noqa: SIM115 (held open: it is the reservation)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
        except OSError:  # reserved by another process, or in use
            lock.close()
            continue
        if len(_PORT_LOCKS) == _PORT_LOCKS.maxlen:
            _PORT_LOCKS[0].close()
        _PORT_LOCKS.append(lock)
        return port
    raise RuntimeError(f"no free port in {first}..{low - 1} after 200 tries")


# What every rank imports, loaded once in the forkserver that the ranks fork from.
_PRELOAD = ["torch", "torch.distributed", "mmfm.train.command", "mmfm.testing"]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable,
    args: Sequence,
    queue,
    environ: dict[str, str],
) -> None:
    # The forkserver's environment is the caller's when the server started; a rank sees the
    # caller's environment as of this call, as a spawned process would.
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        # Plain pickle (a copy), not torch's shared-memory handles, which die with the process.
        queue.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable, world_size: int, args: Sequence = (), timeout: float = 600
) -> list[Any]:
    """`fn(*args)` on `world_size` spawned processes; their return values by rank."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # used when the server starts: at the first call
    queue = ctx.Queue()
    port = free_port()
    environ = dict(os.environ)
    procs = [
        ctx.Process(
            target=_worker, args=(r, world_size, port, fn, args, queue, environ), daemon=False
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(value)  # from our own child processes
            else:
                errors.append(f"rank {rank}:\n{value}")
                break  # the other ranks may now wait forever on a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise DistributedError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def tiny_shape(n_layers: int = 2, seq_len: int = 128, max_seq_len: int | None = None) -> list[str]:
    """Dotted overrides for the tests' tiny Llama: dim 64, 4 heads, 2 KV heads (grouped-query,
    and divisible by tp=2), `n_layers` blocks, rows of `seq_len` tokens: 0.14M parameters at
    2 layers on the demo vocabulary, so that a test trains it in seconds on CPU."""
    return [
        "model.dim=64",
        f"model.n_layers={n_layers}",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.ffn_multiple_of=32",
        f"model.max_seq_len={max_seq_len or seq_len}",
        f"data.seq_len={seq_len}",
    ]


def tiny_demo_model(n_layers: int = 4, seq_len: int = 64) -> list[str]:
    """`tiny_shape` on the built-in demo corpus, with the demo's vocabulary size: the model
    the parity tests train at every layout. The loader runs in each rank's own process (no
    worker): a spawned worker costs each of up to 8 ranks a torch import on 2 cores, and the
    workers' own exactness is tested in tests/unit/test_loader.py."""
    from mmfm.data.demo import DEMO_VOCAB_SIZE

    shape = tiny_shape(n_layers, seq_len)
    demo = ["data.paths=[builtin:demo]", "data.num_workers=0"]
    return [f"model.vocab_size={DEMO_VOCAB_SIZE}", *shape, *demo]


def packed_batch(lengths: Sequence[Sequence[int]], vocab_size: int = 2, seed: int = 0) -> Batch:
    """Rows of documents of `lengths` (one list per row, every row the same total) with random
    tokens, laid out as the loader packs them: positions restart at 0 and the labels are the
    next token of the same document (none after a document's last token)."""
    doc_ids = torch.stack(
        [torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths]
    )
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, doc_ids.shape, generator=gen)
    labels = torch.roll(tokens, -1, dims=1)
    last = torch.roll(positions, -1, dims=1) == 0  # the next slot starts a new document
    labels[last] = IGNORE_INDEX
    weights = (labels != IGNORE_INDEX).float()
    return Batch(tokens, labels, positions, doc_ids, weights, torch.zeros_like(tokens))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of `run_dir`/metrics.jsonl, one dict per logged step."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_metrics(overrides: Sequence[str], recipe: str | Path | None = None) -> list[dict] | None:
    """Train `recipe` (None: the defaults) with `overrides` (on this process's share) and
    return the rows of metrics.jsonl on the main rank, None on the others."""
    from mmfm.config import load_config
    from mmfm.train.command import train

    cfg = load_config(recipe, overrides)
    train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return read_metrics(cfg.train.run_dir)


def voc_palette() -> list[int]:
    """VOC's colour map (bit-interleaved index -> RGB), as its label PNGs carry it."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def voc_export(root: str | Path, photos: str | Path) -> Path:
    """A labelme2voc-style export at `root` (JPEGImages/, SegmentationClassPNG/ palette PNGs,
    class_names.txt) of five real photos from `photos` (the `real:photos` folder), each a
    labelled rectangle of its class ringed by a void (255) border."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClassPNG").mkdir(exist_ok=True)
    stems = ("chelsea", "coffee", "astronaut", "motorcycle_left", "camera")
    for label_id, stem in enumerate(stems, start=1):
        photo = Image.open(Path(photos) / f"{stem}.png").convert("RGB")
        photo.save(root / "JPEGImages" / f"{stem}.jpg")
        h, w = photo.size[::-1]
        label = np.zeros((h, w), np.uint8)
        label[h // 4 - 2 : 3 * h // 4 + 2, w // 4 - 2 : 3 * w // 4 + 2] = 255
        label[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = label_id
        png = Image.fromarray(label, mode="P")
        png.putpalette(voc_palette())
        png.save(root / "SegmentationClassPNG" / f"{stem}.png")
    (root / "class_names.txt").write_text("_background_\ncat\ncup\nperson\nmotorbike\ncamera\n")
    return root


def stream_settings(
    n_streams: int, seed: int = 0, steps: int = 1, vocab_size: int = 0, **data: Any
) -> StreamSettings:
    """The `StreamSettings` of `DataConfig(**data)` for `n_streams` streams, as `build_loader`
    makes them (token ids unchecked unless `vocab_size`)."""
    return StreamSettings.from_config(
        DataConfig(**data), n_streams=n_streams, seed=seed, steps=steps, vocab_size=vocab_size
    )


def source_spec(name: str, urls: Sequence[str], weight: float = 1.0, **source: Any) -> SourceSpec:
    """The `SourceSpec` of `SourceConfig(name, urls, weight, **source)` whose paths are `urls`."""
    config = SourceConfig(name=name, paths=list(urls), weight=weight, **source)
    return SourceSpec.from_config(config, urls)
