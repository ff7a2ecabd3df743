"""The `mmfm` command.

mmfm train RECIPE.yaml [section.key=value ...]   train (resolved config saved in the run dir)
mmfm config [RECIPE.yaml] [section.key=value ...]  print the resolved config
mmfm eval CKPT DATA... [--steps N] [--json F]       held-out loss, perplexity, bits per byte
mmfm eval CKPT --task NAME [--task NAME ...]       task metrics of its generations (eval.json)
mmfm config --doc [prepare|tokenizer|...]          every field with its type, default and doc
mmfm config --doc-markdown                         all of them as one Markdown page
mmfm prepare RECIPE.yaml [key=value ...]          raw corpora -> tokenized shards
mmfm convert hf CKPT OUT [--dtype bf16]            checkpoint -> Hugging Face folder
mmfm convert from-hf HF_DIR OUT [--extend-vocab R] Llama / Mistral / Qwen2 -> checkpoint
mmfm convert megatron CKPT OUT [--dtype fp32]      checkpoint -> megatron-core torch_dist
mmfm convert from-megatron CKPT OUT [--args F]     megatron-core GPTModel -> checkpoint
mmfm slurm submit RECIPE.yaml --nodes N --gpus-per-node G --time T [...]   a SLURM job
mmfm tokenizer train RECIPE.yaml [key=value ...]   train a tokenizer set or a visual tokenizer
mmfm tokenizer encode RECIPE.yaml FILE ...         show a file's tokens
mmfm tokenizer decode RECIPE.yaml ID ...           ids (or stdin) back to content
mmfm generate MODEL --prompt TEXT [--modality M]   sample a checkpoint or HF folder into files
mmfm inspect DATA_OR_RUN [--out DIR] [--rows N]    packed rows as the trainer sees them (HTML)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

EXAMPLES = """examples:
  mmfm train launch/demo.yaml
  mmfm train launch/demo.yaml optim.lr=3e-4 train.steps=50
  mmfm train launch/demo.yaml train.run_dir=runs/mine train.resume=auto
  mmfm train launch/demo.yaml parallel.tp=2 parallel.pp=2 --nproc 4
  mmfm eval runs/mine/checkpoints/step_1000 held_out/ --json eval.json
  mmfm eval runs/mine/checkpoints/step_1000 notes.txt parallel.tp=2 --nproc 2
  mmfm eval runs/mine/checkpoints/step_1000 --task segmentation --task svg
  mmfm config launch/demo.yaml model.n_layers=8
  mmfm config --doc
  mmfm config --doc prepare
  mmfm prepare data_pipelines/text-kjv.yaml --workers 2
  mmfm convert hf runs/mine/checkpoints/step_1000 hf/mine --dtype bf16
  mmfm convert from-hf ~/llama-tiny ckpt/llama-mm --extend-vocab tokenizers/llm.yaml
  mmfm slurm submit launch/demo.yaml --nodes 2 --gpus-per-node 8 --time 04:00:00 \
      parallel.dp_replicate=2 parallel.dp_shard=2 parallel.tp=4 --dry-run
  mmfm tokenizer train tokenizers/base.yaml
  mmfm tokenizer train tokenizers/seed_image.yaml steps=300
  mmfm tokenizer encode tokenizers/base.yaml icon.svg genome.fa notes.txt
  mmfm tokenizer decode tokenizers/base.yaml 1 907 284 2
  mmfm generate runs/demo/checkpoints/step_200 --prompt "a red cross on a blue background" \
      --modality image --out generations
  mmfm generate ckpt --prompt "{image} segment the cat" --image cat.png --modality mask \
      --tokenizers tokenizers/multimodal.yaml
  mmfm inspect builtin:demo data.seq_len=256 --rows 4 --out inspect-demo
  mmfm inspect runs/mine --step 1000 --rank 3 --ranks 8 --tokenizers tokenizers/multimodal.yaml
"""


EXIT_CODES = """exit codes:
  0    done
  1    a data, checkpoint, conversion, tokenizer or training error (the input must change)
  2    a configuration or command-line mistake (the recipe, an override or an option)
  3    the environment: no MASTER_ADDR, no CUDA device, no sbatch, a world size that does not fit
  141  the output's reader went first (mmfm ... | head), as for any Unix tool
