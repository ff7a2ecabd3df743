"""The GPU measurement, in one short run on one H200 (about 5 minutes): tests, throughput, MFU.

1. `pytest -m gpu tests` (the bf16 / CUDA paths; one GPU, so no NCCL).
2. A ~1B-parameter Llama (dim 2048, 16 layers, 16 heads / 8 kv heads, the 44,953-id
   unified vocabulary) trained at bf16 on packed rows of 8192 tokens (8 documents of 1024),
   through `Trainer.train_step` exactly as `mmfm train` runs it, once per attention backend
   (`flex` with compiled blocks, `docs` = cuDNN / flash causal SDPA per document). Reported:
   tokens/s, model TFLOP/s, MFU against 790 TFLOP/s (the H200's measured bf16 dense peak),
   peak memory.

Model FLOPs per token = 6 N (N = parameters except the input embedding, which is a lookup)
+ 12 L d k, where k is the mean number of keys a query attends to (a causal document of
length n: (n + 1) / 2), d the model width and L the layers: forward and backward of the
QK^T and AV matmuls. Results go to `--out` (JSON) and stdout; bench/README.md quotes them.

    python bench/gpu.py [--out bench/results/gpu.json]      # on the GPU machine
    python bench/gpu.py --dry-run                           # CPU, tiny model: checks the script
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import fixed_batch_trainer, packed_row

from mmfm.config.schema import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
H200_BF16_PEAK = 790e12
ONE_B = ModelConfig(
    vocab_size=44953, dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, max_seq_len=8192
)  # fmt: skip
TINY = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)


def model_flops_per_token(cfg: ModelConfig, n_params: int, doc_lengths: list[int]) -> float:
    keys = sum(n * (n + 1) / 2 for n in doc_lengths) / sum(doc_lengths)
    return 6 * (n_params - cfg.vocab_size * cfg.dim) + 12 * cfg.n_layers * cfg.dim * keys


def run_gpu_tests(timeout: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr.strip()[-300:]]
        return {"returncode": proc.returncode, "summary": tail[0], "seconds": _since(start)}
    except subprocess.TimeoutExpired:
        return {"returncode": None, "summary": f"timed out after {timeout} s"}


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 1)


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(cfg: ModelConfig, seq: int, n_docs: int, attention: str, compile_blocks: bool, args):
    device = "cpu" if args.dry_run else "cuda"
    precision = "fp32" if args.dry_run else "bf16"
    cfg = dataclasses.replace(cfg, attention=attention)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = fixed_batch_trainer(cfg, seq, device, precision, compile_blocks)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    batch = packed_row(seq, n_docs, cfg.vocab_size)
    start = time.perf_counter()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        metrics = trainer.train_step([batch])  # ends in .item(): the step is complete
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(metrics["loss"])
    step_s = statistics.median(times)
    flops = model_flops_per_token(cfg, n_params, [seq // n_docs] * n_docs) * seq / step_s
    result = {
        "attention": attention,
        "compiled_blocks": compile_blocks,
        "params": n_params,
        "seq": seq,
        "docs": n_docs,
        "precision": precision,
        "step_s_median": round(step_s, 4),
        "tokens_per_s": round(seq / step_s, 1),
        "model_tflops_per_s": _sig(flops / 1e12),
        "mfu": _sig(flops / H200_BF16_PEAK),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "wall_s_with_warmup": _since(start),
    }
    if device == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del trainer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, no pytest")
    parser.add_argument("--out", default=str(ROOT / "bench/results/gpu.json"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--test-timeout", type=int, default=180)
    parser.add_argument(
        "--backends", nargs="+", default=["flex+compile", "docs"], help="attention[+compile]"
    )
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run to check the script on CPU")

    report = {
        "host": platform.node(),
        "torch": torch.__version__,
        "device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(),
        "dry_run": args.dry_run,
    }
    if not args.dry_run:
        report["gpu_tests"] = run_gpu_tests(args.test_timeout)
        print("gpu tests:", report["gpu_tests"], flush=True)
    cfg, seq, n_docs = (TINY, 256, 4) if args.dry_run else (ONE_B, 8192, 8)
    report["runs"] = []
    for spec in args.backends:
        attention, _, flag = spec.partition("+")
        if args.dry_run and attention == "flex":
            attention = "docs"  # FlexAttention has no backward on CPU
        try:
            result = measure(cfg, seq, n_docs, attention, flag == "compile", args)
        except Exception as e:  # keep the other backends' numbers; say what failed
            result = {"attention": spec, "error": f"{type(e).__name__}: {e}"[:500]}
        report["runs"].append(result)
        print(json.dumps(result), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    if any("error" in r for r in report["runs"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
