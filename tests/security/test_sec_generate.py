"""`mmfm generate` and `mmfm eval` given options and inputs that sampled nonsense, filled
gigabytes or ended in a traceback: each is one `mmfm:` line with a documented exit code,
refused before the model samples or evaluates anything.

One untrained model on the base vocabulary (max_seq_len 128) serves every test.
"""

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

from mmfm.cli import main
from mmfm.data.demo import demo_documents
from mmfm.data.shards import write_shard
from mmfm.testing import tiny_shape
from mmfm.tokenization.vocab import Vocab

from helpers import random_checkpoint

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_sec_generate")

REPO = Path(__file__).resolve().parents[2]
BASE_VOCAB = REPO / "tokenizers/base/vocab.json"
MAX_SEQ_LEN = 128


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An untrained 1-layer model saved as a checkpoint with the base vocabulary."""
    path = tmp_path_factory.mktemp("gen") / "ckpt"
    size = -(-Vocab.load(BASE_VOCAB).size // 64) * 64
    overrides = [*tiny_shape(n_layers=1, seq_len=64, max_seq_len=MAX_SEQ_LEN)]
    overrides += [f"model.vocab_size={size}", f"data.vocab={BASE_VOCAB}"]
    return random_checkpoint(path, overrides, BASE_VOCAB)


def cli(capsys, *args) -> tuple[int, str]:
    """(exit code, the one `mmfm:` line) of `mmfm ARGS`; fails on a traceback or more lines."""
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mmfm:")]
    assert len(lines) == 1, err
    return stop.value.code, lines[0]


def generate(capsys, ckpt, tmp_path, *options) -> tuple[int, str]:
    out = tmp_path / "out"
    return cli(capsys, "generate", ckpt, "--prompt", "a cat", "--out", out, *options)


# -- mmfm generate: options -----------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [20_000_000, 10**9, MAX_SEQ_LEN])
def test_max_new_tokens_beyond_max_seq_len_is_refused(tokens, ckpt, tmp_path, capsys):
    code, line = generate(capsys, ckpt, tmp_path, "--max-new-tokens", tokens)
    assert code == 2 and line.startswith("mmfm: config error: "), line
    assert f"--max-new-tokens {tokens}" in line and f"max_seq_len {MAX_SEQ_LEN}" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option, value",
    [
        ("--temperature", "inf"),
        ("--temperature", "nan"),
        ("--cfg-scale", "nan"),
        ("--cfg-scale", "inf"),
        ("--top-p", "nan"),
        ("--seed", str(2**64)),
    ],
)
def test_non_finite_sampling_options_are_refused(option, value, ckpt, tmp_path, capsys):
    code, line = generate(capsys, ckpt, tmp_path, option, value)
    assert code == 2 and line.startswith("mmfm: config error: "), line
    assert option.removeprefix("--").replace("-", "_") in line and value in line, line


def test_a_non_utf8_prompt_is_refused(ckpt, tmp_path, capsys):
    prompt = b"a \xff cat".decode("utf-8", "surrogateescape")  # as Python passes such argv
    code, line = cli(capsys, "generate", ckpt, "--prompt", prompt, "--out", tmp_path / "out")
    assert code == 2 and line.startswith("mmfm: config error: "), line
    assert "--prompt" in line and "UTF-8" in line, line


@pytest.mark.parametrize("where", ["a_file", "inside_a_file"])
def test_out_that_is_no_folder_is_refused_before_sampling(where, ckpt, tmp_path, capsys):
    (tmp_path / "taken").write_text("keep me")
    out = tmp_path / "taken" if where == "a_file" else tmp_path / "taken" / "out"
    args = ["--prompt", "a cat", "--out", out, "--max-new-tokens", 8]
    code, line = cli(capsys, "generate", ckpt, *args)
    assert code == 2 and line.startswith("mmfm: config error: "), line
    assert f"--out {out}" in line, line
    assert (tmp_path / "taken").read_text() == "keep me"


# -- mmfm generate: a damaged Hugging Face folder ---------------------------------------------


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("file", ["config.json", "model.safetensors"])
def test_a_truncated_hf_folder_is_named(file, hf, tmp_path, capsys):
    folder = Path(shutil.copytree(hf, tmp_path / "hf"))
    data = (folder / file).read_bytes()
    (folder / file).write_bytes(data[: len(data) // 2])
    code, line = cli(capsys, "generate", folder, "--prompt", "a", "--out", tmp_path / "out")
    assert code == 1 and line.startswith("mmfm: conversion error: "), line
    assert str(folder / file) in line and "truncated or damaged" in line, line


def test_an_hf_vocab_size_beyond_its_embedding_is_refused_before_allocating(hf, tmp_path, capsys):
    folder = Path(shutil.copytree(hf, tmp_path / "hf"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"vocab_size": 10**9}))
    code, line = cli(capsys, "generate", folder, "--prompt", "a", "--out", tmp_path / "out")
    assert code == 1 and line.startswith("mmfm: conversion error: "), line
    assert str(folder / "config.json") in line and "vocab_size is 1000000000" in line, line


# -- mmfm eval ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """A folder of one shard whose manifest says another vocabulary made it."""
    folder = tmp_path_factory.mktemp("held_out")
    write_shard(folder / "shard-000000.tar", demo_documents(1)[:4])
    (folder / "manifest.json").write_text(json.dumps({"vocab_fingerprint": "0123456789abcdef"}))
    return folder


def test_eval_on_shards_of_another_vocabulary_is_refused(ckpt, held_out, capsys):
    code, line = cli(capsys, "eval", ckpt, held_out / "shard-000000.tar")
    assert code == 1 and line.startswith("mmfm: tokenizer error: "), line
    assert str(held_out / "manifest.json") in line and str(ckpt / "vocab.json") in line, line
    assert "0123456789abcdef" in line and Vocab.load(BASE_VOCAB).fingerprint in line, line


@pytest.mark.parametrize("where", ["inside_a_file", "missing_folder"])
def test_eval_json_that_cannot_be_written_is_refused_before_evaluating(
    where, ckpt, tmp_path, capsys, monkeypatch
):
    import mmfm.train.eval_command as eval_command

    def never(*args, **kwargs):
        raise AssertionError("evaluated before the output was checked")

    monkeypatch.setattr(eval_command, "build_step_runner", never)
    (tmp_path / "a_file").write_text("")
    parent = tmp_path / ("a_file" if where == "inside_a_file" else "no/such")
    out = parent / "eval.json"
    code, line = cli(capsys, "eval", ckpt, "builtin:demo", "--json", out)
    assert code == 2 and line.startswith("mmfm: config error: "), line
    assert f"--json {out}" in line, line