"""


DOC_SCHEMAS = {
    "train": "mmfm.config.schema:Config",
    "prepare": "mmfm.prepare.recipe:PrepareRecipe",
    "tokenizer": "mmfm.tokenization.recipe:TokenizerRecipe",
    "visual-tokenizer": "mmfm.tokenization.visual.train:VisualRecipe",
}
"""`mmfm config --doc SCHEMA`: the dataclass tree of each kind of recipe."""


class _Parser(argparse.ArgumentParser):
    """argparse with its mistakes reported like every other: one `mmfm:` line, exit 2 (the
    usage block is one `--help` away, named in the line)."""

    def error(self, message: str) -> NoReturn:
        line = f"mmfm: config error: {self.prog}: {message} (see {self.prog} --help)"
        print(line, file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mmfm",
        description="Train multimodal foundation models.",
        epilog=EXAMPLES + "\n" + EXIT_CODES,
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
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config and print the resolved layout (parallel.dp_shard=-1 filled for "
        "--nproc, or the processes torchrun/srun started) and batch split; start and create "
        "nothing",
    )
    config = sub.add_parser("config", help="print the resolved config, or document every field")
    config.add_argument("recipe", nargs="?", help="YAML recipe (defaults only if omitted)")
    config.add_argument("overrides", nargs="*", help="dotted overrides")
    config.add_argument(
        "--doc",
        nargs="?",
        const="train",
        choices=DOC_SCHEMAS,
        help="list every field with its type, default and doc, nested ones too (data.sources[]."
        "kind): of the training config (train, the default) or of the recipes of mmfm prepare "
        "(prepare), mmfm tokenizer train (tokenizer) or a visual tokenizer (visual-tokenizer)",
    )
    config.add_argument(
        "--doc-markdown",
        action="store_true",
        help="write the fields of every recipe kind as one Markdown page (the configuration "
        "reference: mmfm config --doc-markdown > docs/reference/configuration.md)",
    )
    prepare = sub.add_parser("prepare", help="tokenize raw corpora into WebDataset shards")
    prepare.add_argument("recipe", help="data recipe, e.g. data_pipelines/text-kjv.yaml")
    prepare.add_argument("overrides", nargs="*", help="dotted overrides, e.g. shard_size=500")
    prepare.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes that read and tokenize in parallel (default: the CPUs here, %(default)s)",
    )
    prepare.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild shards of the output made with another recipe, tokenizer or inputs",
    )
    prepare.add_argument(
        "--part", default="0/1", help="i/n: only shards i, i+n, ... (one task of an array job)"
    )
    _add_convert_parser(sub)
    _add_tokenizer_parser(sub)
    _add_slurm_parser(sub)
    _add_eval_parser(sub)
    _add_generate_parser(sub)
    _add_inspect_parser(sub)
    return parser


def _add_inspect_parser(sub) -> None:
    ins = sub.add_parser(
        "inspect",
        help="packed rows as the trainer sees them, spans decoded: a static HTML report",
    )
    ins.add_argument(
        "data",
        help="prepared shards (a folder, files, a pattern, builtin:demo), a training recipe, "
        "or a run directory / checkpoint (its config.yaml and vocab.json)",
    )
    ins.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=512 train.seed=3"
    )
    ins.add_argument("--out", default="inspect", help="folder for index.html and media/")
    ins.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    ins.add_argument("--source", help="only this source of data.sources (default: the mix)")
    ins.add_argument(
        "--stream",
        type=int,
        default=0,
        help="the virtual stream shown: row STREAM of every global batch (default 0)",
    )
    ins.add_argument(
        "--rank",
        type=int,
        help="instead of --stream: every stream of data-parallel rank RANK of --ranks",
    )
    ins.add_argument("--ranks", type=int, default=1, help="the data-parallel size of --rank")
    ins.add_argument(
        "--step", type=int, default=0, help="the first step shown (earlier ones are read)"
    )
    ins.add_argument("--rows", type=int, default=4, help="steps shown (one row per stream each)")
    ins.add_argument(
        "--tokenizers",
        help="the tokenizer recipe the data was made with: its visual tokenizers decode "
        "image, mask and video codes (as for mmfm generate)",
    )
    ins.add_argument(
        "--vocab", help="the data's vocab.json (default: the run's, data.vocab or the shards')"
    )
    ins.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser(
        "generate", help="sample a checkpoint or exported HF folder; write every span as a file"
    )
    gen.add_argument("model", help="a checkpoint directory or a folder from mmfm convert hf")
    gen.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="repeat for a batch; {image}, {video}, {dna}, {svg} place the file of --image ... "
        'there: "{image} segment the cat"',
    )
    gen.add_argument("--prompts-file", help="more prompts, one per line")
    gen.add_argument(
        "--prompts",
        metavar="JSONL",
        help='prompts with their own files, one JSON object a line: {"prompt": "{image} segment '
        'the cat", "image": "cat.png", "modality": "mask"}; fields: prompt (required), '
        "modality (default --modality), image, video, dna, svg (paths relative to the file)",
    )
    for kind, what in (
        ("image", "a picture"),
        ("video", "a clip (2 frames a second, at most 8)"),
        ("dna", "a FASTA / FASTQ / GenBank file of one sequence"),
        ("svg", "an SVG file"),
    ):
        gen.add_argument(
            f"--{kind}",
            metavar="FILE",
            help=f"{what}, tokenized by --tokenizers where every --prompt says {{{kind}}}",
        )
    gen.add_argument(
        "--fit",
        choices=["crop", "letterbox"],
        default="crop",
        help="how prompt pictures become square, as the data's sources[].fit (voc, coco: "
        "letterbox)",
    )
    gen.add_argument(
        "--modality",
        default="text",
        help="the answer's modality (text, image, mask, video, dna, svg or a registered one, "
        "docs/adding_a_modality.md): its opening delimiter is appended to each prompt",
    )
    gen.add_argument(
        "--out",
        default="generations",
        help="folder for the files; a later run into it numbers its files after the earlier "
        "ones and appends to generations.jsonl (nothing is overwritten)",
    )
    gen.add_argument(
        "--max-new-tokens", type=int, default=256, help="tokens sampled per prompt at most"
    )
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    gen.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus filter")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling (reproducible)")
    gen.add_argument(
        "--cfg-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance (1: off); the unconditional prompt is <s> + delimiter",
    )
    gen.add_argument("--batch-size", type=int, default=8, help="prompts sampled together")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    gen.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights while sampling"
    )
    gen.add_argument(
        "--tokenizers",
        help="the tokenizer recipe the model's data was made with: it encodes prompt files "
        "and its visual tokenizers decode image/mask/video",
    )
    gen.add_argument("--no-constrain", action="store_true", help="sample without the span grammar")


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser(
        "eval", help="held-out loss per modality, perplexity and text bits per byte of a checkpoint"
    )
    ev.add_argument("checkpoint", help="a checkpoint directory (any training layout)")
    ev.add_argument(
        "data",
        nargs="*",
        help="held-out shards (directories, files, patterns, builtin:demo:held_out) or raw "
        ".txt files; dotted overrides (parallel.tp=2, train.device=cuda) may follow",
    )
    ev.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME",
        help="instead of DATA: score the generations on the config's eval.tasks entry NAME "
        "(segmentation, svg, dna-classify, image, video, text); repeat for several; one process; "
        "metrics to --json (default eval.json)",
    )
    ev.add_argument("--steps", type=int, default=0, help="global batches (0: a whole pass)")
    ev.add_argument("--json", dest="json_path", help="also write the results to this file")
    ev.add_argument("--nproc", type=int, default=None, help="local processes, as for train")
    ev.set_defaults(overrides=[])


def _add_slurm_parser(sub) -> None:
    slurm = sub.add_parser("slurm", help="submit training, preparation and export jobs to SLURM")
    ssub = slurm.add_subparsers(dest="action", required=True)

    def common(p, time_default="01:00:00"):
        p.add_argument("--time", default=time_default, help="HH:MM:SS limit of the job")
        p.add_argument("--partition", help="SLURM partition (sbatch --partition)")
        p.add_argument("--account", help="account charged for the job (sbatch --account)")
        p.add_argument(
            "--cpus-per-task",
            type=int,
            help="CPUs of each task (default: what the job gets on a node, split over its tasks)",
        )
        _add_site_options(p)
        p.add_argument("--template", help="another .sbatch template (double-brace placeholders)")
        p.add_argument(
            "--dry-run", action="store_true", help="print the job script, submit nothing"
        )

    train = ssub.add_parser("submit", help="a training job (train.sbatch)")
    train.add_argument("recipe", help="training recipe, e.g. launch/demo.yaml")
    train.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=4 parallel.dp_shard=-1"
    )
    train.add_argument(
        "--nodes", type=int, default=1, help="nodes of the job (world size: nodes x tasks)"
    )
    train.add_argument("--gpus-per-node", type=int, default=0, help="0 on CPU nodes")
    train.add_argument("--ntasks-per-node", type=int, help="default: one per GPU")
    train.add_argument(
        "--signal-seconds", type=int, default=120, help="SIGUSR1 this long before the limit"
    )
    common(train)
    prepare = ssub.add_parser("prepare", help="an array job of mmfm prepare (prepare.sbatch)")
    prepare.add_argument("recipe", help="data recipe, e.g. data_pipelines/text-kjv.yaml")
    prepare.add_argument("overrides", nargs="*", help="dotted overrides, e.g. shard_size=500")
    prepare.add_argument("--parts", type=int, default=4, help="array tasks")
    prepare.add_argument(
        "--overwrite",
        action="store_true",
        help="remove shards of a changed recipe from the output now, then rebuild them",
    )
    common(prepare)
    convert = ssub.add_parser("convert", help="a Hugging Face export job (convert.sbatch)")
    convert.add_argument(
        "checkpoint", help="a checkpoint directory, e.g. runs/x/checkpoints/step_100"
    )
    convert.add_argument("out", help="output folder of the Hugging Face export")
    convert.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the weights"
    )
    common(convert)


def _add_site_options(p) -> None:
    """How the cluster runs a job: the `mmfm slurm` options of `mmfm.slurm.Site`."""
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more #SBATCH --KEY=VALUE line, e.g. mem=64G, qos=high, constraint=a100, "
        "exclusive= (a flag); repeatable",
    )
    p.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="a shell line the job runs before srun, e.g. 'module load cuda/12.4', "
        "'source venv/bin/activate', 'export NCCL_SOCKET_IFNAME=ib0'; repeatable",
    )
    p.add_argument(
        "--container",
        metavar="IMAGE",
        help="run in this container: pyxis/enroot (srun --container-image), or apptainer "
        "for a .sif file; the submit and output directories are mounted",
    )
    p.add_argument(
        "--container-mounts",
        metavar="SRC:DST,...",
        help="more mounts for --container (data, caches), comma-separated",
    )
    p.add_argument(
        "--python",
        help="interpreter of the job (default: this one; python in a --container)",
    )


def _add_convert_parser(sub) -> None:
    convert = sub.add_parser("convert", help="export to / import from Hugging Face, Megatron")
    csub = convert.add_subparsers(dest="action", required=True)
    hf = csub.add_parser("hf", help="checkpoint -> Hugging Face Llama folder (safetensors)")
    hf.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/x/checkpoints/step_100")
    hf.add_argument("out", help="output folder")
    hf.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the weights"
    )
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
        help="append the modality tokens of a tokenizer recipe whose text.pretrained is the "
        "model's own tokenizer (a copy of tokenizers/llm.yaml)",
    )
    imp.add_argument("--seed", type=int, default=0, help="seed of the new rows' noise")
    meg = csub.add_parser("megatron", help="checkpoint -> megatron-core torch_dist checkpoint")
    meg.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/x/checkpoints/step_100")
    meg.add_argument("out", help="output folder (torch_dist files + megatron_args.json)")
    meg.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the weights"
    )
    from_meg = csub.add_parser(
        "from-megatron", help="megatron-core GPTModel torch_dist checkpoint -> mmfm checkpoint"
    )
    from_meg.add_argument("checkpoint", help="an iter_* folder or a Megatron-LM save folder")
    from_meg.add_argument("out", help="output checkpoint directory (for train.init_from)")
    from_meg.add_argument(
        "--args",
        dest="megatron_args",
        metavar="FILE",
        help="JSON/YAML of the model's Megatron-LM arguments (default: CKPT/megatron_args.json)",
    )


def _add_tokenizer_parser(sub) -> None:
    tok = sub.add_parser("tokenizer", help="train and try the modality tokenizers")
    tsub = tok.add_subparsers(dest="action", required=True)
    train = tsub.add_parser(
        "train",
        help="train the text (and DNA BPE) models and write vocab.json, or train a visual "
        "tokenizer (recipes with a top-level kind: seed_image, himtok_mask, video)",
    )
    train.add_argument("recipe", help="tokenizer recipe, e.g. tokenizers/base.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. text.vocab_size=16000")
    encode = tsub.add_parser(
        "encode", help="show the tokens of files (svg, fasta/gb, txt, jsonl, images, videos)"
    )
    encode.add_argument("recipe", help="tokenizer recipe, e.g. tokenizers/base.yaml")
    encode.add_argument("files", nargs="+", help="files to tokenize (the extension picks how)")
    encode.add_argument("--show", type=int, default=40, help="tokens shown per document")
    encode.add_argument("--limit", type=int, default=3, help="records shown per file")
    encode.add_argument(
        "--pairs", action="store_true", help="GenBank: CDS -> /product task pairs (Omni-DNA)"
    )
    decode = tsub.add_parser("decode", help="token ids (arguments or stdin) back to content")
    decode.add_argument("recipe", help="tokenizer recipe, e.g. tokenizers/base.yaml")
    decode.add_argument("ids", nargs="*", help="token ids (none: read them from stdin)")
    decode.add_argument(
        "--out", default="decoded", help="folder for decoded images, masks (PNG), videos (GIF)"
    )


def _print_field_docs(schema: str) -> None:
    import dataclasses
    import importlib

    from mmfm.config import field_docs

    module, name = DOC_SCHEMAS[schema].split(":")
    for key, type_name, default, doc in field_docs(getattr(importlib.import_module(module), name)):
        shown = "" if default is dataclasses.MISSING else f", default {default!r}"
        print(f"{key} ({type_name}{shown})\n    {doc}", flush=True)


DOC_TITLES = {
    "train": "Training config: `mmfm train`, `mmfm config`, `mmfm eval`, `mmfm slurm`",
    "prepare": "Prepare recipe: `mmfm prepare`",
    "tokenizer": "Tokenizer recipe: `mmfm tokenizer train`, `mmfm tokenizer encode`",
    "visual-tokenizer": "Visual tokenizer recipe: `tokenizers/seed_image.yaml`, ...",
}


def config_reference_markdown() -> str:
    """docs/reference/configuration.md: `mmfm config --doc` of every schema as Markdown, a
    heading per section and a bullet per field (tests/unit/test_docs.py keeps the page current)."""
    import dataclasses
    import importlib
    import re

    from mmfm.config import field_docs

    def text(doc: str) -> str:  # `<run_dir>` outside code spans would be read as an HTML tag
        parts = re.split(r"(`[^`]*`)", doc)
        return "".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))

    out = [
        "# Configuration reference",
        "",
        "Every field of every recipe kind, with its type, default and docstring, nested ones too",
        "(`data.sources[].kind`). Generated from the config dataclasses by",
        "`mmfm config --doc-markdown > docs/reference/configuration.md` (the same text as",
        "`mmfm config --doc [train|prepare|tokenizer|visual-tokenizer]`); do not edit it by hand:",
        "`tests/unit/test_docs.py` fails when it is out of date. How recipes and dotted overrides",
        "work: [Configuration](../configuration.md).",
    ]
    for schema, spec in DOC_SCHEMAS.items():
        module, name = spec.split(":")
        out += ["", f"## {DOC_TITLES[schema]}", "", f"`mmfm config --doc {schema}`: `{spec}`.", ""]
        fields = list(field_docs(getattr(importlib.import_module(module), name)))
        for i, (key, type_name, default, doc) in enumerate(fields):
            nxt = fields[i + 1][0] if i + 1 < len(fields) else ""
            if default is dataclasses.MISSING and nxt.startswith(key + "."):  # a section
                out += [*([""] if out[-1] else []), f"### `{key}`", "", text(doc), ""]
                continue
            shown = "required" if default is dataclasses.MISSING else f"default `{default!r}`"
            out.append(f"- `{key}` (`{type_name}`, {shown}): {text(doc)}")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may also come after options (`... --nodes 2 parallel.tp=4`).
    unknown = [
        e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")
    ]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from mmfm.core.errors import MmfmError

    try:
        _run(args)
        sys.stdout.flush()  # a reader gone shows here, not as a warning at exit
    except MmfmError as e:
        print(f"mmfm: {e.area} error: {_one_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        _quit_quietly()


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (`mmfm ... | head`): poll reports
    an error on the write end of a pipe without readers."""
    import select

    if not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(event & select.POLLERR for _, event in poller.poll(0))


