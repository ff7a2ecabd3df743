"""Decoding speed of `mmfm generate` on CPU: the KV cache against the no-cache path, and
against Hugging Face `generate` on the same exported weights, greedy and constrained.

A random Llama (hidden 256, 4 layers, GQA 4/2, the demo's 384-id vocabulary) goes through
`mmfm convert from-hf` and `mmfm convert hf`; both sides then load that exported folder.
Every run generates a fixed number of tokens (no early stop at </s>); tokens/s counts new
tokens of all sequences. The constraint's overhead is timed on its own (the logits
processor and the state update, 2000 steps on the batch's logits), per step and per token.
Ratios come from one run.

Time is the process's CPU time with one torch thread (`--clock cpu`, the default): on a
shared machine the wall clock measures the neighbours; `--clock wall` for a quiet one.

    python bench/generate.py [--new 512] [--json bench/results/generate.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}


def timed(fn, repeats: int, clock=time.process_time) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def constraint_step_seconds(layout, batch: int, prompt: list[int], clock, steps=2000) -> float:
    """The span grammar's cost per decoding step: mask the logits, sample, advance."""
    from mmfm.decoding.constraints import SpanConstraint

    constraint = SpanConstraint(layout, 384, batch, torch.device("cpu"))
    for token in prompt:
        constraint.update(torch.full((batch,), token))
    logits = torch.randn(batch, 384)
    start = clock()
    for _ in range(steps):
        token = constraint(logits).argmax(-1)
        constraint.update(token)
    masked = clock() - start
    start = clock()
    for _ in range(steps):
        logits.argmax(-1)
    return (masked - (clock() - start)) / steps


@torch.no_grad()
def generate_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The no-cache path the KV cache is timed against: every step runs the whole prefix."""
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        ids = torch.tensor([tokens])
        logits = model(ids, torch.arange(len(tokens))[None], torch.zeros_like(ids))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def build_folder(root: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mmfm.convert.hf import export_hf, import_hf

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=384, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    import_hf(root / "hf", root / "ckpt")
    return export_hf(root / "ckpt", root / "export", dtype="fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new", type=int, default=512, help="new tokens, cache vs no cache")
    parser.add_argument("--hf-new", type=int, default=256, help="new tokens, vs HF")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--clock", choices=list(CLOCK), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = CLOCK[args.clock]

    from transformers import AutoModelForCausalLM

    from mmfm.decoding.engine import generate
    from mmfm.decoding.layout import demo_layout
    from mmfm.decoding.sampling import Sampling
    from mmfm.generate.load import load_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp))
        mine = load_model(folder).model
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    layout = demo_layout()
    prompt = layout.prompt("a red cross on a blue background")  # 33 ids
    rows = []

    def row(name: str, batch: int, new: int, seconds: float, **extra) -> dict:
        r = {"case": name, "batch": batch, "new_tokens": new, "seconds": round(seconds, 4)}
        r |= {"tokens_per_s": round(batch * new / seconds, 1), **extra}
        rows.append(r)
        print(json.dumps(r))
        return r

    # 1. The KV cache against the no-cache path (every step runs the whole prefix).
    greedy = Sampling(max_new_tokens=args.new)
    cached = timed(lambda: generate(mine, [prompt], greedy, stop_at_eos=False), args.repeats, clock)
    uncached = timed(lambda: generate_greedy(mine, prompt, args.new), args.repeats, clock)
    assert generate(mine, [prompt], greedy, stop_at_eos=False)[0] == generate_greedy(
        mine, prompt, args.new
    )
    c = row("mmfm, KV cache", 1, args.new, cached)
    u = row("mmfm, no cache", 1, args.new, uncached)
    c["speedup_vs_no_cache"] = round(u["seconds"] / c["seconds"], 2)

    # 2. Against Hugging Face generate on the same weights.
    image_prompt = layout.prompt("a red cross on a blue background", "image")
    for batch in (1, 8):
        prompts = [prompt] * batch
        x = torch.tensor(prompts)
        n = args.hf_new
        sampling = Sampling(max_new_tokens=n)

        def theirs(x=x, n=n):
            with torch.no_grad():
                return hf.generate(
                    x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, eos_token_id=None, pad_token_id=0,
                )  # fmt: skip

        ours = generate(mine, prompts, sampling, stop_at_eos=False)
        assert ours == theirs()[:, x.shape[1] :].tolist(), "greedy tokens differ from HF"
        t_hf = timed(theirs, args.repeats, clock)
        t_greedy = timed(
            lambda p=prompts, s=sampling: generate(mine, p, s, stop_at_eos=False),
            args.repeats,
            clock,
        )
        t_constrained = timed(
            lambda b=batch, s=sampling: generate(
                mine, [image_prompt] * b, s, layout, stop_at_eos=False
            ),
            args.repeats,
            clock,
        )
        h = row("transformers generate", batch, n, t_hf)
        g = row("mmfm greedy", batch, n, t_greedy)
        k = row("mmfm constrained (image grammar)", batch, n, t_constrained)
        g["vs_hf"] = round(h["seconds"] / g["seconds"], 2)
        k["vs_hf"] = round(h["seconds"] / k["seconds"], 2)
        step = constraint_step_seconds(layout, batch, image_prompt, clock)
        k["constraint_us_per_step"] = round(step * 1e6, 1)
        k["constraint_us_per_token"] = round(step / batch * 1e6, 1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = {"clock": args.clock, "torch_threads": args.threads, "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
