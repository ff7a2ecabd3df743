"""Training-step throughput: mmfm against Hugging Face transformers on the same packed rows.

One process, fp32, the same Llama configuration and the same weights on both sides; one
packed row per step whose documents restart their positions and never attend to each other.

- mmfm: `Trainer.train_step` as `mmfm train` runs it (the model with its document
  attention backend, the loss, gradient clipping, fused AdamW, the step's metrics).
- Hugging Face: `LlamaForCausalLM` (SDPA attention) with the documents kept apart the only
  correct way it offers, a 4D block-diagonal causal mask (with `position_ids` alone its SDPA
  path lets documents see each other), labels cut at document starts, then the same
  clipping and the same fused AdamW.

Before timing, both sides must give the same loss on the same row (relative difference
below 1e-5). Steps alternate between the sides; each reports the median of the timed
steps after the warm-up ones, so the ratio holds on a noisy machine.

    python bench/train_step.py [--shapes 4096x8 16384x32 2048x1] [--steps 5] [--warmup 2]
                               [--profile 4096x8] [--json bench/results/train_step.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from common import fixed_batch_trainer, packed_row

from mmfm.config.schema import ModelConfig
from mmfm.convert.hf import hf_config
from mmfm.convert.keymaps import to_hf
from mmfm.core.types import IGNORE_INDEX, Batch
from mmfm.train.optim import build_optimizer
from mmfm.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


class HFStep:
    """The same step with `transformers.LlamaForCausalLM` and a 4D document mask."""

    def __init__(self, trainer: Trainer):
        from transformers import LlamaForCausalLM

        config = hf_config(trainer.cfg.model, "llama", attn_implementation="sdpa")
        self.model = LlamaForCausalLM(config)
        state = {to_hf(k): v for k, v in trainer.model.state_dict().items()}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "rotary" not in k]:
            raise RuntimeError(f"weights do not match: {missing} {unexpected}")
        self.model.train()
        self.optimizer = build_optimizer(self.model, trainer.cfg.optim)
        self.grad_clip = trainer.cfg.optim.grad_clip

    @staticmethod
    def inputs(batch: Batch) -> dict[str, torch.Tensor]:
        same_doc = batch.doc_ids[:, :, None] == batch.doc_ids[:, None, :]
        causal = torch.ones_like(same_doc[0], dtype=torch.bool).tril()
        labels = batch.tokens.clone()  # HF shifts: labels[t + 1] is the target at t
        labels[batch.positions == 0] = IGNORE_INDEX  # no target across a document start
        return {
            "input_ids": batch.tokens,
            "position_ids": batch.positions,
            "attention_mask": (same_doc & causal)[:, None],
            "labels": labels,
        }

    def step(self, inputs: dict[str, torch.Tensor]) -> float:
        loss = self.model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


@torch.no_grad()
def check_same_loss(trainer: Trainer, hf: HFStep, batch: Batch) -> tuple[float, float]:
    from mmfm.train.loss import StepLoss, count_targets

    logits = trainer.model(batch.tokens, batch.positions, batch.doc_ids)
    ours = StepLoss(count_targets([batch]))(logits, batch, key=0).item()
    theirs = hf.model(**hf.inputs(batch)).loss.item()
    if abs(ours - theirs) > 1e-5 * abs(ours):
        raise RuntimeError(f"losses differ on identical weights: mmfm {ours}, HF {theirs}")
    return ours, theirs


def bench_shape(model: ModelConfig, seq: int, n_docs: int, args) -> dict:
    torch.manual_seed(0)
    trainer = fixed_batch_trainer(model, seq, compile_blocks=args.compile)
    hf = HFStep(trainer)
    batch = packed_row(seq, n_docs, model.vocab_size)
    ours, theirs = check_same_loss(trainer, hf, batch)
    hf_inputs = hf.inputs(batch)
    times: dict[str, list[float]] = {"mmfm": [], "hf": []}
    for i in range(args.warmup + args.steps):
        for side in ("mmfm", "hf"):
            start = time.perf_counter()
            if side == "mmfm":
                trainer.train_step([batch])
            else:
                hf.step(hf_inputs)
            if i >= args.warmup:
                times[side].append(time.perf_counter() - start)
    tps = {side: seq / statistics.median(t) for side, t in times.items()}
    return {
        "shape": f"{seq} tokens, {n_docs} doc{'s' if n_docs > 1 else ''}",
        "seq": seq,
        "docs": n_docs,
        "loss_mmfm": ours,
        "loss_hf": theirs,
        "tokens_per_s_mmfm": tps["mmfm"],
        "tokens_per_s_hf": tps["hf"],
        "ratio": tps["mmfm"] / tps["hf"],
        "step_s": {side: [round(x, 4) for x in t] for side, t in times.items()},
    }


def profile_shape(model: ModelConfig, seq: int, n_docs: int, args) -> None:
    """Top operators of a few mmfm and HF steps (self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    trainer = fixed_batch_trainer(model, seq, compile_blocks=args.compile)
    hf = HFStep(trainer)
    batch = packed_row(seq, n_docs, model.vocab_size)
    hf_inputs = hf.inputs(batch)
    sides = {"mmfm": lambda: trainer.train_step([batch]), "hf": lambda: hf.step(hf_inputs)}
    for side, step in sides.items():
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step()
        print(f"\n== {side}: {seq} tokens, {n_docs} docs, 2 steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


def parse_shape(text: str) -> tuple[int, int]:
    seq, _, docs = text.partition("x")
    return int(seq), int(docs or 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x8", "16384x32", "2048x1"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--compile", action="store_true", help="compile mmfm's blocks")
    parser.add_argument("--profile", metavar="SHAPE", help="print a profile of this shape instead")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    model = ModelConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        max_seq_len=max(parse_shape(s)[0] for s in [*args.shapes, args.profile or "1"]),
        attention="docs",
    )
    if args.profile:
        profile_shape(model, *parse_shape(args.profile), args)
        return
    print(
        f"dim {args.dim}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv heads, "
        f"vocab {args.vocab}, fp32, {torch.get_num_threads()} threads; median of {args.steps} "
        f"steps after {args.warmup} warm-up, sides interleaved"
    )
    rows = []
    for shape in args.shapes:
        row = bench_shape(model, *parse_shape(shape), args)
        rows.append(row)
        print(
            f"{row['shape']}: mmfm {row['tokens_per_s_mmfm']:,.0f} tok/s, HF "
            f"{row['tokens_per_s_hf']:,.0f} tok/s, ratio {row['ratio']:.2f}x "
            f"(loss {row['loss_mmfm']:.6f} / {row['loss_hf']:.6f})",
            flush=True,
        )
    print("\n| shape | mmfm tokens/s | HF tokens/s | mmfm / HF |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['tokens_per_s_mmfm']:,.0f} | {r['tokens_per_s_hf']:,.0f} | "
            f"{r['ratio']:.2f}x |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    assert all(math.isfinite(r["ratio"]) for r in rows)


if __name__ == "__main__":
    main()
