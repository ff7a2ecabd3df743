"""What one `eval.samples_every` evaluation adds to a run, as a ratio of a training step.

A model of the demo corpus (hidden 256, 4 layers, rows of 512 tokens, 8 rows a step) is
built by `build_trainer` with three samples (an image of the demo's 64 codes, 32 tokens of
text, 32 of DNA: 130 decoding steps in all) and TensorBoard on. Training steps and sample
evaluations (`Samples.on_step_end`: gather the weights, build the plain model, generate,
decode, write the files and samples.jsonl, log the media) are interleaved, `--repeats` of
each; the medians and their ratio are reported.

Time is the process's CPU time with one torch thread (`--clock cpu`, the default): on a
shared machine the wall clock measures the neighbours; `--clock wall` for a quiet one.

    python bench/samples.py [--repeats 5] [--json bench/results/samples.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}

SAMPLES = [
    {"prompt": "a red square", "modality": "image", "max_new_tokens": 65},
    {"prompt": "hello", "max_new_tokens": 32, "temperature": 1.0},
    {"prompt": "a gene", "modality": "dna", "max_new_tokens": 32, "temperature": 1.0},
]


def overrides(run_dir: str, dim: int, layers: int, seq: int, rows: int) -> list[str]:
    from mmfm.data.demo import DEMO_VOCAB_SIZE

    return [
        f"model.vocab_size={DEMO_VOCAB_SIZE}",
        f"model.dim={dim}",
        f"model.n_layers={layers}",
        "model.n_heads=8",
        "model.n_kv_heads=4",
        f"model.max_seq_len={max(seq, 128)}",  # the longest prompt and answer fit
        f"data.seq_len={seq}",
        "data.paths=[builtin:demo]",
        "data.num_workers=0",
        f"train.global_batch_size={rows}",
        f"train.micro_batch_size={rows}",
        f"train.run_dir={run_dir}",
        "logging.progress=false",
        "eval.samples_every=1",
        "eval.samples=" + json.dumps(SAMPLES),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--clock", choices=CLOCK, default="cpu")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = CLOCK[args.clock]

    from mmfm.config import load_config
    from mmfm.train.command import build_trainer
    from mmfm.train.samples import Samples

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(None, overrides(run_dir, args.dim, args.layers, args.seq, args.rows))
        with build_trainer(cfg) as trainer:
            samples = next(cb for cb in trainer.callbacks if isinstance(cb, Samples))
            for cb in trainer.callbacks:
                cb.on_fit_start(0, 1000)
            steps, evaluations = [], []
            for _ in range(args.repeats + 1):  # the first of each is a warm-up
                batches = trainer.loader.next_step()
                start = clock()
                trainer.train_step(batches, report=False)
                steps.append(clock() - start)
                start = clock()
                samples.on_step_end(trainer.step, {})
                evaluations.append(clock() - start)
            for cb in trainer.callbacks:
                cb.on_fit_end()
        lines = (Path(run_dir) / "samples" / "samples.jsonl").read_text().splitlines()
        generated = sum(len(json.loads(line)["new_ids"]) for line in lines) / len(steps)
    step, evaluation = statistics.median(steps[1:]), statistics.median(evaluations[1:])
    params = sum(p.numel() for p in trainer.model.parameters())
    result = {
        "params_M": round(params / 1e6, 2),
        "tokens_per_step": args.seq * args.rows,
        "new_tokens": generated,
        "step_s": round(step, 4),
        "samples_s": round(evaluation, 4),
        "ratio": round(evaluation / step, 2),
        "clock": args.clock,
        "repeats": args.repeats,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
