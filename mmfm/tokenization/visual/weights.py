"""Loading visual-tokenizer weights from a published-style checkpoint through an explicit key map.

Published checkpoints of SEED, TiTok and LWM's VQGAN do not fit mmfm's small architectures
(docs/visual_tokenizer_weights.md lists their layouts and exactly where they differ), and they
cannot be downloaded here. What this module loads:

- `mmfm`: mmfm's own exported layout (`model.state_dict()` names), for all three kinds.
- `titok`: the SEED-style image tokenizer with TiTok's names (bytedance/1d-tokenizer) for the
  parts that correspond one to one: `latent_tokens` (the learned queries), the patch embedding
  (TiTok's Conv2d `encoder.patch_embed`, mmfm's Linear on flattened patches: same numbers,
  reshaped), the pre-norm encoder blocks (`encoder.transformer.{i}.ln_1/attn/ln_2/mlp`) and the
  codebook (`quantize.embedding.weight`). Every other mmfm part keeps its mmfm name. A real
  TiTok checkpoint is refused at its first key with no counterpart (`encoder.class_embedding`).

Every key of the file goes through the table; nothing is guessed from patterns. Files are
read with safetensors or `torch.load(weights_only=True)`, so no pickled code ever runs.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from mmfm.core.errors import TokenizerError

LAYOUTS = ("mmfm", "titok")

# mmfm's encoder layer (nn.TransformerEncoderLayer, norm_first) -> TiTok's ResidualAttentionBlock
_TITOK_BLOCK = {
    "norm1.weight": "ln_1.weight",
    "norm1.bias": "ln_1.bias",
    "self_attn.in_proj_weight": "attn.in_proj_weight",
    "self_attn.in_proj_bias": "attn.in_proj_bias",
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "norm2.weight": "ln_2.weight",
    "norm2.bias": "ln_2.bias",
    "linear1.weight": "mlp.c_fc.weight",
    "linear1.bias": "mlp.c_fc.bias",
    "linear2.weight": "mlp.c_proj.weight",
    "linear2.bias": "mlp.c_proj.bias",
}
# SeedImageTokenizer's own parameters -> TiTok's names
_TITOK_SEED = {
    "queries": "latent_tokens",
    "patch_embed.weight": "encoder.patch_embed.weight",
    "patch_embed.bias": "encoder.patch_embed.bias",
    "quantizer.codebook": "quantize.embedding.weight",
}


class _Entry:
    """One mmfm tensor: its published name and how its numbers are laid out there."""

    def __init__(self, mmfm: str, to_published: Callable, to_mmfm: Callable):
        self.mmfm, self.to_published, self.to_mmfm = mmfm, to_published, to_mmfm


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _patch_conv(patch: int) -> tuple[Callable, Callable]:
    """Linear over (c, ph, pw)-flattened patches == Conv2d(kernel = stride = patch)."""
    return (lambda t: t.reshape(len(t), 3, patch, patch), lambda t: t.reshape(len(t), -1))


def key_map(layout: str, model: nn.Module) -> dict[str, _Entry]:
    """Published name -> entry, for every tensor of `model.state_dict()`."""
    if layout not in LAYOUTS:
        raise TokenizerError(f"weights layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    names = list(model.state_dict())
    if layout == "mmfm":
        return {n: _Entry(n, _same, _same) for n in names}
    if getattr(model, "kind", None) != "seed_image":
        raise TokenizerError(
            f"weights layout 'titok' maps the seed_image tokenizer only, not "
            f"{getattr(model, 'kind', type(model).__name__)}: use layout 'mmfm'"
        )
    if model.cfg.frontend != "patches":
        raise TokenizerError(
            f"weights layout 'titok' maps the patch frontend only (TiTok's ViT), not frontend "
            f"{model.cfg.frontend!r}: use layout 'mmfm' or a model with frontend: patches"
        )
    table = dict(_TITOK_SEED)
    for i in range(model.cfg.encoder_layers):
        for part, published in _TITOK_BLOCK.items():
            table[f"encoder.layers.{i}.{part}"] = f"encoder.transformer.{i}.{published}"
    conv = _patch_conv(model.cfg.patch)
    out = {}
    for n in names:
        fns = conv if n == "patch_embed.weight" else (_same, _same)
        out[table.get(n, n)] = _Entry(n, *fns)
    return out


def export_published(model: nn.Module, layout: str) -> dict[str, torch.Tensor]:
    """`model`'s weights under `layout`'s names (what `load_published` reads back)."""
    state = model.state_dict()
    return {
        name: e.to_published(state[e.mmfm]).contiguous()
        for name, e in key_map(layout, model).items()
    }


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from safetensors or a weights-only torch file."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TokenizerError(
            f"{path}: not a safetensors or weights-only torch file (it pickles objects other "
            f"than tensors, which could run code): convert it to safetensors where it was made"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, SafetensorError) as e:
        raise TokenizerError(
            f"{path}: not a safetensors or weights-only torch file ({type(e).__name__}): "
            f"save a flat dict of tensors with safetensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TokenizerError(f"{path}: holds no flat name -> tensor dict; save a state_dict")
    return state


def load_published(layout: str, path: str | Path, model: nn.Module) -> nn.Module:
    """Load `path` (in `layout`'s names) into `model`, refusing the first key that does not fit.

    Refused, each with the key named: a key of the file the table does not map, a key the
    table expects that the file lacks, and a tensor whose shape differs from the model's."""
    state = read_weights(path)
    table = key_map(layout, model)
    for name in state:
        if name not in table:
            raise TokenizerError(
                f"{path}: key {name!r} has no counterpart in mmfm's {model.kind} tokenizer "
                f"(layout {layout}); docs/visual_tokenizer_weights.md lists the map"
            )
    for name in table:
        if name not in state:
            raise TokenizerError(f"{path}: key {name!r} is missing (layout {layout})")
    own = model.state_dict()
    loaded = {}
    for name, e in table.items():
        want = tuple(e.to_published(own[e.mmfm]).shape)
        if tuple(state[name].shape) != want:
            raise TokenizerError(
                f"{path}: key {name!r} has shape {tuple(state[name].shape)}, the model's "
                f"{e.mmfm} needs {want}: the checkpoint's config differs from the model's"
            )
        loaded[e.mmfm] = e.to_mmfm(state[name]).to(own[e.mmfm].dtype)
    model.load_state_dict(loaded, strict=True)
    return model
