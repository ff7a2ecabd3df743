"""Collectives and host reads per training step, and steps/s, at TP 2 and FSDP 2 on CPU.

Each layout trains the parity suite's tiny model (dim 64, 4 layers) on the demo corpus with
2 gloo ranks (`mmfm.testing.run_distributed`, one thread each) through `Trainer.fit`, as
`mmfm train` runs it, with `logging.every=10`.

- count: `torch.distributed.all_reduce`, the functional all_reduce DTensor uses, and
  `Tensor.item` / `Tensor.tolist` are wrapped to count the calls made by the step's
  bookkeeping (the nearest mmfm frame is the trainer, `ParallelEnv` or the gradient code:
  `BOOKKEEPING`). The model's own communication (FSDP's all-gathers and reduce-scatters,
  tensor-parallel activations, the vocabulary-parallel loss) is not counted. A step is
  what happens between two `on_step_end` calls; reporting steps (logged or printed) and
  the others are counted apart.
- time: steps/s from the same run without the wrappers, median of the steps after a
  warm-up, every rank's step included (the slowest rank sets the pace anyway).

`--before DIR` measures the mmfm package in DIR too (e.g. the code at HEAD: `git archive
HEAD | tar -x -C DIR`), alternating with `--after DIR` (default: this checkout), each in a
fresh process with PYTHONPATH=DIR, and reports after / before.

    python bench/step_syncs.py [--layouts tp2 fsdp2] [--steps 40] [--repeats 3]
                               [--before DIR] [--after DIR] [--json bench/results/step_syncs.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"tp2": ["parallel.tp=2"], "fsdp2": ["parallel.dp_shard=2"]}
BOOKKEEPING = {"trainer.py", "env.py", "grads.py"}
"""Files whose calls are the step's bookkeeping: the trainer's reductions, `ParallelEnv`'s
collectives and the gradient norm / finalisation."""
HOST_READERS = {"trainer.py", "grads.py"}
"""Files whose `.item()` / `.tolist()` are host reads of the step (`ParallelEnv`'s are of
the CPU tensor that lists a mesh's ranks: no device sync)."""
EVERY = 10


def overrides(layout: list[str], steps: int, run_dir: str, every: int = EVERY) -> list[str]:
    """The run of one measurement: the tiny model, `layout`'s overrides, `steps` steps."""
    from mmfm.testing import tiny_demo_model

    return [
        *tiny_demo_model(),
        *layout,
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        f"train.steps={steps}",
        f"train.run_dir={run_dir}",
        f"logging.every={every}",
        "logging.print_every=1000",
        "logging.progress=false",
        "logging.tensorboard=false",
        "checkpoint.at_end=false",
        "data.num_workers=0",
    ]


def _mmfm_caller(depth: int = 2) -> str | None:
    """The file name of the nearest mmfm frame above the wrapper."""
    frame = sys._getframe(depth)
    while frame is not None:
        path = frame.f_code.co_filename
        if f"{os.sep}mmfm{os.sep}" in path:
            return Path(path).name
        frame = frame.f_back
    return None


class SyncCounter:
    """Counts the bookkeeping collectives and host reads while installed."""

    def __init__(self):
        self.collectives = self.host_reads = 0
        self._undo: list = []

    def _wrap(self, owner, name: str, files: set[str], field: str) -> None:
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            if _mmfm_caller() in files:
                setattr(self, field, getattr(self, field) + 1)
            return real(*args, **kwargs)

        setattr(owner, name, counted)
        self._undo.append((owner, name, real))

    def __enter__(self) -> SyncCounter:
        import torch
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        self._wrap(dist, "all_reduce", BOOKKEEPING, "collectives")
        self._wrap(funcol, "all_reduce", BOOKKEEPING, "collectives")
        for name in ("item", "tolist"):
            self._wrap(torch.Tensor, name, HOST_READERS, "host_reads")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, real in reversed(self._undo):
            setattr(owner, name, real)

    def take(self) -> dict[str, int]:
        counts = {"collectives": self.collectives, "host_reads": self.host_reads}
        self.collectives = self.host_reads = 0
        return counts


def measure(mode: str, cfg_overrides: list[str]) -> dict:
    """On each rank: train, and per step either the counts (`count`) or the time (`time`);
    with the logged metrics on rank 0."""
    from mmfm.config import load_config
    from mmfm.train.callbacks import Callback
    from mmfm.train.command import build_trainer

    cfg = load_config(None, cfg_overrides)
    trainer = build_trainer(cfg)
    counter = SyncCounter()
    steps: list = []

    class Record(Callback):
        def on_step_end(self, step, metrics):
            steps.append(counter.take() if mode == "count" else time.perf_counter())

    trainer.callbacks.append(Record())
    if mode == "count":
        with counter:
            trainer.fit()
    else:
        trainer.fit()
    metrics_file = Path(cfg.train.run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    return {"steps": steps, "metrics": rows if trainer.env.is_main else None}


def reporting(step: int, total: int, every: int = EVERY) -> bool:
    """Whether the trainer reduces the metrics of `step` (logged, or printed: the first and
    the last step)."""
    return step % every == 0 or step in (1, total)


def summarise_counts(steps: list[dict], every: int = EVERY) -> dict:
    """The counts of reporting and other steps: one number each where every such step has
    the same, else their sorted set (step 1, which also starts things, is left out)."""
    out = {}
    total = len(steps)
    for kind, want in (("reporting", True), ("other", False)):
        rows = [c for s, c in enumerate(steps, 1) if s > 1 and reporting(s, total, every) == want]
        for key in ("collectives", "host_reads"):
            values = sorted({r[key] for r in rows})
            out[f"{key}_{kind}"] = values[0] if len(values) == 1 else values
    return out


def child(args) -> None:
    from mmfm.testing import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        cfg = overrides(LAYOUTS[args.child_layout], args.steps, str(Path(tmp) / "run"))
        results = run_distributed(measure, 2, args=(args.child, cfg))
    Path(args.out).write_text(json.dumps(results))


def run_child(mmfm_dir: Path, mode: str, layout: str, steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", mode, "--child-layout", layout]
        cmd += ["--steps", str(steps), "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": str(mmfm_dir)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} {layout} with {mmfm_dir} failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def steps_per_s(ranks: list[dict], warmup: int) -> float:
    """Median over steps after `warmup` of the slowest rank's step time, as steps/s."""
    times = [r["steps"] for r in ranks]
    durations = [max(t[i] - t[i - 1] for t in times) for i in range(warmup + 1, len(times[0]))]
    return 1.0 / statistics.median(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", type=Path, help="the mmfm tree to compare against")
    parser.add_argument("--after", type=Path, default=ROOT)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", choices=["count", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--child-layout", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    versions = {"after": args.after} if args.before is None else {
        "before": args.before, "after": args.after
    }  # fmt: skip
    results = {}
    for layout in args.layouts:
        row: dict = {"layout": layout, "steps": args.steps}
        for name, tree in versions.items():
            ranks = run_child(tree, "count", layout, args.steps)
            row[name] = summarise_counts(ranks[0]["steps"])
            row[name]["loss"] = [m["loss"] for m in ranks[0]["metrics"]]
            row[name]["steps_per_s"] = []
        for _ in range(args.repeats):  # alternating, so that load changes hit both sides
            for name, tree in versions.items():
                ranks = run_child(tree, "time", layout, args.steps)
                row[name]["steps_per_s"].append(steps_per_s(ranks, args.warmup))
        for name in versions:
            row[name]["steps_per_s_median"] = statistics.median(row[name]["steps_per_s"])
        if "before" in versions:
            row["ratio"] = row["after"]["steps_per_s_median"] / row["before"]["steps_per_s_median"]
        results[layout] = row
        print(json.dumps(row), flush=True)
    print_table(results, list(versions))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


def print_table(results: dict, versions: list[str]) -> None:
    print("\n| layout | code | collectives (other / reporting step) | host reads | steps/s |")
    print("|---|---|---|---|---|")
    for layout, row in results.items():
        for name in versions:
            r = row[name]
            print(
                f"| {layout} | {name} | {r['collectives_other']} / {r['collectives_reporting']} "
                f"| {r['host_reads_other']} / {r['host_reads_reporting']} "
                f"| {r['steps_per_s_median']:.2f} |"
            )
        if "ratio" in row:
            print(f"| {layout} | after / before | | | {row['ratio']:.3f}x |")


if __name__ == "__main__":
    main()
