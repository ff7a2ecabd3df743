"""Every command met with a bad input: one `mmfm: <area> error:` line, the documented exit code.

Each case runs `mmfm.cli.main` in this process (two through `python -m mmfm`, for the real
stderr of a fresh interpreter) on a missing file, a wrong recipe key, a folder that is not a
checkpoint, a bad option value or a missing machine feature, and requires stderr to be exactly
one line, starting with the area that `mmfm.core.errors` gives that kind of error, and no
traceback. Nothing is trained or loaded: each bad input is refused before any model is built.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmfm import cli
from mmfm.config import load_config, save_config
from mmfm.core import errors

from helpers import TINY

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "launch/demo.yaml")


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """A folder of bad inputs: broken YAML, undecodable text, a jsonl without its field, a FASTA
    file with text before its first record, recipes naming what is not there."""
    root = tmp_path_factory.mktemp("bad")
    (root / "broken.yaml").write_text("model: [1, 2\n")
    (root / "binary.txt").write_bytes(b"\xff\xfe not UTF-8")
    (root / "notes.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n")
    (root / "genome.fa").write_text("a note before the first record\n>seq1\nACGT\n")
    (root / "folder").mkdir()
    (root / "taken").write_text("a file where a folder is asked for")
    base = (REPO / "tokenizers/base.yaml").read_text()
    trained = re.sub(r"(?m)^output_dir: .*$", f"output_dir: {REPO / 'tokenizers/base'}", base)
    (root / "tok.yaml").write_text(trained)
    (root / "untrained.yaml").write_text(f"output_dir: {root / 'none'}\n")
    (root / "prepare.yaml").write_text(
        f"name: x\noutput: {root / 'shards'}\ntokenizer: {REPO / 'tokenizers/base.yaml'}\n"
        f"sources:\n  - kind: text\n    name: x\n    paths: ['{root / 'nothing'}/*.txt']\n"
    )
    (root / "configured").mkdir()  # a config.yaml, no weights: past the checks before loading
    save_config(load_config(None, TINY), root / "configured" / "config.yaml")
    (root / "gpt2").mkdir()
    (root / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return root


def refused(capsys, *args) -> tuple[int, str]:
    """(exit code, the one stderr line) of `mmfm ARGS`; fails on a traceback or other lines."""
    with pytest.raises(SystemExit) as stop:
        cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmfm: "), err
    return stop.value.code, lines[0]


def expect(capsys, code: int, area: str, words: str, *args) -> None:
    got, line = refused(capsys, *args)
    assert (got, line.split(" error: ")[0]) == (code, f"mmfm: {area}"), line
    assert words in line, line


# (case, "exit-code area", words of the line, the command: {bad} {tmp} {demo} are paths)
CASES = [
    ("train: missing recipe", "2 config", "does not exist", "train {bad}/none.yaml"),
    (
        "train: key typo",
        "2 config",
        "did you mean 'model.n_layers'",
        "train {demo} model.n_layer=2",
    ),
    (
        "train: unknown option",
        "2 config",
        "unrecognized arguments: --step",
        "train {demo} --step 3",
    ),
    (
        "train: run dir is a file",
        "2 config",
        "cannot make this folder",
        "train {demo} train.run_dir={bad}/taken",
    ),
    (
        "train: layout of 2 processes",
        "3 environment",
        "but 1 processes were started",
        "train {demo} parallel.dp_shard=2 train.run_dir={tmp}/r",
    ),
    ("config: broken YAML", "2 config", "cannot parse", "config {bad}/broken.yaml"),
    (
        "config: index past a list's end",
        "2 config",
        "there is no data.paths[1]: data.paths has 1 entry",
        "config {demo} data.paths.1=a",
    ),
    (
        "prepare: no file matches",
        "1 data",
        "matches no file",
        "prepare {bad}/prepare.yaml --workers 1",
    ),
    (
        "prepare: bad --part",
        "2 config",
        "--part '2/2' must be i/n",
        "prepare {bad}/prepare.yaml --part 2/2",
    ),
    (
        "tokenizer train: missing recipe",
        "2 config",
        "does not exist",
        "tokenizer train {bad}/none.yaml",
    ),
    (
        "tokenizer train: broken YAML",
        "2 config",
        "cannot parse",
        "tokenizer train {bad}/broken.yaml",
    ),
    (
        "tokenizer encode: untrained",
        "1 tokenizer",
        "run mmfm tokenizer train",
        "tokenizer encode {bad}/untrained.yaml {bad}/taken",
    ),
    (
        "tokenizer encode: missing file",
        "1 data",
        "none.txt: no such file",
        "tokenizer encode {bad}/tok.yaml {bad}/none.txt",
    ),
    (
        "tokenizer encode: a directory",
        "1 data",
        "is a directory",
        "tokenizer encode {bad}/tok.yaml {bad}/folder",
    ),
    (
        "tokenizer encode: not UTF-8",
        "1 data",
        "binary.txt: cannot read it",
        "tokenizer encode {bad}/tok.yaml {bad}/binary.txt",
    ),
    (
        "tokenizer encode: jsonl field",
        "1 data",
        "no string field 'text'",
        "tokenizer encode {bad}/tok.yaml {bad}/notes.jsonl",
    ),
    (
        "tokenizer encode: FASTA head",
        "1 tokenizer",
        "genome.fa: after 0 records",
        "tokenizer encode {bad}/tok.yaml {bad}/genome.fa",
    ),
    (
        "tokenizer decode: not an id",
        "2 config",
        "not 'seven'",
        "tokenizer decode {bad}/tok.yaml 1 seven",
    ),
    (
        "tokenizer decode: outside vocab",
        "1 tokenizer",
        "outside the vocabulary",
        "tokenizer decode {bad}/tok.yaml 99999999",
    ),
    (
        "convert hf: not a checkpoint",
        "1 conversion",
        "is not an mmfm checkpoint",
        "convert hf {bad}/folder {tmp}/hf",
    ),
    (
        "convert hf: bad --dtype",
        "2 config",
        "invalid choice: 'int8'",
        "convert hf {bad}/folder {tmp}/hf --dtype int8",
    ),
    (
        "convert hf: bad --max-shard-size",
        "2 config",
        "'lots' is not a size",
        "convert hf {bad}/folder {tmp}/hf --max-shard-size lots",
    ),
    (
        "convert from-hf: missing folder",
        "1 conversion",
        "has no config.json",
        "convert from-hf {bad}/none {tmp}/c",
    ),
    (
        "convert from-hf: gpt2",
        "1 conversion",
        "unsupported architecture 'gpt2'",
        "convert from-hf {bad}/gpt2 {tmp}/c",
    ),
    (
        "generate: not a checkpoint",
        "1 checkpoint",
        "neither an mmfm checkpoint",
        "generate {bad}/folder --prompt hi",
    ),
    ("generate: no prompt", "2 config", "needs --prompt", "generate {bad}/folder"),
    (
        "generate: missing prompts file",
        "1 data",
        "--prompts-file",
        "generate {bad}/folder --prompts-file {bad}/none.txt",
    ),
    (
        "generate: bad --top-p",
        "2 config",
        "top_p in (0, 1]",
        "generate {bad}/folder --prompt hi --top-p 3",
    ),
    (
        "generate: bad --device",
        "2 config",
        "'gpu9' is not a device",
        "generate {bad}/folder --prompt hi --device gpu9",
    ),
    (
        "eval: not a checkpoint",
        "1 checkpoint",
        "not an mmfm checkpoint",
        "eval {bad}/folder builtin:demo",
    ),
    (
        "eval: bad --steps",
        "2 config",
        "--steps must be >= 0",
        "eval {bad}/folder builtin:demo --steps -1",
    ),
    (
        "eval: --json is a folder",
        "2 config",
        "is a directory",
        "eval {bad}/folder builtin:demo --json {bad}/folder",
    ),
    (
        "eval: missing text file",
        "1 data",
        "held_out.txt: no such file",
        "eval {bad}/configured {bad}/held_out.txt",
    ),
    (
        "slurm submit: layout vs job",
        "2 config",
        "2 node(s) x 8 task(s) = 16",
        "slurm submit {demo} --nodes 2 --gpus-per-node 8 --dry-run",
    ),
    (
        "slurm submit: missing template",
        "1 data",
        "--template",
        "slurm submit {demo} --dry-run --template {bad}/none.sbatch",
    ),
    (
        "slurm prepare: bad --parts",
        "2 config",
        "--parts must be >= 1",
        "slurm prepare {bad}/prepare.yaml --parts 0 --dry-run",
    ),
    (
        "slurm prepare: missing recipe",
        "2 config",
        "does not exist",
        "slurm prepare {bad}/none.yaml --dry-run",
    ),
    (
        "slurm convert: bad --dtype",
        "2 config",
        "invalid choice: 'int4'",
        "slurm convert {bad}/folder {tmp}/hf --dtype int4 --dry-run",
    ),
]


@pytest.mark.parametrize(
    ("kind", "words", "command"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_and_its_exit_code(kind, words, command, bad, tmp_path, capsys):
    paths = {"bad": bad, "tmp": tmp_path, "demo": DEMO}
    code, area = kind.split()
    expect(capsys, int(code), area, words, *command.format(**paths).split())


def test_environment_problems_exit_3(tmp_path, capsys, monkeypatch):
    """No CUDA for train.device=cuda or --device cuda; srun tasks without MASTER_ADDR."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = f"train.run_dir={tmp_path / 'r'}"
    expect(capsys, 3, "environment", "no CUDA device", "train", DEMO, "train.device=cuda", run)
    generate = ["generate", tmp_path, "--prompt", "hi", "--device", "cuda"]
    expect(capsys, 3, "environment", "no CUDA device", *generate)
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    expect(capsys, 3, "environment", "MASTER_ADDR and MASTER_PORT are not", "train", DEMO, run)