def _quit_quietly() -> NoReturn:
    """Exit as a Unix tool killed by SIGPIPE does (128 + 13), without a traceback: stdout is
    pointed at /dev/null first, so the flush at exit has nowhere to fail (Python's recipe,
    docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(128 + signal.SIGPIPE)


def _one_line(error: Exception) -> str:
    """The message on one line: a YAML parser's or sbatch's own output may span several."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


def _run(args: argparse.Namespace) -> None:
    commands = {
        "config": _config_command,
        "prepare": _prepare_command,
        "convert": _convert_command,
        "slurm": _slurm_command,
        "tokenizer": _tokenizer_command,
        "generate": _generate_command,
        "inspect": _inspect_command,
        "eval": _eval_command,
        "train": _train_command,
    }
    commands[args.command](args)


def _config_command(args: argparse.Namespace) -> None:
    from mmfm.config import load_config, to_yaml

    try:
        if args.doc_markdown:
            print(config_reference_markdown(), end="", flush=True)
        elif args.doc:
            _print_field_docs(args.doc)
        else:
            print(to_yaml(load_config(args.recipe, args.overrides)), end="", flush=True)
    except BrokenPipeError:  # `mmfm config --doc | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _prepare_command(args: argparse.Namespace) -> None:
    import logging

    from mmfm.config import ConfigError
    from mmfm.prepare import load_prepare_recipe, prepare

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    index, slash, parts = args.part.partition("/")
    if not (slash and index.isdigit() and parts.isdigit() and int(index) < int(parts)):
        raise ConfigError(f"--part {args.part!r} must be i/n with 0 <= i < n, e.g. --part 0/4")
    recipe = load_prepare_recipe(args.recipe, args.overrides)
    prepare(recipe, args.workers, part=(int(index), int(parts)), overwrite=args.overwrite)


