"""The `mmfm` command.

mmfm train RECIPE.yaml [section.key=value ...]   train (resolved config saved in the run dir)
mmfm config [RECIPE.yaml] [section.key=value ...]  print the resolved config
mmfm config --doc                                  every field with its type, default and doc
mmfm prepare RECIPE.yaml [key=value ...]          raw corpora -> tokenized shards
mmfm convert hf CKPT OUT [--dtype bf16]            checkpoint -> Hugging Face folder
mmfm convert from-hf HF_DIR OUT [--extend-vocab R] Llama / Mistral / Qwen2 -> checkpoint
mmfm tokenizer train RECIPE.yaml [key=value ...]   train a tokenizer set (tokenizers/*.yaml)
mmfm tokenizer encode RECIPE.yaml FILE ...         show a file's tokens
mmfm tokenizer decode RECIPE.yaml ID ...           ids (or stdin) back to text / DNA / SVG
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

EXAMPLES = """examples:
  mmfm train launch/demo.yaml
  mmfm train launch/demo.yaml optim.lr=3e-4 train.steps=50
  mmfm train launch/demo.yaml train.run_dir=runs/mine train.resume=auto
  mmfm train launch/demo.yaml parallel.tp=2 parallel.pp=2 --nproc 4
  mmfm config launch/demo.yaml model.n_layers=8
  mmfm config --doc
  mmfm prepare data_pipelines/text-kjv.yaml --workers 2
  mmfm convert hf runs/mine/checkpoints/step_1000 hf/mine --dtype bf16
  mmfm convert from-hf ~/llama-tiny ckpt/llama-mm --extend-vocab tokenizers/base.yaml
  mmfm tokenizer train tokenizers/base.yaml
  mmfm tokenizer encode tokenizers/base.yaml icon.svg genome.fa notes.txt
  mmfm tokenizer decode tokenizers/base.yaml 1 907 284 2
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmfm",
        description="Train multimodal foundation models.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train a model from a YAML recipe",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("recipe", help="YAML recipe, e.g. launch/demo.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    train.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="start this many local processes with torchrun's launcher (one per GPU); "
        "under torchrun or srun leave it out",
    )
    config = sub.add_parser("config", help="print the resolved config, or document every field")
    config.add_argument("recipe", nargs="?", help="YAML recipe (defaults only if omitted)")
    config.add_argument("overrides", nargs="*", help="dotted overrides")
    config.add_argument("--doc", action="store_true", help="list every field with its doc")
    prepare = sub.add_parser("prepare", help="tokenize raw corpora into WebDataset shards")
    prepare.add_argument("recipe", help="data recipe, e.g. data_pipelines/text-kjv.yaml")
    prepare.add_argument("overrides", nargs="*", help="dotted overrides, e.g. shard_size=500")
    prepare.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    _add_convert_parser(sub)
    _add_tokenizer_parser(sub)
    return parser


def _add_convert_parser(sub) -> None:
    convert = sub.add_parser("convert", help="export to / import from Hugging Face")
    csub = convert.add_subparsers(dest="action", required=True)
    hf = csub.add_parser("hf", help="checkpoint -> Hugging Face Llama folder (safetensors)")
    hf.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/x/checkpoints/step_100")
    hf.add_argument("out", help="output folder")
    hf.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    hf.add_argument("--max-shard-size", default="2GB", help="e.g. 500MB")
    hf.add_argument(
        "--arch",
        choices=["auto", "llama", "mistral", "qwen2"],
        default="auto",
        help="architecture of the export (auto: qwen2 if the model has q/k/v biases, else llama)",
    )
    imp = csub.add_parser("from-hf", help="Llama / Mistral / Qwen2 folder -> mmfm checkpoint")
    imp.add_argument("hf_dir", help="a Hugging Face model folder (config.json + weights)")
    imp.add_argument("out", help="output checkpoint directory (for train.init_from)")
    imp.add_argument(
        "--extend-vocab",
        metavar="RECIPE",
        help="append the modality tokens of a tokenizer recipe (tokenizers/*.yaml)",
    )
    imp.add_argument("--seed", type=int, default=0, help="seed of the new rows' noise")


