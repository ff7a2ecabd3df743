"""The loss over the vocabulary: mmfm's chunked cross-entropy against `F.cross_entropy`.

Forward + backward of the per-token cross-entropy of `[tokens, vocab]` logits (4096 x 16384
by default, the shape of bench/train_step.py), in fp32 and in bf16 (as autocast leaves the
output projection's logits). Time: median of interleaved repeats in one process. Memory: the
peak resident memory (VmHWM, reset once the logits exist) of a fresh process doing one
forward + backward, above its resident memory at that point: what the loss itself allocates
and keeps.

    python bench/cross_entropy.py [--tokens 4096] [--vocab 16384] [--repeats 7]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from mmfm.core.types import IGNORE_INDEX
from mmfm.train.loss import ChunkedCrossEntropy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def torch_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")


KINDS = {"torch": torch_ce, "chunked": ChunkedCrossEntropy.apply}


def inputs(tokens: int, vocab: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, vocab, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    return logits, labels


def step(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    KINDS[kind](logits, labels).sum().backward()
    logits.grad = None


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    """VmHWM: the peak resident memory since the last `reset_peak()`."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set (Linux)


def memory_child(kind: str, dtype: str, tokens: int, vocab: int) -> None:
    logits, labels = inputs(tokens, vocab, DTYPES[dtype])
    reset_peak()
    before = rss_mib()
    step(kind, logits, labels)
    print(peak_mib() - before)


def measure_memory(kind: str, dtype: str, args) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, dtype, str(args.tokens), str(args.vocab)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, dtype, tokens, vocab = args.child
        memory_child(kind, dtype, int(tokens), int(vocab))
        return

    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"{args.tokens} x {args.vocab} logits ({logits_mib:.0f} MiB in fp32), fwd + bwd")
    print("| logits | loss | median ms | x torch | peak MiB over the logits | x torch |")
    print("|---|---|---|---|---|---|")
    for dtype in DTYPES:
        logits, labels = inputs(args.tokens, args.vocab, DTYPES[dtype])
        times = {kind: [] for kind in KINDS}
        for _ in range(args.repeats + 1):  # the first round warms up
            for kind in KINDS:
                start = time.perf_counter()
                step(kind, logits, labels)
                times[kind].append(time.perf_counter() - start)
        ms = {kind: 1000 * statistics.median(t[1:]) for kind, t in times.items()}
        mem = {kind: measure_memory(kind, dtype, args) for kind in KINDS}
        for kind in KINDS:
            print(
                f"| {dtype} | {kind} | {ms[kind]:.0f} | {ms[kind] / ms['torch']:.2f} | "
                f"{mem[kind]:.0f} | {mem[kind] / mem['torch']:.2f} |"
            )


if __name__ == "__main__":
    main()
