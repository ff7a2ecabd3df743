"""Explicit weight-name maps between mmfm and Hugging Face architectures.

No name is guessed: every mmfm parameter has exactly one Hugging Face name per supported
architecture, and every Hugging Face weight must be claimed by a rule (or be a buffer listed
as ignorable). RoPE needs no permutation: mmfm uses the `rotate_half` layout Hugging Face's
Llama code uses.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from mmfm.config.schema import ModelConfig
from mmfm.core.errors import ConfigError, ConversionError

# mmfm suffix inside layers.{i}. -> Hugging Face suffix inside model.layers.{i}.
_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_IGNORED = re.compile(r"(rotary_emb\.inv_freq)$")
_FROM_HF_LAYER = {v: k for k, v in _LAYER.items()}
_FROM_HF_TOP = {v: k for k, v in _TOP.items()}


def to_hf(name: str) -> str:
    """The Hugging Face name of mmfm parameter `name`."""
    if name in _TOP:
        return _TOP[name]
    match = _LAYER_NAME.match(name)
    if match and match.group(2) in _LAYER:
        return f"model.layers.{match.group(1)}.{_LAYER[match.group(2)]}"
    raise KeyError(f"no Hugging Face name for mmfm parameter {name!r}")


def from_hf(name: str) -> str | None:
    """The mmfm name of Hugging Face weight `name`; None for ignorable buffers."""
    if _HF_IGNORED.search(name):
        return None
    if name in _FROM_HF_TOP:
        return _FROM_HF_TOP[name]
    match = _HF_LAYER_NAME.match(name)
    if match and match.group(2) in _FROM_HF_LAYER:
        return f"layers.{match.group(1)}.{_FROM_HF_LAYER[match.group(2)]}"
    raise KeyError(f"Hugging Face weight {name!r} has no mmfm counterpart")


@dataclass(frozen=True)
class Architecture:
    model_type: str
    qkv_bias: bool | None
    """True/False: fixed by the architecture; None: read `attention_bias` (Llama)."""


ARCHITECTURES = {
    "llama": Architecture("llama", None),
    "mistral": Architecture("mistral", False),
    "qwen2": Architecture("qwen2", True),
}


_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_PLAIN_ROPE = (None, "default")
# Optional fields: (the test of a value, what it must be); absent or null: the default.
_POSITIVE_INT = (lambda v: type(v) is int and v > 0, "a positive integer")
_POSITIVE = (lambda v: type(v) in (int, float) and 0 < v < math.inf, "a positive number")
_BOOL = (lambda v: type(v) is bool, "true or false")
_OPTIONAL = {
    "num_key_value_heads": _POSITIVE_INT,
    "max_position_embeddings": _POSITIVE_INT,
    "head_dim": _POSITIVE_INT,
    "sliding_window": _POSITIVE_INT,
    "rms_norm_eps": _POSITIVE,
    "tie_word_embeddings": _BOOL,
    "use_sliding_window": _BOOL,
    "attention_bias": _BOOL,
    "mlp_bias": _BOOL,
    "hidden_act": (lambda v: type(v) is str, "a string"),
}


def _check_optional(hf: dict, source: str) -> None:
    for key, (ok, what) in _OPTIONAL.items():
        value = hf.get(key)
        if value is not None and not ok(value):
            raise ConversionError(
                f"{source}: {key} is {value!r}, not {what}: the config is damaged or hand-edited "
                "(save it again with transformers' save_pretrained)"
            )


def rope_of(hf: dict) -> tuple[object, float]:
    """(RoPE type, theta) of a config.json, read the way `transformers` 4.x and 5.x read it:
    `rope_scaling` wins over `rope_parameters`, the type is under `rope_type` or the older
    `type`, and `rope_theta` inside that dict wins over the top-level one."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        return f"{params!r} (not a mapping)", 0.0
    if any(isinstance(v, dict) for v in params.values()):
        return f"per layer type {params}", 0.0  # nested by layer type: nothing mmfm runs
    rope_type = params["rope_type"] if "rope_type" in params else params.get("type", "default")
    theta = params.get("rope_theta") or hf.get("rope_theta") or 10000.0
    return rope_type, theta


def model_config_from_hf(
    hf: dict, vocab_size: int | None = None, source: str = "config.json"
) -> ModelConfig:
    """mmfm's ModelConfig for a Hugging Face config.json; refuses what mmfm cannot run exactly.

    `source` names the file in the messages."""
    if not isinstance(hf, dict):
        raise ConversionError(f"{source} holds a JSON {type(hf).__name__}, not an object of fields")
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConversionError(
            f"unsupported architecture {model_type!r} ({source} model_type); mmfm imports "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    arch = ARCHITECTURES[model_type]
    bad = [k for k in _REQUIRED if type(hf.get(k)) is not int or hf[k] <= 0]
    if bad:
        raise ConversionError(
            f"{source} lacks a positive integer {', '.join(bad)}: not a complete "
            f"{model_type} config (save it again with transformers' save_pretrained)"
        )
    _check_optional(hf, source)
    heads, dim = hf["num_attention_heads"], hf["hidden_size"]

    def refuse(why: str) -> None:
        raise ConversionError(f"{source} ({model_type}): {why}; mmfm cannot reproduce it exactly")

    kv_heads = hf.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ConversionError(
            f"{source}: num_key_value_heads {kv_heads} does not divide num_attention_heads "
            f"{heads}: the config is damaged or belongs to another model"
        )
    if hf.get("head_dim") not in (None, dim // heads):
        refuse(f"head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads")
    rope_type, rope_theta = rope_of(hf)
    if rope_type not in _PLAIN_ROPE:
        refuse(f"RoPE type {rope_type!r} (rope_scaling / rope_parameters; mmfm has plain RoPE)")
    if type(rope_theta) not in (int, float) or not 0 < rope_theta < math.inf:
        refuse(f"rope_theta {rope_theta!r} is not a positive number")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act is {hf['hidden_act']}, not silu")
    if hf.get("mlp_bias"):
        refuse("the MLP has biases")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if window is not None and window < (hf.get("max_position_embeddings") or 0):
        refuse(f"sliding_window={window} is below max_position_embeddings (mmfm attends fully)")
    qkv_bias = arch.qkv_bias
    if qkv_bias is None:
        if hf.get("attention_bias"):
            refuse("attention_bias=True also puts a bias on o_proj")
        qkv_bias = False
    try:
        return ModelConfig(
            vocab_size=vocab_size or hf["vocab_size"],
            dim=dim,
            n_layers=hf["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=kv_heads,
            ffn_dim=hf["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps") or 1e-6),
            rope_theta=float(rope_theta),
            max_seq_len=hf.get("max_position_embeddings") or 4096,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
        )
    except ConfigError as e:  # the sizes do not make a model: name the file, not model.*
        raise ConversionError(f"{source} ({model_type}): {e}") from None