def _convert_command(args: argparse.Namespace) -> None:
    import logging

    from mmfm.convert.hf import export_hf, import_hf

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action in ("megatron", "from-megatron"):
        from mmfm.convert.megatron import export_megatron, import_megatron

        if args.action == "megatron":
            export_megatron(args.checkpoint, args.out, args.dtype)
        else:
            import_megatron(args.checkpoint, args.out, args.megatron_args)
    elif args.action == "hf":
        export_hf(args.checkpoint, args.out, args.dtype, args.max_shard_size, args.arch)
    else:
        import_hf(args.hf_dir, args.out, args.extend_vocab, args.seed)


def _train_command(args: argparse.Namespace) -> None:
    from mmfm.config.layout import resolve_layout
    from mmfm.config.loading import load_asked_config

    launch = args.nproc is not None and "LOCAL_RANK" not in os.environ
    world = args.nproc if launch else _world_size()
    job = f"--nproc {args.nproc} starts {args.nproc}" if launch else None
    # Loaded and resolved once, here (fail fast, before any launch); train() takes it as is.
    asked = load_asked_config(args.recipe, args.overrides, world, job)
    cfg = resolve_layout(asked, world, job)
    stages = _stage_configs(args, cfg, world, job)
    if args.dry_run:
        _print_plan(cfg, asked.parallel.dp_shard == -1)
        return
    if launch:
        _launch_local(args.nproc, ["train", args.recipe, *args.overrides])
        return
    from mmfm.train.command import train
    from mmfm.train.stages import train_stages

    result = train_stages(stages) if stages else train(cfg)
    if result.stopped_by:
        print(f"stopped by {result.stopped_by} at step {result.step}", file=sys.stderr)
    _mark_clean_exit()


