"""Megatron-LM / megatron-core `GPTModel` checkpoints <-> mmfm.

megatron-core saves `torch_dist` checkpoints: `torch.distributed.checkpoint` (DCP) files of
*global* tensors (each tensor/pipeline-parallel rank writes its chunks; the layers of a block
are stacked on a leading axis, each pipeline stage writing its layers at their global offsets:
no renumbering), plus `metadata.json` and a pickled `common.pt`. So a TP/PP-sharded checkpoint
reads as whole tensors and a written one loads into any TP/PP layout through megatron-core's
own resharding; the per-layer layouts megatron-core also saves (`decoder.layers.{global id}.`,
the SwiGLU halves apart) are stacked first (`stack_layers`). The `.metadata` pickle is read by
mmfm's untrusting unpickler (mmfm.train.dcp_reader) extended by the four DCP planner
dataclasses megatron-core stores in it; `common.pt` and the `_extra_state` byte entries
(Transformer Engine fp8 metadata) are pickles and are never read. Only the model is converted:
the optimizer state, RNG states and iteration of a Megatron-LM checkpoint are skipped, and an
export has none (their layout depends on the distributed optimizer and the parallel layout).
The model's shape is not in the tensors alone (heads, RoPE base, epsilon): it comes from a
JSON/YAML file of Megatron-LM argument names (`--args`, or `megatron_args.json`,
which `mmfm convert megatron` writes next to the checkpoint). Every name is mapped explicitly:
the fused `linear_qkv` (per query group: its query heads, then one key, then one value head),
the fused `linear_fc1` (gate rows, then up rows), and the norms, which torch_dist checkpoints
of both layer specs store under Transformer Engine's names (`layer_norm_weight` folded into the
following linear). What mmfm cannot run exactly is refused, naming the argument or weight;
so is a tensor whose size in `.metadata` its data files do not hold, before it is allocated.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from mmfm.config import Config, DataConfig, ModelConfig, load_config, save_config
from mmfm.config.schema import SAMPLES_OFF
from mmfm.convert.hf import (
    DTYPES,
    _check_state,
    _model_entries,
    check_stored_sizes,
    refuse_mot,
)
from mmfm.core.errors import ConversionError
from mmfm.core.files import make_folder
from mmfm.train import dcp_reader
from mmfm.train.checkpoint import CONFIG_FILE, SafeFileSystemReader, load_tensors
from mmfm.train.dcp_reader import _single_process_quiet

log = logging.getLogger("mmfm")
MEGATRON_ARGS = "megatron_args.json"
TRACKER = "latest_checkpointed_iteration.txt"

# Top-level names (same in every spec and in torch_dist).
_TOP = {
    "embedding.word_embeddings.weight": "tok_embeddings.weight",
    "decoder.final_layernorm.weight": "norm.weight",
    "output_layer.weight": "output.weight",
}
# Inside `decoder.layers.` (stacked in torch_dist, `decoder.layers.{i}.` in a module state
# dict). The norms have a local-spec name and the Transformer Engine name that torch_dist uses
# for both specs; mmfm writes the latter.
_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "attention_norm.weight",
    "mlp.linear_fc1.layer_norm_weight": "ffn_norm.weight",
}
_LOCAL_NORMS = {
    "input_layernorm.weight": "attention_norm.weight",
    "pre_mlp_layernorm.weight": "ffn_norm.weight",
}
_PLAIN = {
    "self_attention.linear_proj.weight": "attention.wo.weight",
    "mlp.linear_fc2.weight": "feed_forward.w2.weight",
}
_QKV = {
    "self_attention.linear_qkv.weight": "weight",
    "self_attention.linear_qkv.bias": "bias",
}
_FC1 = "mlp.linear_fc1.weight"
_LAYER = re.compile(r"^decoder\.layers\.(?:(\d+)\.)?(.+)$")
# Transformer Engine / fp8 metadata: pickled bytes, never read. Written as a pickled [None]
# for the linears, as megatron-core's local spec does, so its loader finds every key it asks
# for.
_EXTRA_STATE = re.compile(r"\._extra_state(/shard_\d+_\d+)?$")
_EXTRA_STATE_OF = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
# Parts of a Megatron-LM checkpoint that are not the model.
_NOT_MODEL = re.compile(r"^(optimizer|rng_state|rerun_state_machine_state)")


# -- fused tensors -------------------------------------------------------------------------------


def split_qkv(fused: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """(q, k, v) of megatron-core's `linear_qkv` weight or bias: rows grouped per query group
    as [its n_heads / n_kv_heads query heads, one key head, one value head]."""
    groups, per_group, hd = cfg.num_kv_heads, cfg.n_heads // cfg.num_kv_heads, cfg.head_dim
    grouped = fused.reshape(groups, (per_group + 2) * hd, *fused.shape[1:])
    q, k, v = grouped.split([per_group * hd, hd, hd], dim=1)
    return tuple(t.reshape(-1, *fused.shape[1:]) for t in (q, k, v))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The inverse of `split_qkv`."""
    groups, rest = cfg.num_kv_heads, q.shape[1:]
    parts = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_fc1(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) of a SwiGLU `linear_fc1` weight: megatron-core's `glu` takes the first half
    of the output as the gate (`silu(gate) * up`); TP shards store each half's slice so the
    global tensor keeps this order."""
    gate, up = fused.chunk(2, dim=0)
    return gate, up


# -- names -----------------------------------------------------------------------------------


def from_megatron(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """mmfm's state dict of a megatron-core model state: a torch_dist checkpoint's stacked
    tensors, or a `GPTModel.state_dict()` (local or Transformer Engine spec names)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if _EXTRA_STATE.search(name) or _NOT_MODEL.match(name):
            continue
        if name in _TOP:
            out[_TOP[name]] = tensor
            continue
        match = _LAYER.match(name)
        if match is None:
            raise KeyError(name)
        index, suffix = match.groups()
        layers = [(int(index), tensor)] if index is not None else list(enumerate(tensor))
        for i, t in layers:
            out.update({f"layers.{i}.{k}": v for k, v in _layer_from_megatron(suffix, t, cfg)})
    tied_output = out.pop("output.weight", None) if cfg.tie_embeddings else None
    if tied_output is not None and not torch.equal(tied_output, out["tok_embeddings.weight"]):
        raise KeyError("output_layer.weight (differs from the embedding of a tied model)")
    return out


