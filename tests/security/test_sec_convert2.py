"""Conversions that trusted sizes and types they were given: a checkpoint's `.metadata`
claiming tensors larger than its `config.yaml` or its data files, a HF `config.json` whose
`vocab_size` is not its embedding's, fields of the wrong type, a damaged weights file.

Every case goes through `mmfm.cli.main` (or the function the command calls) and must end
with one `mmfm:` line naming the file and the field, exit 1, before anything is allocated
from the claim and without an output folder.
"""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from transformers import AutoModelForCausalLM, LlamaConfig

from mmfm.cli import main
from mmfm.core.errors import TokenizerError
from mmfm.testing import tiny_shape
from mmfm.tokenization.visual.weights import read_weights

from helpers import random_checkpoint

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_sec_convert2")

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=1)
SMALL |= dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
HUGE_ROWS = 10**9  # 64e9 parameters: allocating the claim would need 256 GB


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**SMALL)).save_pretrained(path)
    return path


@pytest.fixture
def hf(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "hf"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny mmfm checkpoint of 384 ids (1 layer)."""
    path = tmp_path_factory.mktemp("ckpt")
    return random_checkpoint(path, [*tiny_shape(n_layers=1), "model.vocab_size=384"])


def cli(capsys, *args) -> tuple[int, str]:
    """(exit code, the one `mmfm:` line) of `mmfm ARGS`; fails on a traceback or more lines."""
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mmfm:")]
    assert len(lines) == 1, err
    return stop.value.code, lines[0]


def edit_config(folder: Path, **fields) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | fields))


def claim(folder: Path, key: str, size: tuple[int, ...]) -> None:
    """Make `.metadata` claim `size` for tensor `key`, as one chunk from its first one's
    stored bytes: a lie the chunks agree with (so the checkpoint reader's coverage check
    passes and the conversion's own size checks are what refuse it)."""
    file = folder / ".metadata"
    metadata = pickle.loads(file.read_bytes())  # the test's own file
    entry = metadata.state_dict_metadata[key]
    entry.size = torch.Size(size)
    first = entry.chunks[0]
    assert not any(first.offsets), first
    entry.chunks = [ChunkStorageMetadata(first.offsets, torch.Size(size))]
    file.write_bytes(pickle.dumps(metadata))


# -- mmfm convert hf / megatron: sizes from .metadata -------------------------------------------


@pytest.mark.parametrize("command", ["hf", "megatron"])
@pytest.mark.parametrize("rows", [3840, HUGE_ROWS], ids=["ten_times", "huge"])
def test_export_checks_every_size_against_config_yaml(command, rows, ckpt, tmp_path, capsys):
    damaged = Path(shutil.copytree(ckpt, tmp_path / "ckpt"))
    claim(damaged, "model.tok_embeddings.weight", (rows, 64))
    code, line = cli(capsys, "convert", command, damaged, tmp_path / "out")
    assert code == 1 and line.startswith("mmfm: conversion error: "), line
    assert str(damaged / ".metadata") in line and "config.yaml" in line, line
    assert f"({rows}, 64)" in line and "(384, 64)" in line, line
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def megatron_ckpt(ckpt, tmp_path_factory) -> Path:
    """`ckpt` as a torch_dist checkpoint (written without megatron-core)."""
    out = tmp_path_factory.mktemp("meg") / "torch_dist"
    main(["convert", "megatron", str(ckpt), str(out)])
    return out


@pytest.mark.parametrize(
    "size", [(1, HUGE_ROWS, 64), (1, 2**40, 2**40)], ids=["huge", "overflowing"]
)
def test_from_megatron_refuses_sizes_its_files_do_not_hold(size, megatron_ckpt, tmp_path, capsys):
    damaged = Path(shutil.copytree(megatron_ckpt, tmp_path / "torch_dist"))
    claim(damaged, "decoder.layers.mlp.linear_fc1.weight", size)
    code, line = cli(capsys, "convert", "from-megatron", damaged, tmp_path / "out")
    assert code == 1 and line.startswith("mmfm: conversion error: "), line
    assert str(damaged / ".metadata") in line and "decoder.layers.mlp.linear_fc1.weight" in line
    assert "bytes" in line, line
    assert not (tmp_path / "out").exists()


# -- mmfm convert from-hf: config.json against the weights --------------------------------------


def test_vocab_size_must_equal_the_embedding_rows(hf, tmp_path, capsys):
    edit_config(hf, vocab_size=HUGE_ROWS)
    code, line = cli(capsys, "convert", "from-hf", hf, tmp_path / "out")
    assert code == 1 and line.startswith("mmfm: conversion error: "), line
    assert "model.embed_tokens.weight" in line and "256" in line and str(HUGE_ROWS) in line, line
    assert "vocab_size" in line and str(hf / "config.json") in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_key_value_heads", "1"),
        ("num_key_value_heads", 3),  # does not divide 4 heads
        ("rms_norm_eps", "abc"),
        ("rms_norm_eps", -1.0),
        ("max_position_embeddings", "128"),
        ("tie_word_embeddings", "no"),
        ("head_dim", "16"),
        ("sliding_window", "64"),
    ],
)
def test_config_fields_of_the_wrong_type_are_named(field, value, hf, tmp_path, capsys):
    edit_config(hf, **{field: value})
    code, line = cli(capsys, "convert", "from-hf", hf, tmp_path / "out")
    assert code == 1 and line.startswith("mmfm: conversion error: "), line
    assert str(hf / "config.json") in line and field in line, line
    assert not (tmp_path / "out").exists()


# -- visual tokenizer weights -------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage_header"])
def test_read_weights_of_a_damaged_safetensors_is_a_tokenizer_error(damage, saved, tmp_path):
    file = tmp_path / "weights.safetensors"
    data = (saved / "model.safetensors").read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x10" + data[1:])
    with pytest.raises(TokenizerError, match=r"weights\.safetensors: not a safetensors"):
        read_weights(file)
