"""Document-masked attention: each backend's time as a ratio of dense causal SDPA on the row.

One packed row of 4096 tokens (8 query heads, 4 kv heads, head_dim 32, fp32), forward +
backward of the attention call, for 8 documents of 512 tokens and for 8 documents of unequal
lengths with the same total. Every timing is the median of interleaved repeats in one run,
so the ratios hold even on a noisy machine. FlexAttention has no backward on CPU: there it is
timed forward-only, against the dense causal forward.

    python bench/attention.py [--seq 4096] [--repeats 7] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mmfm.model.attention import BACKENDS

LAYOUTS = {
    "8 x 512": [512] * 8,
    "8 unequal": [1024, 768, 640, 512, 448, 384, 256, 64],
}


def dense_causal(q, k, v, _mask):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return out.transpose(1, 2)


def make_case(lengths, seq, heads, kv_heads, head_dim, device):
    scale = seq / sum(lengths)
    lengths = [max(1, round(n * scale)) for n in lengths]
    lengths[0] += seq - sum(lengths)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None].to(device)
    shapes = [(1, seq, heads, head_dim), (1, seq, kv_heads, head_dim), (1, seq, kv_heads, head_dim)]
    return doc_ids, [torch.randn(s, device=device) for s in shapes]


def timed(fn, q, k, v, mask, backward: bool, device) -> float:
    inputs = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*inputs, mask)
    if backward:
        out.sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_layout(name, lengths, args, device) -> list[tuple[str, str, float, float]]:
    doc_ids, (q, k, v) = make_case(lengths, args.seq, args.heads, args.kv_heads, 32, device)
    cases = {}  # label -> (fn, mask, backward)
    for backend_name, cls in BACKENDS.items():
        backend = cls()
        backward = not (backend_name == "flex" and device.type == "cpu")
        start = time.perf_counter()
        mask = backend.prepare(doc_ids)
        cases[backend_name] = (backend, mask, backward, time.perf_counter() - start)
    cases["dense causal (fwd+bwd)"] = (dense_causal, None, True, 0.0)
    cases["dense causal (fwd)"] = (dense_causal, None, False, 0.0)
    for fn, mask, backward, _ in cases.values():  # warm-up, including flex compilation
        timed(fn, q, k, v, mask, backward, device)
        timed(fn, q, k, v, mask, backward, device)
    samples = {label: [] for label in cases}
    for _ in range(args.repeats):  # interleaved, so drift hits every case alike
        for label, (fn, mask, backward, _) in cases.items():
            samples[label].append(timed(fn, q, k, v, mask, backward, device))
    median = {label: statistics.median(s) for label, s in samples.items()}
    rows = []
    for backend_name in BACKENDS:
        backward = cases[backend_name][2]
        ref = "dense causal (fwd+bwd)" if backward else "dense causal (fwd)"
        what = "fwd+bwd" if backward else "fwd only"
        ratio = median[backend_name] / median[ref]
        rows.append((name, f"{backend_name} ({what})", median[backend_name], ratio))
        rows[-1] += (cases[backend_name][3],)
    rows.append((name, "dense causal (fwd+bwd)", median["dense causal (fwd+bwd)"], 1.0, 0.0))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {device}, threads {torch.get_num_threads()}, seq {args.seq}")
    print("| row | backend | median ms | x dense causal | prepare ms (once per batch) |")
    print("|---|---|---|---|---|")
    for name, lengths in LAYOUTS.items():
        for row, label, seconds, ratio, prep in bench_layout(name, lengths, args, device):
            print(f"| {row} | {label} | {seconds * 1e3:.1f} | {ratio:.2f} | {prep * 1e3:.1f} |")


if __name__ == "__main__":
    main()