def _layer_from_megatron(suffix: str, t: torch.Tensor, cfg: ModelConfig):
    if suffix in _NORMS or suffix in _LOCAL_NORMS:
        return [(_NORMS.get(suffix) or _LOCAL_NORMS[suffix], t)]
    if suffix in _PLAIN:
        return [(_PLAIN[suffix], t)]
    if suffix in _QKV:
        kind = _QKV[suffix]
        names = [f"attention.{w}.{kind}" for w in ("wq", "wk", "wv")]
        return list(zip(names, split_qkv(t, cfg), strict=True))
    if suffix == _FC1:
        names = ["feed_forward.w1.weight", "feed_forward.w3.weight"]
        return list(zip(names, split_fc1(t), strict=True))
    raise KeyError(f"decoder.layers.{suffix}")


def to_megatron(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The torch_dist tensors (stacked layers, Transformer Engine names) of an mmfm state."""
    out = {meg: state[mine] for meg, mine in _TOP.items() if mine in state}
    layers = [f"layers.{i}." for i in range(cfg.n_layers)]

    def stack(fn) -> torch.Tensor:
        return torch.stack([fn(p) for p in layers])

    for meg, mine in {**_NORMS, **_PLAIN}.items():
        out[f"decoder.layers.{meg}"] = stack(lambda p, mine=mine: state[p + mine])
    kinds = ["weight", "bias"] if cfg.qkv_bias else ["weight"]
    for meg, kind in _QKV.items():
        if kind in kinds:
            out[f"decoder.layers.{meg}"] = stack(
                lambda p, kind=kind: fuse_qkv(
                    *(state[f"{p}attention.{w}.{kind}"] for w in ("wq", "wk", "wv")), cfg
                )
            )
    out[f"decoder.layers.{_FC1}"] = stack(
        lambda p: torch.cat([state[f"{p}feed_forward.{w}.weight"] for w in ("w1", "w3")])
    )
    return out


# -- the model's arguments -------------------------------------------------------------------

# Megatron-LM argument -> the value mmfm runs (what it means otherwise).
_REQUIRED_VALUES = {
    "normalization": ("RMSNorm", "LayerNorm instead of RMSNorm"),
    "swiglu": (True, "an MLP without SwiGLU"),
    "position_embedding_type": ("rope", "position embeddings other than RoPE"),
    "rotary_percent": (1.0, "RoPE on part of each head only"),
    "rotary_interleaved": (False, "interleaved RoPE pairs"),
    "use_rope_scaling": (False, "Llama-3.1 RoPE scaling"),
    "rotary_seq_len_interpolation_factor": (None, "RoPE position interpolation"),
    "add_bias_linear": (False, "biases on the linear layers"),
    "qk_layernorm": (False, "a norm on queries and keys"),
    "num_experts": (None, "a mixture of experts"),
    "apply_layernorm_1p": (False, "zero-centred (1 + weight) norms"),
    "multi_latent_attention": (False, "multi-latent attention"),
    "softmax_type": ("vanilla", "an attention sink / softmax offset"),
    "window_size": (None, "sliding-window attention"),
}
_REQUIRED = ("num_attention_heads",)


def read_args(file: Path) -> dict:
    """The Megatron-LM arguments in a JSON or YAML file (a mapping of argument names)."""
    if not file.is_file():
        raise ConversionError(f"{file}: no such file (the model's Megatron-LM arguments)")
    try:
        args = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConversionError(f"{file} is not JSON or YAML ({type(e).__name__})") from None
    if not isinstance(args, dict):
        raise ConversionError(f"{file} must be a mapping of Megatron-LM argument names")
    return {str(k).replace("-", "_").lstrip("_"): v for k, v in args.items()}


def model_config_from_megatron(args: dict, shapes: dict, source: str) -> ModelConfig:
    """mmfm's ModelConfig of a GPTModel: arguments from `args` (Megatron-LM names and
    defaults), sizes from the checkpoint's `shapes` (checked against `args` where given)."""
    missing = [k for k in _REQUIRED if not isinstance(args.get(k), int)]
    if missing:
        raise ConversionError(f"{source} lacks {', '.join(missing)}: give the model's arguments")
    for key, (wanted, meaning) in _REQUIRED_VALUES.items():
        default = {"normalization": "LayerNorm", "swiglu": False}.get(key, wanted)
        if args.get(key, default) != wanted:
            raise ConversionError(
                f"{source}: {key}={args.get(key, default)!r} ({meaning}); mmfm cannot reproduce "
                "it exactly"
            )
    layers, fc1 = shapes["decoder.layers.mlp.linear_fc1.weight"][:2]
    vocab, dim = shapes["embedding.word_embeddings.weight"]
    heads = args["num_attention_heads"]
    groups = args.get("num_query_groups") if args.get("group_query_attention") else heads
    groups = groups or heads
    qkv = shapes.get("decoder.layers.self_attention.linear_qkv.weight")
    if qkv is None or heads % groups or qkv[1] != (heads + 2 * groups) * (dim // heads):
        raise ConversionError(
            f"{source}: num_attention_heads={heads} with {groups} query groups does not match "
            f"the checkpoint's linear_qkv {qkv}: give the arguments it was trained with"
        )
    sizes = {"num_layers": layers, "hidden_size": dim, "ffn_hidden_size": fc1 // 2}
    sizes["kv_channels"] = dim // heads
    for key, have in sizes.items():
        if args.get(key) not in (None, have):
            raise ConversionError(
                f"{source}: {key}={args[key]} but the checkpoint's weights have {have}"
            )
    untied = args.get("untie_embeddings_and_output_weights", False)
    if untied != ("output_layer.weight" in shapes):
        have = "has" if "output_layer.weight" in shapes else "lacks"
        raise ConversionError(
            f"{source}: untie_embeddings_and_output_weights={untied} but the checkpoint {have} "
            "output_layer.weight"
        )
    return ModelConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=groups,
        ffn_dim=fc1 // 2,
        norm_eps=float(args.get("norm_epsilon", 1e-5)),
        rope_theta=float(args.get("rotary_base", 10000)),
        max_seq_len=int(args.get("max_position_embeddings") or 4096),
        tie_embeddings=not untied,
        qkv_bias=bool(args.get("add_qkv_bias", False)),
    )


def megatron_args(m: ModelConfig) -> dict:
    """The Megatron-LM arguments of an mmfm model (also what `model_config_from_megatron`
    reads back)."""
    return {
        "num_layers": m.n_layers,
        "hidden_size": m.dim,
        "ffn_hidden_size": m.hidden_dim,
        "num_attention_heads": m.n_heads,
        "group_query_attention": m.num_kv_heads != m.n_heads,
        "num_query_groups": m.num_kv_heads,
        "kv_channels": m.head_dim,
        "normalization": "RMSNorm",
        "norm_epsilon": m.norm_eps,
        "swiglu": True,
        "position_embedding_type": "rope",
        "rotary_base": m.rope_theta,
        "rotary_percent": 1.0,
        "max_position_embeddings": m.max_seq_len,
        "untie_embeddings_and_output_weights": not m.tie_embeddings,
        "add_bias_linear": False,
        "add_qkv_bias": m.qkv_bias,
        "padded_vocab_size": m.vocab_size,
    }


# -- reading a torch_dist checkpoint ---------------------------------------------------------


class _MegatronUnpickler(dcp_reader._MetadataUnpickler):
    """mmfm's untrusting `.metadata` unpickler plus the DCP planner dataclasses megatron-core's
    save planner keeps in the metadata (`all_local_plans`)."""

    extra: ClassVar[dict] = {
        (dcp_planner.__name__, c.__name__): c
        for c in (
            dcp_planner.SavePlan,
            dcp_planner.WriteItem,
            dcp_planner.WriteItemType,
            dcp_planner.TensorWriteData,
        )
    }


class MegatronReader(SafeFileSystemReader):
    """`SafeFileSystemReader` for torch_dist: byte entries (pickles) are listed, never read."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = getattr(self, "_checked_metadata", None)
        if metadata is None:
            path = Path(self.path)
            metadata = dcp_reader._unpickle_metadata(path / ".metadata", _MegatronUnpickler)
            tensors = {
                k: v
                for k, v in metadata.state_dict_metadata.items()
                if not isinstance(v, BytesStorageMetadata)
            }
            storage = {k: v for k, v in (metadata.storage_data or {}).items() if k.fqn in tensors}
            metadata = replace(metadata, state_dict_metadata=tensors, storage_data=storage)
            dcp_reader._check_storage(path, metadata)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            self._checked_metadata = metadata
        metadata.storage_meta.load_id = self.load_id
        return metadata


def resolve_checkpoint(path: Path) -> Path:
    """A torch_dist directory; a Megatron-LM save folder resolves to its latest iteration."""
    if (path / TRACKER).is_file():
        text = (path / TRACKER).read_text(encoding="utf-8").strip()
        if not text.isdigit():
            raise ConversionError(
                f"{path / TRACKER} holds {text!r}, not an iteration: give the iter_* folder"
            )
        path = path / f"iter_{int(text):07d}"
    if not (path / ".metadata").is_file():
        raise ConversionError(
            f"{path} is not a torch_dist checkpoint (no .metadata); save it with Megatron-LM's "
            "--ckpt-format torch_dist, or convert a legacy one with its checkpoint converter"
        )
    meta = path / "metadata.json"
    if meta.is_file():
        try:
            backend = json.loads(meta.read_text(encoding="utf-8")).get("sharded_backend")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise ConversionError(f"{meta} is not valid JSON: the checkpoint is damaged") from None
        if backend != "torch_dist":
            raise ConversionError(f"{meta}: sharded_backend {backend!r}; mmfm reads torch_dist")
    return path


def read_megatron(path: Path) -> dict[str, torch.Tensor]:
    """The whole (global) model tensors of a torch_dist checkpoint, in their stored dtypes."""
    reader = MegatronReader(path)
    metadata = reader.read_metadata()
    check_stored_sizes(metadata, path)
    shapes = {k: v for k, v in metadata.state_dict_metadata.items() if not _NOT_MODEL.match(k)}
    tensors = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in shapes.items()}
    load_tensors(tensors, reader, partial=True)
    return tensors


_PER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def stack_layers(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch_dist tensors with the layers stacked on a leading axis, as megatron-core stores
    them by default at any PP size (each stage writes its layers at their global offsets).
    Checkpoints saved with per-layer keys (`non_homogeneous_layers` or
    `singleton_local_shards`: `decoder.layers.{global id}.…`, the SwiGLU `linear_fc1` as
    `weight_w` / `weight_v`) are stacked here; a layer missing is refused."""
    out, layers = {}, {}
    for name, tensor in stored.items():
        match = _PER_LAYER.match(name)
        if match is None:
            out[name] = tensor
            continue
        index, suffix = int(match[1]), match[2]
        if suffix.endswith(("_w", "_v")) and suffix[:-2].endswith(".weight"):
            if suffix.endswith("_v"):  # joined to its `_w`
                continue
            suffix = suffix[:-2]
            up = stored.get(f"decoder.layers.{index}.{suffix}_v")
            if up is None:
                raise ConversionError(f"{name} has no {suffix}_v: the checkpoint is incomplete")
            tensor = torch.cat([tensor, up])  # gate rows, then up rows
        layers.setdefault(suffix, {})[index] = tensor
    for suffix, per_layer in layers.items():
        missing = sorted(set(range(max(per_layer) + 1)) - set(per_layer))
        if missing:
            raise ConversionError(
                f"decoder.layers.{missing[0]}.{suffix} is missing: the checkpoint lacks the "
                "layers of a pipeline stage (copy every stage's files into one folder)"
            )
        out[f"decoder.layers.{suffix}"] = torch.stack([per_layer[i] for i in sorted(per_layer)])
    return out


# -- the commands ----------------------------------------------------------------------------


def import_megatron(ckpt: str | Path, out: str | Path, args_file: str | Path | None = None) -> Path:
    """Write an mmfm checkpoint (model weights, config.yaml) from a torch_dist checkpoint."""
    path = resolve_checkpoint(Path(ckpt))
    args_path = Path(args_file) if args_file else path / MEGATRON_ARGS
    if not args_path.is_file() and args_file is None:
        raise ConversionError(
            f"{path} has no {MEGATRON_ARGS}: pass --args FILE, a JSON/YAML mapping of the "
            "model's Megatron-LM arguments (num_attention_heads, num_query_groups, rotary_base, "
            "norm_epsilon, ...); mmfm does not unpickle common.pt to find them"
        )
    args = read_args(args_path)
    stored = stack_layers(read_megatron(path))
    shapes = {k: tuple(v.shape) for k, v in stored.items()}
    for key in ("embedding.word_embeddings.weight", "decoder.layers.mlp.linear_fc1.weight"):
        if key not in shapes:
            raise ConversionError(f"{path} has no {key}: not a GPTModel checkpoint")
    cfg = model_config_from_megatron(args, shapes, str(args_path))
    state = _mmfm_state(stored, cfg, path)
    _check_state(state, cfg, path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _single_process_quiet():
        dcp.save({"model": state}, checkpoint_id=out)
    data = DataConfig(seq_len=min(2048, cfg.max_seq_len))
    save_config(Config(model=cfg, data=data), out / CONFIG_FILE)
    log.info("wrote %s: GPTModel of %d layers, %d ids", out, cfg.n_layers, cfg.vocab_size)
    return out


def _mmfm_state(stored: dict, cfg: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    for name, tensor in stored.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            bad = "not floating point" if not tensor.is_floating_point() else "NaN or Inf values"
            raise ConversionError(f"{path}: weight {name!r} has {bad}; refusing to import it")
    try:
        state = from_megatron(stored, cfg)
    except KeyError as e:
        raise ConversionError(
            f"{path}: weight {e.args[0]!r} has no place in mmfm's Llama-style model; this is "
            "another architecture or a modified checkpoint"
        ) from None
    return {name: t.float() for name, t in state.items()}


def export_megatron(ckpt: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Write checkpoint `ckpt` as a torch_dist checkpoint megatron-core loads into a GPTModel
    of any TP/PP layout (`dist_checkpointing.load`), with `megatron_args.json`."""
    ckpt, out = Path(ckpt), Path(out)
    if not (ckpt / CONFIG_FILE).is_file() or not (ckpt / ".metadata").is_file():
        raise ConversionError(f"{ckpt} is not an mmfm checkpoint (needs {CONFIG_FILE}, .metadata)")
    cfg = load_config(
        ckpt / CONFIG_FILE, [*SAMPLES_OFF, "parallel.tp=1", "parallel.pp=1", "parallel.cp=1"]
    )
    m = cfg.model
    refuse_mot(m, ckpt, "megatron-core's GPTModel")
    if m.neftune_alpha:
        log.info("model.neftune_alpha is a training option: Megatron has no such argument")
    entries = _model_entries(ckpt, m)
    tensors = {name: torch.empty(shape, dtype=dt) for name, (shape, dt) in entries.items()}
    load_tensors({"model": tensors}, SafeFileSystemReader(ckpt), partial=True)
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in to_megatron(tensors, m).items()}
    make_folder(out, str(out))
    for linear in _EXTRA_STATE_OF:
        for i in range(m.n_layers):
            # DCP pickles it: megatron-core's bytes of a list of the shards' objects.
            state[f"decoder.layers.{linear}._extra_state/shard_{i}_{m.n_layers}"] = [None]
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=out)
    torch.save({}, out / "common.pt")
    backend = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    backend |= {"common_backend": "torch", "common_backend_version": 1}
    (out / "metadata.json").write_text(json.dumps(backend))
    (out / MEGATRON_ARGS).write_text(json.dumps(megatron_args(m), indent=1))
    log.info("wrote %s: torch_dist, %d layers, %s", out, m.n_layers, dtype)
    return out