@pytest.mark.parametrize(
    ("args", "code", "line"),
    [
        ([], 2, "mmfm: config error: mmfm: the following arguments are required: command"),
        (["config", "{bad}/broken.yaml"], 2, "mmfm: config error: cannot parse"),
    ],
)
def test_a_fresh_interpreter_prints_one_line(args, code, line, bad):
    cmd = [sys.executable, "-m", "mmfm", *(a.format(bad=bad) for a in args)]
    out = subprocess.run(cmd, cwd=bad, capture_output=True, text=True, timeout=120)
    assert out.returncode == code and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith(line), out.stderr


def test_every_error_area_has_its_exit_code_documented():
    """`mmfm --help` lists the codes; each error class's area is named on its code's line."""
    documented = {}
    for row in cli.EXIT_CODES.splitlines()[1:]:
        code, meaning = row.split(maxsplit=1)
        documented[int(code)] = meaning
    assert documented.keys() == {0, 1, 2, 3, 141}  # 141: the reader of stdout went first
    assert cli.EXIT_CODES in cli._parser().format_help()
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.MmfmError) and cls.area != "mmfm":
            assert re.search(rf"\b{cls.area}", documented[cls.exit_code]), cls
    page = (REPO / "docs" / "getting_started.md").read_text()  # its "Commands" table
    for code, area in [(1, "`checkpoint`"), (2, "`config`"), (3, "`environment`")]:
        assert re.search(rf"^\| {code} \|.*{area}.*\|$", page, re.M), code