def _stage_configs(args: argparse.Namespace, cfg, world: int, job: str | None) -> list:
    """Every train.stages entry's config, checked now (before any launch or step)."""
    if not cfg.train.stages:
        return []
    from mmfm.config import load_config
    from mmfm.train.stages import stage_configs

    def load(extra):
        return load_config(args.recipe, [*args.overrides, *extra], world, job)

    return stage_configs(cfg, load)


def _world_size() -> int:
    """The processes torchrun or srun started (1 outside them)."""
    from mmfm.parallel.env import process_ranks

    return process_ranks(dict(os.environ))[1]


def _print_plan(cfg, filled: bool) -> None:
    """`mmfm train --dry-run`: the resolved layout and batch split; nothing is created."""
    from mmfm.config.layout import describe_layout

    t = cfg.train
    print(f"layout: {describe_layout(cfg.parallel, filled)}")
    print(
        f"batch: {t.global_batch_size} rows per step = {cfg.micro_batches_per_step} "
        f"micro-batch(es) of {t.micro_batch_size} rows x {cfg.parallel.dp_size} "
        "data-parallel rank(s)"
    )
    print(f"run dir: {t.run_dir} (not created by a dry run)")


def _slurm_command(args: argparse.Namespace) -> None:
    from mmfm import slurm
    from mmfm.config import ConfigError

    if args.action == "prepare" and args.parts < 1:
        raise ConfigError(f"--parts must be >= 1 (array tasks), got {args.parts}")

    job = {
        "time": args.time,
        "cpus_per_task": args.cpus_per_task,
        "partition": args.partition,
        "account": args.account,
        "template": args.template,
        "dry_run": args.dry_run,
        "site": slurm.Site(
            args.sbatch, args.setup, args.container, args.container_mounts, args.python
        ),
    }
    if args.action == "submit":
        slurm.submit(
            args.recipe,
            args.overrides,
            args.nodes,
            args.gpus_per_node,
            ntasks_per_node=args.ntasks_per_node,
            signal_seconds=args.signal_seconds,
            **job,
        )
    elif args.action == "prepare":
        slurm.submit_prepare(
            args.recipe, args.overrides, args.parts, **job, overwrite=args.overwrite
        )
    else:
        slurm.submit_convert(args.checkpoint, args.out, args.dtype, **job)


