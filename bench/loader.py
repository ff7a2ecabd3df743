"""Loader throughput: pre-tokenized shards -> streaming -> mixing -> packing -> Batch, per worker.

The shards are real data prepared with `mmfm prepare` (data_pipelines/mixed.yaml: KJV verses,
Python standard library files, GenBank DNA windows and task pairs, Bootstrap icons). In one
run, one process, the same shards are read three ways over one full pass:

- file read: the tar files' bytes (`read()`), converted to tokens with the shards' bytes/token;
- raw tar read: webdataset's tar iteration (samples, no decoding): the reference rate;
- loader: `StreamingLoader.next_step()` with one stream and no worker process, i.e. what one
  loader worker does: decode, shuffle (64 documents), best-fit pack into 4096-token rows,
  collate to torch, record the stream state per row. Tokens are counted without padding.
A second loader run mixes two sources by weight (the text and the SVG shards), a third runs
the one stream in a DataLoader worker process (the rows cross a process boundary; the clock
starts at the first step, after the worker's start-up).

    python bench/loader.py [--repeats 3] [--json bench/results/loader.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import webdataset as wds

from mmfm.core.errors import DataError
from mmfm.data.loader import StreamingLoader
from mmfm.data.stream import SourceSpec, StreamSettings
from mmfm.prepare import load_prepare_recipe, prepare

ROOT = Path(__file__).resolve().parents[1]


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


def loader_pass(sources: list[SourceSpec], workers: int = 0) -> tuple[float, int]:
    settings = StreamSettings(1, 4096, 0, tuple([1.0] * 6))
    loader = StreamingLoader(sources, settings, micro_batch_size=1, num_workers=workers)
    if workers:
        loader.next_step()  # the worker's start-up (spawn, imports) and its first row: untimed
    tokens, start = 0, time.perf_counter()
    try:
        while True:
            batch = loader.next_step()[0]
            tokens += int((batch.tokens != 0).sum())
    except DataError:  # one pass over every source (max_epochs=1)
        pass
    elapsed = time.perf_counter() - start
    loader.close()
    return elapsed, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp()) / "mixed"
    recipe = load_prepare_recipe(
        ROOT / "data_pipelines/mixed.yaml",
        [f"output={out}", f"tokenizer={ROOT}/tokenizers/base.yaml"],
    )
    prepare(recipe, workers=2, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["file"]) for s in manifest["shards"]]
    n_tokens = manifest["tokens"]
    n_bytes = sum(Path(u).stat().st_size for u in urls)

    def median(fn):
        return statistics.median(fn() for _ in range(args.repeats))

    rows = {}
    rows["file read"] = n_tokens / median(lambda: file_read(urls))
    rows["raw tar read (webdataset)"] = n_tokens / median(lambda: tar_read(urls))
    whole = [SourceSpec("mixed", tuple(urls), 1.0, max_epochs=1)]
    runs = [loader_pass(whole) for _ in range(args.repeats)]
    rows["loader, 1 source"] = statistics.median(t for _, t in runs) / statistics.median(
        s for s, _ in runs
    )
    text = tuple(
        u
        for u, s in zip(urls, manifest["shards"], strict=True)
        if s["tokens_by_modality"]["text"] > s["tokens_by_modality"]["svg"]
    )
    svg = tuple(u for u in urls if u not in text)
    mixed = [SourceSpec("text", text, 0.7, max_epochs=1), SourceSpec("svg", svg, 0.3, max_epochs=1)]
    runs = [loader_pass(mixed) for _ in range(args.repeats)]
    rows["loader, 2 sources mixed 0.7 / 0.3"] = statistics.median(
        t for _, t in runs
    ) / statistics.median(s for s, _ in runs)

    runs = [loader_pass(whole, workers=1) for _ in range(args.repeats)]
    rows["loader, 1 source, in 1 worker process"] = statistics.median(
        t for _, t in runs
    ) / statistics.median(s for s, _ in runs)

    raw = rows["raw tar read (webdataset)"]
    print(
        f"{manifest['samples']} documents, {n_tokens:,} tokens, {len(urls)} shards, "
        f"{n_bytes / n_tokens:.2f} bytes/token on disk; median of {args.repeats}"
    )
    print("| path | M tokens/s | x raw tar read |")
    print("|---|---|---|")
    for name, rate in rows.items():
        print(f"| {name} | {rate / 1e6:.2f} | {rate / raw:.2f} |")
    if args.json:
        result = {"tokens": n_tokens, "repeats": args.repeats, "tokens_per_s": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
