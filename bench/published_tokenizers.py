"""Encode throughput of the published image tokenizers at their published sizes.

Each class is built with the config of its published checkpoint (random weights: the cost is
the same), saved with `save_pretrained` and loaded through mmfm's own path
(`load_published`), then encodes real photos (scikit-image) at its native resolution, one
batch at a time, on `--threads` CPU threads (or `--device cuda`). Reported: pictures/s at
batch 1 and at `--batch`, median of `--repeats` interleaved runs, and the codes per picture.

    python bench/published_tokenizers.py [--classes JanusVQVAE VQModel] [--batch 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmfm.core.examples import fetch
from mmfm.tokenization.visual import data as vdata
from mmfm.tokenization.visual.published import load_published, parse_spec

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")


def published(name: str, folder: Path) -> dict:
    """The tokenizer recipe's spec of `name` at its published config, saved in `folder`."""
    import diffusers
    import transformers

    if name == "JanusVQVAE":  # Janus-Pro's vq_config: 16384 codes, 16x, 384 px
        model = transformers.JanusVQVAE(transformers.JanusVQVAEConfig(num_patches=24))
        resolution = 384
    elif name == "ChameleonVQVAE":  # Chameleon's vq_config: 8192 codes, 16x, 512 px
        model = transformers.ChameleonVQVAE(transformers.ChameleonVQVAEConfig())
        resolution = 512
    elif name == "Emu3VQVAE":  # Emu3's: 32768 codes, 8x; 512 px = 4096 codes
        model = transformers.Emu3VQVAE(transformers.Emu3VQVAEConfig())
        resolution = 512
    else:  # aMUSEd-256's VQGAN (diffusers scripts/convert_amused.py)
        model = diffusers.VQModel(
            block_out_channels=[128, 256, 256, 512, 768],
            down_block_types=["DownEncoderBlock2D"] * 5,
            up_block_types=["UpDecoderBlock2D"] * 5,
            latent_channels=64, layers_per_block=2, num_vq_embeddings=8192,
            mid_block_add_attention=False, lookup_from_codebook=True,
        )  # fmt: skip
        resolution = 256
    library = "diffusers" if name == "VQModel" else "transformers"
    model.save_pretrained(folder)
    return {"library": library, "class": name, "path": str(folder), "resolution": resolution}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", nargs="+", default=["JanusVQVAE", "ChameleonVQVAE", "VQModel"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    photos = [vdata.read_image(fetch("photos") / name) for name in PHOTOS]
    print(f"| class | px | codes | batch | pictures/s ({args.device}, {args.threads} thread) |")
    print("|---|---|---|---|---|")
    for name in args.classes:
        with tempfile.TemporaryDirectory() as tmp:
            tok = load_published(parse_spec(published(name, Path(tmp)), name))
        tok.to(args.device)
        size = tok.resolution
        squares = [vdata.square(p, size) for p in photos]
        batches = {b: vdata.to_tensor((squares * b)[:b]).to(args.device) for b in (1, args.batch)}
        tok.encode(batches[1])  # warm-up
        rates: dict[int, list[float]] = {b: [] for b in batches}
        for _ in range(args.repeats):
            for b, x in batches.items():
                start = time.perf_counter()
                tok.encode(x)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                rates[b].append(b / (time.perf_counter() - start))
        for b in batches:
            rate = statistics.median(rates[b])
            print(f"| {name} | {size} | {tok.tokens_per_item} | {b} | {rate:.2f} |")


if __name__ == "__main__":
    main()
