"""Loader throughput per worker: prepared shards, and raw shards tokenized in the stream.

Every rate is one stream read in this process with no worker process and one torch thread
(what one loader worker does), over one full pass (`max_epochs: 1`), tokens counted without
padding; median of `--repeats`. Two sections, both in one run:

prepared (the shards of data_pipelines/mixed.yaml, real data prepared with `mmfm prepare`):
- file read: the tar files' bytes (`read()`), converted to tokens with the shards' bytes/token;
- raw tar read: webdataset's tar iteration (samples, no decoding): the reference rate;
- loader: `StreamingLoader.next_step()`: decode, shuffle (64 documents), best-fit pack into
  4096-token rows, collate to torch, record the stream state per row; then two sources mixed
  by weight (text and SVG shards); then the one stream in a DataLoader worker process (the
  rows cross a process boundary; the clock starts after the worker's start-up);
- Megatron (with `pip install 'mmfm[megatron]'`): the same documents written as a Megatron
  indexed dataset by `format: megatron`'s writer, read document by document by megatron-core's
  `IndexedDataset`, then streamed by the loader (`kind: megatron`); and the loader's CPU time
  per pass on the shards over that on the indexed dataset, passes taken in turn (the ratio
  holds when the wall-clock rates move with the load of a shared machine).

raw (issue 17: data as users have it):
- prepared text: KJV verses written as raw `.txt` shards with webdataset's `ShardWriter`,
  prepared by `mmfm prepare` (kind: webdataset, tokenizers/base.yaml), then streamed;
- raw text: the same raw shards streamed with `tokenize:` (BPE in the stream);
- raw image-text: the scikit-image photos as JPEG + caption samples (img2dataset's layout),
  decoded and encoded by a SEED-style image tokenizer of tokenizers/seed_image.yaml's size
  (untrained weights: the cost is the same) on CPU, one picture at a time
  (`tokenize_batch: 1`) and 16 per batched call (the default).

Loader workers a training step needs: the step's tokens/s (bench/results/train_step.json,
4096 tokens x 8 documents, or `--step-tokens-per-s`, e.g. a GPU's) over one worker's rate.

    python bench/loader.py [--repeats 3] [--json bench/results/loader.json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from mmfm.config.schema import RawFields
from mmfm.core.errors import DataError, LaunchError
from mmfm.core.examples import fetch
from mmfm.data.loader import StreamingLoader
from mmfm.data.megatron import megatron_indexed, unit_urls
from mmfm.data.raw_stream import load_tokenizers
from mmfm.data.settings import SourceSpec
from mmfm.prepare import load_prepare_recipe, prepare
from mmfm.prepare.megatron_out import write_megatron
from mmfm.testing import source_spec, stream_settings
from mmfm.tokenization.visual.train import VisualRecipe, build, save_visual
from mmfm.tokenization.vocab import VOCAB_FILE, Vocab

ROOT = Path(__file__).resolve().parents[1]
SEED_IMAGE = {"image_size": 64, "patch": 8, "dim": 128, "tokens": 32, "codebook_size": 8192}
STEP = ROOT / "bench/results/train_step.json"


def file_read(urls: list[str]) -> float:
    start = time.perf_counter()
    for url in urls:
        with open(url, "rb") as f:
            while f.read(1 << 20):
                pass
    return time.perf_counter() - start


def tar_read(urls: list[str]) -> float:
    start = time.perf_counter()
    for url in urls:
        for _ in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
            pass
    return time.perf_counter() - start


def loader_pass(
    sources: list[SourceSpec], workers: int = 0, clock=time.perf_counter
) -> tuple[float, int]:
    """(seconds of `clock`, tokens) of one pass of one stream over `sources`."""
    settings = stream_settings(1, seq_len=4096)
    loader = StreamingLoader(sources, settings, micro_batch_size=1, num_workers=workers)
    if workers:
        loader.next_step()  # the worker's start-up (spawn, imports) and its first row: untimed
    tokens, start = 0, clock()
    try:
        while True:
            batch = loader.next_step()[0]
            tokens += int((batch.tokens != 0).sum())
    except DataError:  # one pass over every source (max_epochs=1)
        pass
    elapsed = clock() - start
    loader.close()
    return elapsed, tokens


def rate(repeats: int, sources: list[SourceSpec], workers: int = 0) -> dict:
    runs = [loader_pass(sources, workers) for _ in range(repeats)]
    seconds = statistics.median(s for s, _ in runs)
    return {"tokens": runs[0][1], "tokens_per_s": runs[0][1] / seconds}


def prepared_section(repeats: int) -> dict:
    out = Path(tempfile.mkdtemp()) / "mixed"
    recipe = load_prepare_recipe(
        ROOT / "data_pipelines/mixed.yaml",
        [f"output={out}", f"tokenizer={ROOT}/tokenizers/base.yaml"],
    )
    prepare(recipe, workers=2, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["file"]) for s in manifest["shards"]]
    n_tokens = manifest["tokens"]
    rows = {
        "file read": n_tokens / statistics.median(file_read(urls) for _ in range(repeats)),
        "raw tar read (webdataset)": n_tokens
        / statistics.median(tar_read(urls) for _ in range(repeats)),
    }
    whole = [source_spec("mixed", tuple(urls), max_epochs=1)]
    rows["loader, 1 source"] = rate(repeats, whole)["tokens_per_s"]
    by_modality = zip(urls, manifest["shards"], strict=True)
    text = tuple(
        u
        for u, s in by_modality
        if s["tokens_by_modality"]["text"] > s["tokens_by_modality"]["svg"]
    )
    svg = tuple(u for u in urls if u not in text)
    mixed = [
        source_spec("text", text, 0.7, max_epochs=1),
        source_spec("svg", svg, 0.3, max_epochs=1),
    ]
    rows["loader, 2 sources mixed 0.7 / 0.3"] = rate(repeats, mixed)["tokens_per_s"]
    rows["loader, 1 source, in 1 worker process"] = rate(repeats, whole, 1)["tokens_per_s"]
    megatron, cpu_ratio = megatron_rows(repeats, out, urls, n_tokens)
    rows.update(megatron)
    n_bytes = sum(Path(u).stat().st_size for u in urls)
    print(
        f"{manifest['samples']} documents, {n_tokens:,} tokens, {len(urls)} shards, "
        f"{n_bytes / n_tokens:.2f} bytes/token on disk; median of {repeats}"
    )
    print("| path | M tokens/s | x raw tar read |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r / 1e6:.2f} | {r / rows['raw tar read (webdataset)']:.2f} |")
    result = {"tokens": n_tokens, "tokens_per_s": rows}
    if cpu_ratio:
        result["loader_cpu_time_webdataset_over_megatron"] = cpu_ratio
    return result


def megatron_rows(
    repeats: int, out: Path, urls: list[str], n_tokens: int
) -> tuple[dict, dict | None]:
    """The same documents as a Megatron indexed dataset (`format: megatron`'s writer): read
    by megatron-core's `IndexedDataset` document by document, and by the loader (rows); and
    the loader's CPU time on the shards over that on the indexed dataset, passes in turn."""
    try:
        write_megatron(out, "indexed", urls, Vocab.load(out / VOCAB_FILE).size)
        dataset = megatron_indexed().IndexedDataset(str(out / "indexed"))
    except LaunchError as e:
        print(f"(no Megatron rows: {e})")
        return {}, None

    def indexed_read() -> float:
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        return time.perf_counter() - start

    units = tuple(unit_urls([str(out / "indexed")]))
    indexed = [source_spec("indexed", units, max_epochs=1)]
    shards = [source_spec("mixed", tuple(urls), max_epochs=1)]
    # Wall time moves with the load of a shared machine: the CPU time of passes taken in turn
    cpu = [
        loader_pass(shards, clock=time.process_time)[0]
        / loader_pass(indexed, clock=time.process_time)[0]
        for _ in range(repeats)
    ]
    print(
        f"loader CPU time, WebDataset / Megatron .bin/.idx, passes in turn: median "
        f"{statistics.median(cpu):.2f} ({', '.join(f'{r:.2f}' for r in cpu)})"
    )
    rows = {
        "megatron-core IndexedDataset read": n_tokens
        / statistics.median(indexed_read() for _ in range(repeats)),
        "loader, 1 source, Megatron .bin/.idx": rate(repeats, indexed)["tokens_per_s"],
    }
    return rows, {"median": statistics.median(cpu), "runs": cpu}


def text_shards(root: Path, verses: int) -> list[str]:
    with open(fetch("kjv") / "kjv.jsonl") as f:
        lines = [json.loads(next(f))["text"] for _ in range(verses)]
    with wds.ShardWriter(str(root / "raw/text-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for i, verse in enumerate(lines):
            sink.write({"__key__": f"v{i:06d}", "txt": verse.encode()})
    return sorted(str(p) for p in (root / "raw").glob("text-*.tar"))


def photo_shards(root: Path, n: int) -> list[str]:
    """`n` samples: the photos as JPEG + caption, over again as needed."""
    photos = sorted(p for p in fetch("photos").iterdir() if p.suffix in (".png", ".jpg"))
    with wds.ShardWriter(str(root / "raw/photos-%06d.tar"), maxcount=40, verbose=0) as sink:
        for i in range(n):
            path = photos[i % len(photos)]
            jpg = io.BytesIO()
            Image.open(path).convert("RGB").save(jpg, "JPEG", quality=90)
            caption = path.stem.replace("_", " ")
            sink.write({"__key__": f"{i:05d}", "jpg": jpg.getvalue(), "txt": caption})
    return sorted(str(p) for p in (root / "raw").glob("photos-*.tar"))


def raw_section(repeats: int, verses: int, photos: int) -> dict:
    root = Path(tempfile.mkdtemp())
    (root / "raw").mkdir()
    text = text_shards(root, verses)
    tok = root / "tok.yaml"
    tok.write_text(f"output_dir: {ROOT / 'tokenizers/base'}\nimage_tokenizer: {root / 'seed'}\n")
    save_visual(build(VisualRecipe(kind="seed_image", model=SEED_IMAGE)), root / "seed")
    recipe = root / "prepare.yaml"
    recipe.write_text(
        f"name: text\noutput: {root / 'prepared'}\ntokenizer: {tok}\nshard_size: 1000\n"
        f"sources:\n  - {{kind: webdataset, name: text, paths: {json.dumps(text)}, "
        "fields: {record: text, text: txt}}\n"
    )
    prepare(load_prepare_recipe(recipe), workers=1, progress=False)
    prepared = tuple(sorted(str(p) for p in (root / "prepared").glob("text-*.tar")))
    pictures = tuple(photo_shards(root, photos))
    verse = RawFields("text", text="txt")
    sources = {
        "prepared text": source_spec("text", prepared, max_epochs=1),
        "raw text (BPE in the stream)": source_spec(
            "text", tuple(text), max_epochs=1, tokenize=str(tok), fields=verse
        ),
        "raw image-text, 1 picture per call": source_spec(
            "photos",
            pictures,
            max_epochs=1,
            tokenize=str(tok),
            fields=RawFields(),
            tokenize_batch=1,
        ),
        "raw image-text, 16 pictures per call": source_spec(
            "photos",
            pictures,
            max_epochs=1,
            tokenize=str(tok),
            fields=RawFields(),
            tokenize_batch=16,
        ),
    }
    load_tokenizers(str(tok)).visual.model("image")  # loaded once per worker: untimed
    rows = {name: rate(repeats, [source]) for name, source in sources.items()}
    reference = rows["prepared text"]["tokens_per_s"]
    for row in rows.values():
        row["x_prepared"] = row["tokens_per_s"] / reference
    return rows


def step_rate(given: float | None) -> tuple[float, str]:
    """(tokens/s of a training step, where the figure comes from)."""
    if given:
        return given, "--step-tokens-per-s"
    rows = json.loads(STEP.read_text())
    row = next(r for r in rows if (r["seq"], r["docs"]) == (4096, 8))
    return row["tokens_per_s_mmfm"], f"{STEP.relative_to(ROOT)} (4096 x 8, CPU)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--verses", type=int, default=4000)
    parser.add_argument("--photos", type=int, default=104, help="raw image-text samples")
    parser.add_argument("--raw-only", action="store_true", help="skip the prepared section")
    parser.add_argument("--step-tokens-per-s", type=float, help="default: train_step.json")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as torch's DataLoader sets it in each worker
    result = {"repeats": args.repeats}
    if not args.raw_only:
        result["prepared"] = prepared_section(args.repeats)
    raw = raw_section(args.repeats, args.verses, args.photos)
    step, figure = step_rate(args.step_tokens_per_s)
    print(f"\nraw shards; a step of {step:,.0f} tokens/s ({figure})")
    print("| path | tokens | tokens/s | x prepared | workers per step |\n|---|---:|---:|---:|---:|")
    for name, row in raw.items():
        row["workers_per_step"] = step / row["tokens_per_s"]
        print(
            f"| {name} | {row['tokens']:,} | {row['tokens_per_s']:,.0f} | "
            f"{row['x_prepared']:.3f} | {row['workers_per_step']:.2f} |"
        )
    batched, alone = (raw[f"raw image-text, {n} per call"] for n in ("16 pictures", "1 picture"))
    speedup = batched["tokens_per_s"] / alone["tokens_per_s"]
    print(f"pictures batched 16 per call: {speedup:.2f}x one at a time")
    result["raw"] = raw
    result["step"] = {"tokens_per_s": step, "from": figure}
    result["batched_pictures_speedup"] = speedup
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