def _add_tokenizer_parser(sub) -> None:
    tok = sub.add_parser("tokenizer", help="train and try the modality tokenizers")
    tsub = tok.add_subparsers(dest="action", required=True)
    train = tsub.add_parser("train", help="train the text (and DNA BPE) models, write vocab.json")
    train.add_argument("recipe", help="tokenizer recipe, e.g. tokenizers/base.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. text.vocab_size=16000")
    encode = tsub.add_parser("encode", help="show the tokens of files (svg, fasta/gb, txt, jsonl)")
    encode.add_argument("recipe")
    encode.add_argument("files", nargs="+")
    encode.add_argument("--show", type=int, default=40, help="tokens shown per document")
    encode.add_argument("--limit", type=int, default=3, help="records shown per file")
    encode.add_argument(
        "--pairs", action="store_true", help="GenBank: CDS -> /product task pairs (Omni-DNA)"
    )
    decode = tsub.add_parser("decode", help="token ids (arguments or stdin) back to content")
    decode.add_argument("recipe")
    decode.add_argument("ids", nargs="*")


def _print_field_docs() -> None:
    from mmfm.config import field_docs

    for key, type_name, default, doc in field_docs():
        print(f"{key} ({type_name}, default {default!r})\n    {doc}")


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from mmfm.config import ConfigError, load_config, to_yaml

    try:
        if args.command == "config":
            if args.doc:
                _print_field_docs()
            else:
                print(to_yaml(load_config(args.recipe, args.overrides)), end="")
        elif args.command == "prepare":
            import logging

            from mmfm.data.prepare import load_prepare_recipe, prepare

            logging.basicConfig(level=logging.INFO, format="%(message)s")
            prepare(load_prepare_recipe(args.recipe, args.overrides), args.workers)
        elif args.command == "convert":
            import logging

            from mmfm.convert.hf import export_hf, import_hf

            logging.basicConfig(level=logging.INFO, format="%(message)s")
            if args.action == "hf":
                export_hf(args.checkpoint, args.out, args.dtype, args.max_shard_size, args.arch)
            else:
                import_hf(args.hf_dir, args.out, args.extend_vocab, args.seed)
        elif args.command == "tokenizer":
            _tokenizer_command(args)
        elif args.command == "train":
            cfg = load_config(args.recipe, args.overrides)  # fail fast, before any launch
            if args.nproc is not None and "LOCAL_RANK" not in os.environ:
                _launch_local(args.nproc, ["train", args.recipe, *args.overrides])
                return
            from mmfm.train.main import train

            result = train(cfg)
            if result.stopped_by:
                print(f"stopped by {result.stopped_by} at step {result.step}", file=sys.stderr)
    except ConfigError as e:
        print(f"mmfm: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except _user_errors() as e:
        print(f"mmfm: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


def _tokenizer_command(args: argparse.Namespace) -> None:
    from mmfm.tokenization import commands

    if args.action == "train":
        commands.train(args.recipe, args.overrides)
    elif args.action == "encode":
        commands.encode(args.recipe, args.files, args.show, args.pairs, args.limit)
    else:
        commands.decode(args.recipe, args.ids)


def _launch_local(nproc: int, mmfm_args: list[str]) -> None:
    """Run `torchrun --standalone --nproc-per-node N -m mmfm ...` in this process."""
    from torch.distributed.run import main as torchrun

    torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "mmfm", *mmfm_args])


def _user_errors() -> tuple[type[Exception], ...]:
    from mmfm.convert.hf import ConversionError
    from mmfm.data.real import FetchError
    from mmfm.data.shards import ShardError
    from mmfm.data.stream import DataError
    from mmfm.tokenization.dna import DnaError
    from mmfm.tokenization.svg import SvgError
    from mmfm.tokenization.vocab import VocabError
    from mmfm.train.checkpoint import CheckpointError
    from mmfm.train.trainer import NonFiniteLossError

    return (
        ShardError,
        CheckpointError,
        NonFiniteLossError,
        VocabError,
        DnaError,
        SvgError,
        FetchError,
        FileNotFoundError,
        DataError,
        ConversionError,
    )
