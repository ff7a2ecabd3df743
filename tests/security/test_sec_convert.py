"""Damaged and unreproducible Hugging Face folders, and malformed overrides, as a user meets them.

Every case goes through `mmfm.cli.main` the way `mmfm convert from-hf` runs it and must end
with one `mmfm:` line on stderr naming the file and what is wrong, a documented exit code
(1: conversion error, for anything wrong with the folder; 2: config error, for a malformed
override) and no checkpoint written. The folders are real
`transformers` Llama models saved with `save_pretrained`, then edited.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from mmfm.cli import main
from mmfm.convert.hf import import_hf
from mmfm.train.checkpoint import load_checkpoint_model

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_sec_convert")

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2)
SMALL |= dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(path)
    return path


@pytest.fixture
def hf(saved, tmp_path) -> Path:
    """A fresh copy of the saved tiny Llama, to damage."""
    return Path(shutil.copytree(saved, tmp_path / "hf"))


def edit_config(folder: Path, **fields) -> None:
    """Set (or, with value None, remove) config.json fields."""
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in fields.items():
        cfg.pop(key, None) if value is None else cfg.__setitem__(key, value)
    (folder / "config.json").write_text(json.dumps(cfg))


def cli(capsys, *args: str) -> tuple[int, str]:
    """(exit code, the one `mmfm:` line) of `mmfm ARGS`; fails on a traceback or more lines."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mmfm:")]
    assert len(lines) == (code != 0), err
    return code, lines[0] if lines else ""


def convert(capsys, folder: Path, out: Path) -> tuple[int, str]:
    code, line = cli(capsys, "convert", "from-hf", str(folder), str(out))
    if code:
        assert not out.exists(), "a refused import must not leave a checkpoint"
    return code, line


# -- RoPE: every spelling transformers reads ------------------------------------------------------

YARN = {"factor": 2.0, "original_max_position_embeddings": 64}
SCALED = {
    "rope_scaling type=yarn": ("rope_scaling", {"type": "yarn", **YARN}, "yarn"),
    "rope_scaling rope_type=linear": (
        "rope_scaling",
        {"rope_type": "linear", "factor": 2.0},
        "linear",
    ),
    "rope_parameters type=yarn": ("rope_parameters", {"type": "yarn", **YARN}, "yarn"),
    "rope_parameters rope_type=dynamic": (
        "rope_parameters",
        {"rope_type": "dynamic", "factor": 2.0},
        "dynamic",
    ),
    "rope_parameters rope_type=llama3": (
        "rope_parameters",
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "llama3",
    ),
}


@pytest.mark.parametrize("case", list(SCALED))
def test_scaled_rope_is_refused_in_every_spelling(case, hf, tmp_path, capsys):
    field, value, rope_type = SCALED[case]
    edit_config(hf, **{"rope_scaling": None, "rope_parameters": None, field: value})
    # transformers itself reads this config as scaled RoPE: importing it as plain is wrong.
    assert AutoConfig.from_pretrained(hf).rope_parameters["rope_type"] == rope_type
    code, line = convert(capsys, hf, tmp_path / "out")
    assert code == 1 and line.startswith("mmfm: conversion error: "), line
    assert str(hf / "config.json") in line and repr(rope_type) in line, line


PLAIN = {
    "rope_parameters rope_type=default": {
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}
    },
    "rope_parameters type=default": {"rope_parameters": {"type": "default", "rope_theta": 5e5}},
    "rope_scaling type=default, top-level theta": {
        "rope_parameters": None,
        "rope_scaling": {"type": "default"},
        "rope_theta": 5e5,
    },
    "rope_parameters rope_type=null": {"rope_parameters": {"rope_type": None, "rope_theta": 5e5}},
}


@pytest.mark.parametrize("case", list(PLAIN))
def test_plain_rope_spellings_import_with_transformers_logits(case, hf, saved, tmp_path):
    edit_config(hf, **PLAIN[case])
    read = AutoConfig.from_pretrained(hf).rope_parameters  # how transformers reads it
    assert read["rope_type"] in ("default", None) and read["rope_theta"] == 5e5
    reference = Path(shutil.copytree(saved, tmp_path / "reference"))
    edit_config(reference, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    import_hf(hf, tmp_path / "ckpt")
    model, cfg = load_checkpoint_model(tmp_path / "ckpt")
    assert cfg.model.rope_theta == 5e5
    x = torch.randint(0, 300, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = model(x, torch.arange(100)[None], torch.zeros_like(x))
        theirs = AutoModelForCausalLM.from_pretrained(reference).eval()(x).logits
    assert (mine - theirs).abs().max() <= 1e-4


# -- weights --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight_is_refused_by_name(value, hf, tmp_path, capsys):
    weights = load_file(str(hf / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"][3, 7] = value
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    code, line = convert(capsys, hf, tmp_path / "out")
    assert code == 1
    assert "model.layers.1.mlp.down_proj.weight" in line and "NaN or Inf" in line, line


def test_unknown_extra_weight_is_named(hf, tmp_path, capsys):
    weights = load_file(str(hf / "model.safetensors"))
    weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    code, line = convert(capsys, hf, tmp_path / "out")
    assert code == 1
    assert "model.safetensors" in line and "q_norm" in line and "no place in mmfm" in line


@pytest.mark.parametrize("keep", [0.5, 0.999, 20 / 1e9], ids=["half", "last_byte", "header"])
def test_truncated_safetensors_is_named(keep, hf, tmp_path, capsys):
    file = hf / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: max(4, int(len(data) * keep))])
    code, line = convert(capsys, hf, tmp_path / "out")
    assert code == 1
    assert str(file) in line and "truncated or damaged" in line, line


# -- config.json ----------------------------------------------------------------------------------


def test_truncated_config_json_is_named(hf, tmp_path, capsys):
    text = (hf / "config.json").read_text()
    (hf / "config.json").write_text(text[: len(text) // 2])
    code, line = convert(capsys, hf, tmp_path / "out")
    assert code == 1
    assert str(hf / "config.json") in line and "not valid JSON" in line, line


def test_config_json_list_is_named(hf, tmp_path, capsys):
    (hf / "config.json").write_text(json.dumps([SMALL]))
    code, line = convert(capsys, hf, tmp_path / "out")
    assert code == 1 and line.startswith("mmfm: conversion error: "), line
    assert str(hf / "config.json") in line and "JSON list" in line, line


@pytest.mark.parametrize("damage", [None, "4", 0], ids=["missing", "string", "zero"])
def test_config_json_without_heads_is_named(damage, hf, tmp_path, capsys):
    edit_config(hf, num_attention_heads=damage)
    code, line = convert(capsys, hf, tmp_path / "out")
    assert code == 1 and line.startswith("mmfm: conversion error: "), line
    assert str(hf / "config.json") in line and "num_attention_heads" in line, line


# -- dotted overrides -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override", ["data.paths=[a,b", "data.paths={a: 1", 'data.paths="a', "model.dim=${foo"]
)
def test_malformed_override_is_one_config_error(override, capsys):
    code, line = cli(capsys, "config", str(REPO / "launch/demo.yaml"), override)
    assert code == 2 and line.startswith("mmfm: config error: "), line
    assert f"override {override!r}" in line and "close every bracket" in line, line
