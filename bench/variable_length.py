"""Dataset Decomposition against best_fit packing: the same model, the same token budget.

Two trainers, built as `mmfm train` builds them (`build_trainer`), on the same prepared
corpus, with the same model, seed and `train.global_batch_size x data.seq_len` tokens per
step: one with `data.packing: best_fit` (rows of `seq_len`, several documents each, the
`docs` attention keeping them apart), one with `data.packing: decompose` (one document per
row, a row length per step from the curriculum). Their steps alternate, so the tokens/s ratio
is measured in one run on a noisy machine; a step's time is the loader's `next_step` plus
`train_step`. Training tokens are the non-padding tokens of a step. At the end both models are
scored on the same rows (a best_fit stream of the corpus with another seed): the loss after
the same number of steps, hence the same token budget.

    python bench/variable_length.py --data /tmp/vl_data/mixed [more folders] [--seq-len 8192]
        [--steps 30]
        [--buckets 32 8192] [--curriculum natural]
        [--json bench/results/variable_length.json] [--plot docs/x.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mmfm.config.loading import load_config
from mmfm.train.command import build_trainer
from mmfm.train.loss import StepLoss, count_targets
from mmfm.train.trainer import Trainer


def overrides(args, packing: str, run_dir: Path, seed: int = 0) -> list[str]:
    buckets = []
    b = args.buckets[0]
    while b <= args.buckets[1]:
        buckets.append(b)
        b *= 2
    common = [
        data_override(args.data),
        f"data.seq_len={args.seq_len}",
        f"data.packing={packing}",
        f"model.max_seq_len={args.seq_len}",
        f"model.vocab_size={vocab_size(args.data[0])}",
        f"model.dim={args.dim}",
        f"model.n_layers={args.layers}",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.attention=docs",
        "train.global_batch_size=1",
        "train.micro_batch_size=1",
        f"train.steps={args.steps}",
        f"train.seed={seed}",
        f"train.run_dir={run_dir}",
        "optim.lr=3e-3",
        "optim.warmup_steps=3",
        "logging.tensorboard=false",
        "logging.progress=false",
    ]
    if packing == "decompose":
        common += [f"data.buckets=[{','.join(map(str, buckets))}]"]
        common += [f"data.curriculum={args.curriculum}", "data.num_cycles=1"]
    return common


def vocab_size(folder: str) -> int:
    """The size of the vocabulary the corpus was prepared with (its ids must fit the model:
    the DNA and picture codebooks lie above the 32000 text ids of tokenizers/base.yaml)."""
    return json.loads((Path(folder) / "vocab.json").read_text())["size"]


def data_override(folders: list[str]) -> str:
    """One prepared folder: data.paths. Several: one data.sources entry each, weighted by the
    tokens its manifest counts (the corpus's own mix, every stream reading all of them)."""
    if len(folders) == 1:
        return f"data.paths=[{folders[0]}]"
    sources = []
    for folder in folders:
        tokens = json.loads((Path(folder) / "manifest.json").read_text())["tokens"]
        sources.append(f"{{name: {Path(folder).name}, paths: [{folder}], weight: {tokens}}}")
    return f"data.sources=[{', '.join(sources)}]"


def timed_step(trainer: Trainer, budget: int) -> dict:
    start = time.perf_counter()
    batches = trainer.loader.next_step()
    m = trainer.train_step(batches)
    seconds = time.perf_counter() - start
    real = budget * (1.0 - m["data/padding"])
    return {"s": seconds, "tokens": real, "loss": m["loss"], "padding": m["data/padding"],
            "seq_len": m.get("data/seq_len", float(budget))}  # fmt: skip


@torch.no_grad()
def score(trainer: Trainer, rows: list) -> float:
    """Mean next-token loss of `trainer`'s model over the held-out micro-batches `rows`."""
    trainer.model.eval()
    total = count_targets(rows)
    loss = StepLoss(total, trainer.cfg.loss)
    value = sum(
        loss(trainer.model(b.tokens, b.positions, b.doc_ids), b, key=i).item()
        for i, b in enumerate(rows)
    )
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", required=True, nargs="+",
        help="a prepared dataset folder, or several (one data.sources entry each, mixed by tokens)",
    )  # fmt: skip
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--buckets", type=int, nargs=2, default=[32, 8192], metavar=("MIN", "MAX"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--curriculum", default="natural", help="decompose's data.curriculum")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--eval-steps", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--run-dir", default="/tmp/bench_variable_length")
    parser.add_argument("--json")
    parser.add_argument("--plot", help="a PNG of both loss curves against training tokens")
    args = parser.parse_args()

    root = Path(args.run_dir)
    sides = {
        p: build_trainer(load_config(None, overrides(args, p, root / p)))
        for p in ("best_fit", "decompose")
    }
    held = build_trainer(load_config(None, overrides(args, "best_fit", root / "held", seed=7)))
    rows = [b for _ in range(args.eval_steps) for b in held.loader.next_step()]
    held.loader.close()
    steps: dict[str, list[dict]] = {p: [] for p in sides}
    for i in range(args.steps):
        for p, trainer in sides.items():
            steps[p].append(timed_step(trainer, args.seq_len))
        print(f"step {i}: " + ", ".join(
            f"{p} {s[-1]['s']:.2f}s loss {s[-1]['loss']:.3f} L {s[-1]['seq_len']:.0f}"
            for p, s in steps.items()), flush=True)  # fmt: skip
    result = {"args": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__}
    for p, s in steps.items():
        timed = s[args.warmup :]
        result[p] = {
            "tokens_per_s": sum(x["tokens"] for x in timed) / sum(x["s"] for x in timed),
            "median_step_s": statistics.median(x["s"] for x in timed),
            "padding": statistics.fmean(x["padding"] for x in s),
            "training_tokens": sum(x["tokens"] for x in s),
            "final_train_loss_last5": statistics.fmean(x["loss"] for x in s[-5:]),
            "held_out_loss": score(sides[p], rows),
            "steps": s,
        }
        sides[p].loader.close()
    result["ratio_tokens_per_s"] = (
        result["decompose"]["tokens_per_s"] / result["best_fit"]["tokens_per_s"]
    )
    for p in sides:
        r = result[p]
        print(f"{p}: {r['tokens_per_s']:,.0f} training tokens/s, padding {r['padding']:.3f}, "
              f"held-out loss {r['held_out_loss']:.4f}, "
              f"{r['training_tokens']:,.0f} tokens")  # fmt: skip
    print(f"decompose / best_fit tokens/s: {result['ratio_tokens_per_s']:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(steps, args)


def plot(steps: dict[str, list[dict]], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for p, s in steps.items():
        seen, xs = 0.0, []
        for x in s:
            seen += x["tokens"]
            xs.append(seen)
        ax.plot(xs, [x["loss"] for x in s], label=p)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss")
    ax.set_title(f"decompose vs best_fit, {args.seq_len} tokens per step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