def _tokenizer_command(args: argparse.Namespace) -> None:
    from mmfm.tokenization import command

    if args.action == "train":
        command.train(args.recipe, args.overrides)
    elif args.action == "encode":
        command.encode(args.recipe, args.files, args.show, args.pairs, args.limit)
    else:
        command.decode(args.recipe, args.ids, args.out)


def _generate_command(args: argparse.Namespace) -> None:

    from mmfm.config import ConfigError
    from mmfm.decoding.prompts import FILE_KINDS, Prompt, read_prompts
    from mmfm.generate.command import GenerateArgs, run, sampling_from

    texts = [(text, f"--prompt {n}") for n, text in enumerate(args.prompt, 1)]
    if args.prompts_file:
        lines = _read_text(args.prompts_file, "--prompts-file").splitlines()
        texts += [(t, f"{args.prompts_file}:{n}") for n, t in enumerate(lines, 1) if t.strip()]
    files = {k: getattr(args, k) for k in FILE_KINDS if getattr(args, k) is not None}
    if files and not texts:
        raise ConfigError(
            f"--{next(iter(files))} goes into --prompt; a --prompts line names its own files"
        )
    prompts = [Prompt(text, files, origin=origin) for text, origin in texts]
    prompts += read_prompts(args.prompts) if args.prompts else []
    if not prompts:
        raise ConfigError(
            "mmfm generate needs --prompt TEXT (or --prompts-file FILE, --prompts JSONL)"
        )
    sampling = sampling_from(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        cfg_scale=args.cfg_scale,
    )
    run(
        GenerateArgs(
            args.model,
            prompts,
            args.out,
            args.modality,
            sampling,
            args.batch_size,
            args.device,
            args.dtype,
            args.tokenizers,
            not args.no_constrain,
            args.fit,
        )
    )


