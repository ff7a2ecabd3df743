"""`mmfm inspect DATA_OR_RUN`: the packed rows the trainer would see, as a static HTML report.

DATA_OR_RUN is shards in any `data.paths` syntax (a folder, files, patterns, `builtin:demo`),
a training recipe, or a run directory (or checkpoint) whose `config.yaml` and `vocab.json`
say which data and vocabulary it trained on. Each stream shown is the trainer's
`VirtualStream` (mmfm/data/stream.py) on the sources and settings the loader builds, in this
process, so mixing, shuffling and packing are the trainer's own; row i of every global batch
is stream i, and `--rank R --ranks D` shows the streams data-parallel rank R of D trains on.
Spans are split and decoded into media files by `mmfm.decoding` (`split_spans`, `SpanWriter`);
the page itself is written by `report.py`. The output folder is checked before any row is read.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmfm.config import ConfigError, load_config
from mmfm.config.schema import Config
from mmfm.core.errors import InputNotFound
from mmfm.core.files import make_folder
from mmfm.data.loader import StreamingLoader, rank_streams, source_specs, stream_settings
from mmfm.data.stream import SourcesExhausted, VirtualStream
from mmfm.decoding.layout import Layout, demo_layout, visual_sizes
from mmfm.inspect.report import Piece, Row, write_report
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.visual.records import VisualTokenizers
from mmfm.tokenization.vocab import VOCAB_FILE, Vocab, VocabError

RUN_CONFIG = "config.yaml"
"""What `mmfm train` saves in its run dir and every checkpoint (mmfm/train/command.py)."""
REPORT = "index.html"
MEDIA = "media"


@dataclass(frozen=True)
class InspectArgs:
    data: str
    """Shards (any `data.paths` syntax), a training recipe, or a run directory / checkpoint."""
    overrides: Sequence[str] = ()
    """Dotted config overrides (data.seq_len=512, train.global_batch_size=16, ...)."""
    out: str = "inspect"
    source: str | None = None
    """Only this source of `data.sources` (default: the mix the trainer reads)."""
    stream: int = 0
    rank: int | None = None
    """With `ranks`: every stream of this data-parallel rank instead of `stream`."""
    ranks: int = 1
    step: int = 0
    """The first step shown (the steps before it are read and packed, not shown)."""
    rows: int = 4
    """Steps shown (each gives one row per stream shown)."""
    tokenizers: str | None = None
    """The tokenizer recipe of the data: its visual tokenizers decode image, mask, video."""
    vocab: str | None = None
    overwrite: bool = False
    progress: bool = True


@dataclass
class Inputs:
    """What the report is made of: where the rows came from and how to read their ids."""

    cfg: Config
    layout: Layout
    visual: VisualTokenizers | None
    streams: list[int]
    describe: str
    """DATA_OR_RUN as given, with what it resolved to."""


def run(args: InspectArgs) -> Path:
    """Read the rows, decode their spans into `<out>/media`, write `<out>/index.html`."""
    if args.rows < 1 or args.step < 0:
        raise ConfigError(f"--rows must be positive and --step >= 0 (got {args.rows}, {args.step})")
    inputs = resolve(args)
    out = prepare_out(Path(args.out), args.overwrite)
    rows = list(read_rows(inputs.cfg, inputs.streams, args.step, args.rows, args.progress))
    path = write_report(
        out, inputs.describe, inputs.cfg, inputs.layout, inputs.visual, rows, args.progress
    )
    print(f"{path}: {len(rows)} row(s) of stream(s) {inputs.streams}")
    return path


# -- inputs -------------------------------------------------------------------------------------


def resolve(args: InspectArgs) -> Inputs:
    """The config, layout and streams of DATA_OR_RUN; every mistake a one-line error."""
    cfg, vocab_file, describe = _config(args.data, args.overrides)
    cfg.data.num_workers = 0  # the rows are read in this process
    if args.source is not None:
        _keep_source(cfg, args.source)
    vocab_file = Path(args.vocab) if args.vocab else vocab_file
    if vocab_file is None and args.tokenizers:
        vocab_file = Path(load_recipe(args.tokenizers).output_dir) / VOCAB_FILE
    layout, visual = _layout(cfg, vocab_file, args.tokenizers, args.data)
    shards = describe.startswith("the shards")
    if shards and not any(o.startswith("model.vocab_size=") for o in args.overrides):
        cfg.model.vocab_size = layout.size  # ids beyond it would be skipped as bad samples
    return Inputs(cfg, layout, visual, _streams(cfg, args), describe)


def _config(data: str, overrides: Sequence[str]) -> tuple[Config, Path | None, str]:
    """(config, vocab.json or None, description) of shards, a recipe or a run directory.
    Rows depend on neither the micro-batch size (one stream per row) nor the model: the
    micro-batch is set to 1 and `model.max_seq_len` to 2^24, so that any
    `train.global_batch_size` (the number of streams) and `data.seq_len` may be asked for."""
    path = Path(data)
    overrides = ["train.micro_batch_size=1", f"model.max_seq_len={1 << 24}", *overrides]
    if path.is_dir() and (path / RUN_CONFIG).is_file():  # a run directory or a checkpoint
        cfg = load_config(path / RUN_CONFIG, overrides)
        vocab = path / VOCAB_FILE if (path / VOCAB_FILE).is_file() else _vocab_of(cfg)
        return cfg, vocab, f"the data of the run {data}"
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise InputNotFound(f"{data}: no such recipe; give a training recipe, shards or a run")
        cfg = load_config(path, overrides)
        return cfg, _vocab_of(cfg), f"the data of the recipe {data}"
    if not data.startswith(("builtin:", "http://", "https://", "pipe:")) and not _matches(data):
        raise InputNotFound(
            f"{data}: no such shards, recipe or run directory; give a folder of shards, a "
            "shard pattern, builtin:demo, a training recipe or a run directory (config.yaml)"
        )
    cfg = load_config(None, overrides)
    cfg.data.paths, cfg.data.sources = [data], []
    vocab = _vocab_of(cfg)
    if vocab is None:
        folder = path if path.is_dir() else path.parent
        vocab = folder / VOCAB_FILE if (folder / VOCAB_FILE).is_file() else None
    return cfg, vocab, f"the shards {data}"


def _matches(data: str) -> bool:
    """Whether a local path (or brace pattern) names something: its folder exists at least."""
    return Path(data).exists() or ("{" in data and Path(data.split("{")[0]).parent.is_dir())


def _vocab_of(cfg: Config) -> Path | None:
    return Path(cfg.data.vocab) if cfg.data.vocab else None


def _keep_source(cfg: Config, name: str) -> None:
    sources = cfg.data.source_list()
    chosen = [s for s in sources if s.name == name]
    if not chosen:
        have = ", ".join(s.name for s in sources)
        raise ConfigError(f"--source {name!r}: the data has no such source; it has {have}")
    cfg.data.paths, cfg.data.sources = [], chosen


def _layout(
    cfg: Config, vocab_file: Path | None, recipe: str | None, data: str
) -> tuple[Layout, VisualTokenizers | None]:
    """The id layout of the rows (the demo's, or the vocabulary's with the trained visual
    tokenizers' sizes) and the visual tokenizers that decode their codes."""
    demo = all(p.startswith("builtin:demo") for s in cfg.data.source_list() for p in s.paths)
    if demo:
        if vocab_file is not None or recipe is not None:
            raise ConfigError(
                f"{data}: builtin:demo has its own small vocabulary; leave out --vocab, "
                "--tokenizers and data.vocab"
            )
        return demo_layout(), None
    if vocab_file is None:
        raise ConfigError(
            f"{data}: no vocabulary to read its ids with: pass --vocab VOCAB.json (mmfm prepare "
            "writes it next to the shards) or --tokenizers RECIPE (the tokenizer recipe)"
        )
    if not vocab_file.is_file():
        raise InputNotFound(f"{vocab_file}: no such vocabulary; pass --vocab VOCAB.json")
    vocab = Vocab.load(vocab_file)
    if recipe is None:
        return Layout.from_vocab(vocab), None
    tokenizers = load_recipe(recipe)
    theirs = Path(tokenizers.output_dir) / VOCAB_FILE
    if theirs.is_file() and Vocab.load(theirs).fingerprint != vocab.fingerprint:
        raise VocabError(
            f"--tokenizers {recipe} has another vocabulary than {vocab_file}: give the "
            "tokenizer recipe the data was prepared with"
        )
    visual = VisualTokenizers(tokenizers, vocab)
    return Layout.from_vocab(vocab, *visual_sizes(tokenizers, visual)), visual


def _streams(cfg: Config, args: InspectArgs) -> list[int]:
    """The virtual streams shown: `--stream`, or every stream of `--rank R --ranks D`."""
    n = cfg.train.global_batch_size
    if args.rank is None:
        if not 0 <= args.stream < n:
            raise ConfigError(
                f"--stream {args.stream}: the data has train.global_batch_size={n} streams "
                f"(one per row of a global batch); choose 0..{n - 1}"
            )
        return [args.stream]
    if args.ranks < 1 or n % args.ranks or not 0 <= args.rank < args.ranks:
        raise ConfigError(
            f"--rank {args.rank} --ranks {args.ranks}: give 0 <= rank < ranks, where ranks "
            f"divides train.global_batch_size={n}"
        )
    return rank_streams(n, args.rank, args.ranks)


# -- rows ---------------------------------------------------------------------------------------


def prepare_out(out: Path, overwrite: bool) -> Path:
    """`out` made (or emptied of an earlier report with `overwrite`) before any work."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (overwrite and (out / REPORT).is_file()):
            why = "holds an earlier report" if (out / REPORT).is_file() else "is not empty"
            fix = "pass --overwrite to replace it" if (out / REPORT).is_file() else ""
            raise ConfigError(
                f"--out {out} {why}: choose an empty or new folder" + (f", or {fix}" if fix else "")
            )
        (out / REPORT).unlink()
        shutil.rmtree(out / MEDIA, ignore_errors=True)
    make_folder(out, f"--out {out}")
    make_folder(out / MEDIA, f"--out {out}")
    return out


def read_rows(
    cfg: Config, streams: Sequence[int], first: int, steps: int, progress: bool = True
) -> Iterator[Row]:
    """Rows of `streams` at steps first .. first + steps - 1, step by step: each stream is the
    trainer's `VirtualStream` with the loader's sources and settings (a stream's rows depend
    neither on the others nor on the number of ranks or workers); its row statistics say
    which pieces of which documents each row holds. A stream whose sources ran dry stops."""
    from tqdm import tqdm

    loader = StreamingLoader(source_specs(cfg), stream_settings(cfg), 1, num_workers=0)
    names = loader.names
    live = [VirtualStream(i, loader.sources, loader.settings) for i in streams]
    with tqdm(total=(first + steps) * len(streams), unit="row", disable=not progress) as bar:
        for step in range(first + steps):
            for stream in list(live):
                bar.update()
                try:
                    arrays, stats, skipped = stream.next_row()
                except SourcesExhausted:
                    live.remove(stream)
                    continue
                if step < first:
                    continue
                counts = {names[i]: t for i, t in stats.tokens_by_source.items()}
                stacked = arrays["tokens"].ndim == 2  # decompose: the step's rows, stacked
                for r, placed in enumerate(stats.pieces):
                    row = {k: v[r] if stacked else v for k, v in arrays.items()}
                    pieces = [Piece(d.key, d.source, a, b, len(d.tokens)) for d, a, b in placed]
                    yield Row(step, stream.id, row, pieces, counts, skipped)
