"""Context-parallel attention: peak memory and time per rank at CP = 1, 2, 4, ring vs all-gather.

One forward + backward of the attention call on a packed row of `--seq` tokens (4 query /
2 kv heads, head_dim 32, fp32, gloo on CPU), for one causal document and for 8 equal
documents. Each configuration runs in fresh processes; a rank's peak memory is the growth of
its resident set (VmHWM, reset just before) over what it held with its inputs allocated, so
it counts the attention's activations, buffers and gradients. CP = 1 runs the same ring code
on one rank. Pairs: the (query chunk, key chunk) pairs the ring computed, summed over ranks,
against the 4 x cp^2 a dense pass would compute.

On 2 cores, CP = 4 runs 4 processes on 2 cores: its wall time is not a speed-up measurement.

    python bench/ring_attention.py [--seq 16384]
"""

from __future__ import annotations

import argparse
import statistics
import time

from mmfm.testing import run_distributed


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_rank(seq: int, docs: int, backend: str, repeats: int) -> dict:
    import torch
    import torch.distributed as dist

    from mmfm.core.zigzag import zigzag_indices
    from mmfm.parallel.context_parallel import AllGatherAttention, RingAttention, build_kernel

    dist.init_process_group("gloo")
    cp, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    doc_ids = torch.arange(docs).repeat_interleave(seq // docs)[None]
    index = zigzag_indices(seq, cp, rank)
    local = seq // cp
    q = torch.randn(1, local, 4, 32, generator=gen)
    k = torch.randn(1, local, 2, 32, generator=gen)
    v = torch.randn(1, local, 2, 32, generator=gen)
    grad = torch.randn(1, local, 4, 32, generator=gen)
    if backend == "ring":
        attention = RingAttention(dist.group.WORLD, build_kernel("auto", torch.device("cpu")))
    else:
        attention = AllGatherAttention(dist.group.WORLD)

    def step():
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        plan = attention.prepare(doc_ids[:, index])
        attention(*inputs, plan).backward(grad)
        return plan

    step()  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM)
    before = _kib("VmRSS")
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        plan = step()
        times.append(time.perf_counter() - start)
    peak = _kib("VmHWM") - before
    computed = 0
    if backend == "ring":
        computed = sum(v for k, v in plan.stats.items() if k != "skip")
    return {"peak_mib": peak / 1024, "seconds": statistics.median(times), "pairs": computed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"row of {args.seq} tokens, 4 / 2 heads, head_dim 32, fp32, gloo, 2 CPU cores")
    print("| row | backend | cp | peak MiB per rank (max) | x cp=1 | seconds | pairs computed |")
    print("|---|---|---|---|---|---|---|")
    for docs, row in ((1, "1 document"), (8, "8 documents")):
        for backend in ("ring", "allgather"):
            base = None
            for cp in (1, 2, 4):
                results = run_distributed(
                    run_rank, cp, args=(args.seq, docs, backend, args.repeats)
                )
                peak = max(r["peak_mib"] for r in results)
                base = base or peak
                seconds = max(r["seconds"] for r in results)
                pairs = sum(r["pairs"] for r in results)
                pair_text = f"{pairs} / {4 * cp * cp}" if backend == "ring" else "-"
                print(
                    f"| {row} | {backend} | {cp} | {peak:.0f} | {peak / base:.2f} | "
                    f"{seconds:.2f} | {pair_text} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
