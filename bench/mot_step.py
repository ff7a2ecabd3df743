"""Mixture-of-Transformers vs dense: forward + backward time of the same active parameters.

`launch/demo.yaml`'s model (dense) and `launch/mot_demo.yaml`'s (a language and a vision
group, the same shape) on the same rows of 512 tokens, each row packing a text, an image and
a DNA document; the two models are alternated in one process and the medians compared, so
that the ratio holds on a noisy machine. The loss curves of the two recipes are in
docs/sparse_models.md.

    python bench/mot_step.py [--rows 4] [--repeats 10] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmfm.config import load_config
from mmfm.data.demo import DEMO_RANGES, DNA_OFFSET, IMAGE_OFFSET, TEXT_OFFSET
from mmfm.model import build_model, init_weights

RECIPES = {"dense": "launch/demo.yaml", "mot": "launch/mot_demo.yaml"}
DOCS = ((TEXT_OFFSET, IMAGE_OFFSET, 200), (IMAGE_OFFSET, DNA_OFFSET, 120), (DNA_OFFSET, None, 192))


def build(name: str, device: str):
    ranges = [f"model.mot.ranges=[{','.join(DEMO_RANGES)}]"] if name == "mot" else []
    cfg = load_config(RECIPES[name], [*ranges, "model.attention=docs"])
    model = build_model(cfg.model, device)
    model.to_empty(device=device)
    init_weights(model, cfg.model, 0)
    return model


def rows(n: int, device: str):
    """`n` rows of a text, an image and a DNA document (512 tokens)."""
    gen = torch.Generator().manual_seed(0)
    tokens, doc_ids, positions = [], [], []
    for i, (low, high, length) in enumerate(DOCS):
        high = high or DNA_OFFSET + 4
        tokens.append(torch.randint(low, high, (n, length), generator=gen))
        doc_ids.append(torch.full((n, length), i))
        positions.append(torch.arange(length).expand(n, length))
    return [torch.cat(t, dim=1).to(device) for t in (tokens, positions, doc_ids)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    models = {name: build(name, args.device) for name in RECIPES}
    batch = rows(args.rows, args.device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(args.repeats + 2):  # two warm-up rounds
        for name, model in models.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(*batch).float().logsumexp(-1).mean().backward()
            if args.device == "cuda":
                torch.cuda.synchronize()
            if repeat >= 2:
                times[name].append(time.perf_counter() - start)
    dense = statistics.median(times["dense"])
    print("| model | parameters | median ms | x dense |\n|---|---|---|---|")
    for name, model in models.items():
        median = statistics.median(times[name])
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {params:.2f}M | {1000 * median:.1f} | {median / dense:.2f} |")


if __name__ == "__main__":
    main()