def _inspect_command(args: argparse.Namespace) -> None:
    from mmfm.inspect.command import InspectArgs, run

    run(
        InspectArgs(
            args.data,
            args.overrides,
            args.out,
            args.source,
            args.stream,
            args.rank,
            args.ranks,
            args.step,
            args.rows,
            args.tokenizers,
            args.vocab,
            args.overwrite,
            not args.no_progress,
        )
    )


def _read_text(name: str, option: str) -> str:
    """The UTF-8 text of a file named on the command line; what the OS or the decoder refuses
    is one line naming the option and the file."""
    from pathlib import Path

    from mmfm.core.errors import DataError, InputNotFound

    path = Path(name)

    if not path.exists():
        raise InputNotFound(f"{option} {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{option} {path}: cannot read it ({e})") from None


def _eval_command(args: argparse.Namespace) -> None:
    import re

    from mmfm.config import ConfigError
    from mmfm.train.eval_command import check_json_path, eval_config, evaluate_checkpoint

    if args.steps < 0:
        raise ConfigError(f"--steps must be >= 0 (0: a whole pass), got {args.steps}")
    check_json_path(args.json_path)
    dotted = [d for d in args.data if re.match(r"^[a-z_]+(\.[a-z_0-9]+)+=", d)]
    data = [d for d in args.data if d not in dotted]
    overrides = [*dotted, *args.overrides]
    if args.task:
        _eval_tasks(args, data, overrides)
        return
    if not data:
        raise ConfigError("mmfm eval needs held-out data after the checkpoint")
    cfg = eval_config(args.checkpoint, overrides)  # fail fast, before any launch; loaded once
    if args.nproc is not None and "LOCAL_RANK" not in os.environ:
        options = ["--steps", str(args.steps)]
        options += ["--json", args.json_path] if args.json_path else []
        _launch_local(args.nproc, ["eval", args.checkpoint, *data, *overrides, *options])
        return
    evaluate_checkpoint(args.checkpoint, data, overrides, args.steps, args.json_path, cfg=cfg)


