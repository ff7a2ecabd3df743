"""`mmfm tokenizer train | encode | decode`, and the committed base tokenizer set."""

import subprocess
import sys
from pathlib import Path

import pytest

from mmfm.cli import main
from mmfm.core.types import TextRecord
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.tokenizers import Tokenizers

REPO = Path(__file__).resolve().parents[2]


def mmfm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmfm", *args], cwd=REPO, capture_output=True, text=True
    )


def test_committed_base_tokenizers_match_their_recipe():
    recipe = load_recipe(REPO / "tokenizers/base.yaml", [f"output_dir={REPO}/tokenizers/base"])
    tok = Tokenizers.load(recipe)
    assert tok.vocab.text_size == 8000
    assert tok.vocab.codebook("dna").size == 5**6 + sum(5**j for j in range(1, 6))
    doc = tok.encode(TextRecord("t", "In the beginning"))
    assert tok.decode(doc.tokens) == [("text", "In the beginning")]


@pytest.mark.slow  # trains a tokenizer through three CLI processes: 49 s on 2 loaded cores
def test_train_encode_decode_commands(tmp_path):
    out = tmp_path / "tok"
    trained = mmfm(
        "tokenizer", "train", "tokenizers/base.yaml", f"output_dir={out}",
        "text.corpus=[builtin:python-stdlib]", "text.vocab_size=1000", "text.max_corpus_mb=2",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert (out / "vocab.json").is_file() and (out / "text.model").is_file()

    svg = tmp_path / "dot.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg"><circle r="1.5"/></svg>')
    shown = mmfm("tokenizer", "encode", "tokenizers/base.yaml", str(svg), "--show", "3")
    assert shown.returncode == 0, shown.stderr
    assert "(text 1, svg" in shown.stdout and "'<svg>'" in shown.stdout

    tok = Tokenizers.load(
        load_recipe(REPO / "tokenizers/base.yaml", [f"output_dir={REPO}/tokenizers/base"])
    )
    ids = " ".join(str(int(t)) for t in tok.encode(TextRecord("t", "hello 世界")).tokens)
    decoded = subprocess.run(
        [sys.executable, "-m", "mmfm", "tokenizer", "decode", "tokenizers/base.yaml"],
        cwd=REPO, input=ids, capture_output=True, text=True,
    )  # fmt: skip
    assert decoded.stdout == "[text]\nhello 世界\n", decoded.stderr


def test_missing_tokenizers_say_how_to_make_them(tmp_path, capsys):
    # in this process (the `mmfm` entry point's exit codes: test_config.py, the slow test above)
    with pytest.raises(SystemExit) as exited:
        main(["tokenizer", "encode", str(tmp_path / "none.yaml"), "x.txt"])
    assert exited.value.code == 2 and "does not exist" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'empty'}\n")
    with pytest.raises(SystemExit) as exited:
        main(["tokenizer", "encode", str(recipe), str(recipe)])
    assert exited.value.code == 1 and "run mmfm tokenizer train" in capsys.readouterr().err
