"""A model to sample, in one process: from an mmfm checkpoint (any training layout, read with
DCP) or from a Hugging Face folder written by `mmfm convert hf` (its safetensors mapped back
through the explicit key map of `mmfm.convert.keymaps`), on CPU or CUDA, in fp32 or bf16."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mmfm.config.schema import ModelConfig
from mmfm.convert.hf import (
    DTYPES,
    MMFM_VOCAB,
    _check_state,
    _check_vocab_rows,
    _hf_weights,
    _read_hf_config,
)
from mmfm.convert.keymaps import from_hf, model_config_from_hf
from mmfm.core.errors import ConversionError
from mmfm.decoding.layout import Layout, demo_layout
from mmfm.model import Transformer, build_model
from mmfm.tokenization.visual.framing import RowFraming
from mmfm.tokenization.vocab import VOCAB_FILE, Vocab
from mmfm.train.checkpoint import CONFIG_FILE, CheckpointError, load_checkpoint_model


@dataclass
class Loaded:
    model: Transformer
    vocab: Vocab | None
    """The unified vocabulary saved with the model (None for the demo corpus)."""
    demo: bool
    """Trained on `builtin:demo`: the demo's own layout (mmfm.data.demo)."""

    def layout(
        self,
        tokens_per_item: dict[str, int] | None = None,
        num_codes: dict[str, int] | None = None,
        image_framing: RowFraming | None = None,
    ) -> Layout:
        if self.vocab is not None:
            return Layout.from_vocab(self.vocab, tokens_per_item, num_codes, image_framing)
        if self.demo:
            return demo_layout()
        raise CheckpointError(
            f"the model has no {VOCAB_FILE} (data.vocab was not set when it was trained), so "
            "prompts cannot be encoded: train with data.vocab=<tokenizers>/vocab.json"
        )


def load_model(path: str | Path, device: str = "cpu", dtype: str = "fp32") -> Loaded:
    """The model at `path` (a checkpoint directory or an exported HF folder), in eval mode."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        model, cfg = load_checkpoint_model(path, device)
        vocab_file = path / VOCAB_FILE
        demo = vocab_file.is_file() is False and list(cfg.data.paths) == ["builtin:demo"]
    elif (path / "config.json").is_file():
        model, vocab_file, demo = _load_hf(path, device), path / MMFM_VOCAB, False
    else:
        raise CheckpointError(
            f"{path} is neither an mmfm checkpoint ({CONFIG_FILE}) nor a Hugging Face folder "
            "(config.json): give a checkpoint directory such as runs/x/checkpoints/step_100"
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    model = model.to(DTYPES[dtype]).eval()
    vocab = Vocab.load(vocab_file) if vocab_file.is_file() else None
    return Loaded(model, vocab, demo)


def _load_hf(folder: Path, device: str) -> Transformer:
    """A HF folder read as `mmfm convert from-hf` reads it: a damaged config.json or
    safetensors file is one error naming it."""
    config = _read_hf_config(folder)
    cfg: ModelConfig = model_config_from_hf(config, source=str(folder / "config.json"))
    state = {}
    for file, name, tensor in _hf_weights(folder):
        try:
            mmfm_name = from_hf(name)
        except KeyError:
            raise ConversionError(f"{file}: weight {name!r} has no place in mmfm's model") from None
        if mmfm_name is not None:
            state[mmfm_name] = tensor.float()
    if cfg.tie_embeddings:
        state.pop("output.weight", None)
    _check_vocab_rows(state, cfg.vocab_size, folder / "config.json")
    _check_state(state, cfg, folder)  # before the model of the config's sizes is allocated
    model = build_model(cfg, device)
    model.to_empty(device=device)
    with torch.no_grad():
        model.load_state_dict(state)
    return model
