"""How long a training step is blocked per checkpoint, synchronous vs `checkpoint.async_save`.

One process trains a model whose checkpoint (weights and AdamW's two moments, fp32) is a
few hundred MB on the demo corpus through `Trainer.fit`, as `mmfm train` runs it, saving
every `--every` steps; synchronous and asynchronous runs alternate (`--repeats` of each).
The time a save blocks the loop is what `Checkpointer.save` and `Checkpointer.finish` take on
the training thread: all of the write for a synchronous save; for a background save the
staging copy and DCP's plan, plus any wait for the write at the next save or at the end (a
write still running then is waited for). Also reported: the step time while a background
write runs against steps without one (the write shares the cores and the GIL with
training), and how long a background write took.

    python bench/checkpoint_async.py [--dim 768] [--layers 6] [--steps 13] [--every 4]
        [--repeats 3] [--dir /tmp] [--json bench/results/checkpoint_async.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmfm.config import load_config
from mmfm.testing import tiny_demo_model
from mmfm.train.callbacks import Callback
from mmfm.train.checkpoint import Checkpointer
from mmfm.train.command import build_trainer


class _StepTimes(Callback):
    """Each step's wall time, and whether a background write ran at its start."""

    def __init__(self):
        self.rows: list[tuple[float, bool]] = []
        self._last = time.perf_counter()
        self._writing = False

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        self.rows.append((now - self._last, self._writing))
        self._writing = self.trainer.checkpointer.writing()  # the write just started runs next
        self._last = time.perf_counter()  # the save itself is timed apart


class _Timed:
    """Wraps `Checkpointer.save` and `finish` to add up the time they block the loop, and
    notes when each background write ends."""

    def __init__(self):
        self.blocked: list[float] = []
        self.writes: list[float] = []
        self._save, self._finish = Checkpointer.save, Checkpointer.finish

    def install(self) -> None:
        timed = self

        def save(checkpointer, *args, **kwargs):
            start = time.perf_counter()
            try:
                return timed._save(checkpointer, *args, **kwargs)
            finally:
                timed.blocked.append(time.perf_counter() - start)
                pending = checkpointer._in_flight
                if pending is not None:
                    pending.future.add_done_callback(
                        lambda _: timed.writes.append(time.perf_counter() - start)
                    )

        def finish(checkpointer):
            start = time.perf_counter()
            waited = checkpointer._in_flight is not None
            timed._finish(checkpointer)
            if waited and timed.blocked:
                timed.blocked[-1] += time.perf_counter() - start  # charged to its save

        Checkpointer.save, Checkpointer.finish = save, finish

    def uninstall(self) -> None:
        Checkpointer.save, Checkpointer.finish = self._save, self._finish


def run_once(args, background: bool, root: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=root))
    overrides = [
        *tiny_demo_model(n_layers=args.layers, seq_len=64),
        f"model.dim={args.dim}",
        "model.n_heads=8",
        "model.n_kv_heads=8",
        "train.global_batch_size=2",
        "train.micro_batch_size=2",
        f"train.steps={args.steps}",
        f"train.run_dir={run_dir}",
        f"checkpoint.every={args.every}",
        "checkpoint.at_end=false",
        "checkpoint.keep=1",
        f"checkpoint.async_save={str(background).lower()}",
        "logging.progress=false",
        "logging.print_every=1000",
        "logging.tensorboard=false",
    ]
    trainer = build_trainer(load_config(None, overrides))
    steps = _StepTimes()
    trainer.callbacks.append(steps)
    timed = _Timed()
    timed.install()
    try:
        with trainer:
            trainer.fit()
    finally:
        timed.uninstall()
    ckpt = Checkpointer(run_dir / "checkpoints", 1).latest()
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    plain = [t for t, writing in steps.rows[1:] if not writing]  # the first step warms up
    during = [t for t, writing in steps.rows[1:] if writing]
    return {
        "mode": "async" if background else "sync",
        "checkpoint_mb": size / 1e6,
        "blocked_s": timed.blocked,
        "blocked_s_median": statistics.median(timed.blocked),
        "write_s": timed.writes,
        "step_s_without_write": statistics.median(plain) if plain else None,
        "step_s_during_write": statistics.median(during) if during else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the checkpoints are written")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.getLogger("mmfm").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    rows: dict[str, list[dict]] = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        for _ in range(args.repeats):
            for background in (False, True):
                row = run_once(args, background, Path(root))
                rows[row["mode"]].append(row)
                print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}))
    sync = statistics.median(b for r in rows["sync"] for b in r["blocked_s"])
    background = statistics.median(b for r in rows["async"] for b in r["blocked_s"])
    during = [r["step_s_during_write"] for r in rows["async"] if r["step_s_during_write"]]
    plain = [r["step_s_without_write"] for r in rows["async"] if r["step_s_without_write"]]
    summary = {
        "checkpoint_mb": rows["sync"][0]["checkpoint_mb"],
        "blocked_s_per_save_sync": sync,
        "blocked_s_per_save_async": background,
        "async_over_sync": background / sync,
        "async_write_s_median": statistics.median(w for r in rows["async"] for w in r["write_s"]),
        "step_s_during_write_over_without": (
            statistics.median(during) / statistics.median(plain) if during and plain else None
        ),
        "torch": torch.__version__,
        "args": vars(args),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