def _eval_tasks(args: argparse.Namespace, data: list[str], overrides: list[str]) -> None:
    from mmfm.config import ConfigError
    from mmfm.train.eval_command import evaluate_tasks

    if data:
        raise ConfigError(
            f"mmfm eval --task scores generations, not held-out data ({data[0]}): run the "
            "held-out loss and the tasks in two calls"
        )
    if args.nproc is not None or args.steps:
        raise ConfigError(
            "mmfm eval --task runs in one process on all its examples: drop --nproc and --steps"
        )
    evaluate_tasks(args.checkpoint, args.task, overrides, args.json_path or "eval.json")


_CLEAN_EXITS = "MMFM_CLEAN_EXITS"
"""Set by `_launch_local` for its ranks: a folder where each rank that finished cleanly
(trained to the end, or stopped by a signal after its checkpoint) leaves a mark."""


def _mark_clean_exit() -> None:
    if folder := os.environ.get(_CLEAN_EXITS):
        with open(os.path.join(folder, f"rank-{os.environ.get('RANK', '0')}"), "w"):
            pass


def _launch_local(nproc: int, mmfm_args: list[str]) -> None:
    """Run `torchrun --standalone --nproc-per-node N -m mmfm ...` in this process.

    On SIGTERM torchrun's agent forwards the signal to every rank, waits for them
    (`TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, 30 s) and raises `SignalException` whatever they did:
    a traceback and exit 1. Here the stop is clean (exit 0) when every rank marked that it
    saved its checkpoint and returned; otherwise one line says how many did (exit 1).
    """
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    with tempfile.TemporaryDirectory(prefix="mmfm-ranks-") as folder:
        os.environ[_CLEAN_EXITS] = folder
        try:
            torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "mmfm", *mmfm_args])
        except SignalException as e:
            name = signal.Signals(e.sigval).name
            clean = len(os.listdir(folder))
            if clean == nproc:
                print(f"mmfm: stopped by {name}; all {nproc} ranks exited cleanly", file=sys.stderr)
                return
            print(
                f"mmfm: stopped by {name}; only {clean} of {nproc} ranks exited cleanly (the "
                "others were killed or failed: see their output above)",
                file=sys.stderr,
            )
            sys.exit(1)
        finally:
            del os.environ[_CLEAN_EXITS]
