"""Hugging Face export and import.

Export (`mmfm convert hf`): any mmfm checkpoint (any parallel layout) -> a Llama folder that
`transformers` loads: config.json, generation_config.json, safetensors shards (+ index), the
tokenizer with every modality token, and the mmfm vocabulary; config.json's
`mmfm_visual_tokenizers` names the published image / video tokenizers of its codes (library,
class, path, prefix, their id range). Weights stream shard by shard
straight out of the DCP files, so memory stays near one output shard.

Import (`mmfm convert from-hf`): a Llama, Mistral or Qwen2 folder (safetensors, or .bin read
with `weights_only=True`) -> an mmfm checkpoint for `train.init_from`, optionally with the
vocabulary grown by the modality tokens (`--extend-vocab`, a recipe whose `text.pretrained` is
the model's own tokenizer): each new embedding (and output) row is the mean of the existing
rows plus Gaussian noise of 1% of their standard deviation, seeded, so new tokens start near
the "average token" without being identical. What mmfm cannot reproduce
exactly (scaled RoPE in any spelling transformers reads, a weight with no mmfm counterpart,
NaN/Inf values) and damaged files (truncated JSON or safetensors) are refused in one message
naming the file, before anything is written. No size is taken on trust: an export checks
every weight `.metadata` lists against the model of `config.yaml` and the bytes its data
files hold before allocating it; an import checks the types of `config.json`'s fields and
that its `vocab_size` is the embedding's rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from mmfm.config import Config, DataConfig, ModelConfig, load_config, save_config
from mmfm.config.schema import SAMPLES_OFF
from mmfm.convert.hf_tokenizer import save_hf_tokenizer
from mmfm.convert.keymaps import from_hf, model_config_from_hf, to_hf
from mmfm.core.errors import ConfigError, ConversionError
from mmfm.core.files import make_folder
from mmfm.model import build_model
from mmfm.tokenization.dna import DnaTokenizer
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.text import load_pretrained, text_of_vocab
from mmfm.tokenization.tokenizers import build_vocab
from mmfm.tokenization.vocab import (
    VOCAB_FILE,
    Vocab,
    VocabError,
)
from mmfm.train.checkpoint import (
    CONFIG_FILE,
    SafeFileSystemReader,
    _single_process_quiet,
    load_tensors,
)

log = logging.getLogger("mmfm")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MMFM_VOCAB = "mmfm_vocab.json"
VISUAL_TOKENIZERS = "mmfm_visual_tokenizers"
"""The key of config.json that names the export's published visual tokenizers."""


def _parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    number, factor = text, 1
    for unit, size in units.items():
        if text.upper().endswith(unit):
            number, factor = text[: -len(unit)], size
    try:
        size = int(float(number) * factor)
    except (ValueError, OverflowError):
        size = 0
    if size <= 0:
        raise ConfigError(f"--max-shard-size {text!r} is not a size such as 500MB or 2GB")
    return size


# -- export -------------------------------------------------------------------------------------


def _model_entries(ckpt: Path, m: ModelConfig) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name -> (shape, dtype) of the model weights stored in a DCP checkpoint, each checked
    against the model of its `config.yaml` (`m`) and against the bytes its data files hold,
    before anything of the size the `.metadata` claims is allocated."""
    metadata = SafeFileSystemReader(ckpt).read_metadata()
    entries = {
        key[len("model.") :]: (item.size, item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith("model.")
    }
    model = build_model(m)  # on the meta device: shapes only
    expected = {name: t.shape for name, t in model.state_dict().items()}  # tied: both names
    missing = [name for name, _ in model.named_parameters() if name not in entries]
    for name, (shape, _) in entries.items():
        if name not in expected or shape != expected[name]:
            want = f"{tuple(expected[name])}" if name in expected else "no such weight"
            raise ConversionError(
                f"{ckpt / '.metadata'}: model.{name} has shape {tuple(shape)}, but the model "
                f"of {ckpt / CONFIG_FILE} has {want}: the checkpoint is damaged or its "
                f"{CONFIG_FILE} belongs to another model"
            )
    if missing:
        raise ConversionError(
            f"{ckpt / '.metadata'} lacks weights of the model in {ckpt / CONFIG_FILE}: "
            f"{missing[:5]} ({len(missing)} in all); the checkpoint is incomplete"
        )
    check_stored_sizes(metadata, ckpt)
    return entries


def check_stored_sizes(metadata: Metadata, path: Path) -> None:
    """Refuse a tensor whose size in `.metadata` its chunks and data files do not hold (a
    damaged or crafted claim), before a tensor of that size is allocated to read it into."""
    stored: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        stored[index.fqn] = stored.get(index.fqn, 0) + info.length
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            continue
        itemsize = item.properties.dtype.itemsize
        claimed = math.prod(item.size) * itemsize
        chunks = sum(math.prod(chunk.sizes) for chunk in item.chunks) * itemsize
        held = min(chunks, stored.get(key, 0))
        if claimed > held:
            raise ConversionError(
                f"{path / '.metadata'}: {key} claims shape {tuple(item.size)} "
                f"({claimed} bytes), but its chunks and data files hold {held} bytes: the "
                "checkpoint is damaged; copy it again or use another one"
            )


def _shards(entries: dict, dtype: torch.dtype, max_bytes: int) -> Iterator[list[str]]:
    shard, size = [], 0
    for name, (shape, _) in entries.items():
        nbytes = shape.numel() * dtype.itemsize
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = [], 0
        shard.append(name)
        size += nbytes
    if shard:
        yield shard


def export_hf(
    ckpt: str | Path,
    out: str | Path,
    dtype: str = "bf16",
    max_shard: str = "2GB",
    arch: str = "auto",
) -> Path:
    """Write the Hugging Face folder of checkpoint `ckpt` to `out`.

    `arch`: llama, mistral or qwen2; auto is qwen2 for a model with q/k/v biases (Qwen2 is
    Llama plus exactly those), llama otherwise.
    """
    shard_size = _parse_size(max_shard)  # a bad option is refused before anything is read
    ckpt, out = Path(ckpt), Path(out)
    if not (ckpt / CONFIG_FILE).is_file() or not (ckpt / ".metadata").is_file():
        raise ConversionError(f"{ckpt} is not an mmfm checkpoint (needs {CONFIG_FILE}, .metadata)")
    from transformers import GenerationConfig

    cfg = load_config(
        ckpt / CONFIG_FILE, [*SAMPLES_OFF, "parallel.tp=1", "parallel.pp=1", "parallel.cp=1"]
    )
    m, torch_dtype = cfg.model, DTYPES[dtype]
    refuse_mot(m, ckpt, "transformers")
    arch = ("qwen2" if m.qkv_bias else "llama") if arch == "auto" else arch
    _config_class(arch, m)  # refuse an impossible architecture before writing anything
    entries = _model_entries(ckpt, m)
    vocab = Vocab.load(ckpt / VOCAB_FILE) if (ckpt / VOCAB_FILE).is_file() else None
    if vocab is not None and vocab.size > m.vocab_size:
        raise ConversionError(
            f"{ckpt / VOCAB_FILE} has {vocab.size} ids, the model's embedding only "
            f"{m.vocab_size}: the vocabulary does not fit this model"
        )
    make_folder(out, str(out))

    shards = list(_shards(entries, torch_dtype, shard_size))
    weight_map, total = {}, 0
    for index, names in enumerate(shards):
        file = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = {name: torch.empty(entries[name][0], dtype=entries[name][1]) for name in names}
        load_tensors({"model": tensors}, SafeFileSystemReader(ckpt), partial=True)
        hf = {to_hf(name): t.to(torch_dtype).contiguous() for name, t in tensors.items()}
        if m.qkv_bias and arch == "llama":  # Llama's attention_bias also biases o_proj: zeros
            for name in list(hf):
                if name.endswith("q_proj.bias"):
                    hf[name.replace("q_proj", "o_proj")] = torch.zeros(m.dim, dtype=torch_dtype)
        save_file(hf, str(out / file), metadata={"format": "pt"})
        honour_umask(out / file)
        weight_map.update(dict.fromkeys(hf, file))
        total += sum(t.numel() * t.element_size() for t in hf.values())
        del tensors, hf
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))

    special = _special_ids(vocab) if vocab is not None else {}
    visual = _visual_tokenizers(vocab) if vocab is not None else {}
    extra = {VISUAL_TOKENIZERS: visual} if visual else {}
    hf_config(m, arch, dtype_name(torch_dtype), **special, **extra).save_pretrained(str(out))
    GenerationConfig(**special).save_pretrained(str(out))
    if vocab is not None:
        save_hf_tokenizer(vocab, out, m.max_seq_len)
        shutil.copyfile(ckpt / VOCAB_FILE, out / MMFM_VOCAB)
    else:
        log.warning("%s has no %s: the export has no tokenizer", ckpt, VOCAB_FILE)
    log.info("wrote %s: %d tensors in %d shard(s), %s", out, len(weight_map), len(shards), dtype)
    return out


def refuse_mot(m: ModelConfig, ckpt: Path, library: str) -> None:
    """A Mixture-of-Transformers checkpoint has no architecture in `library` to go to."""
    if m.mot.enabled:
        raise ConversionError(
            f"{ckpt} is a Mixture-of-Transformers model (model.mot.groups: "
            f"{', '.join(m.mot.groups)}), and {library} has no architecture with per-modality "
            "blocks: nothing is exported. Sample and evaluate the checkpoint itself (mmfm "
            "generate / mmfm eval read it at any layout); docs/sparse_models.md"
        )


def honour_umask(path: Path) -> None:
    """Give `path` the mode every other file of the export has, 0666 less the umask:
    safetensors writes its files 0600 (through a private temporary file renamed into place),
    which other users of a shared model folder cannot read."""
    umask = os.umask(0)  # the only way to read it; set back at once
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _visual_tokenizers(vocab: Vocab) -> dict[str, dict]:
    """The published visual tokenizers whose codes the model reads and writes, by codebook:
    how to load each (library, class, path, prefix, ...: its recipe mapping), what it is
    (`source`: class, resolution, config and weights digests) and its ids (`first_id`,
    `codes`), for config.json: an export is usable with its tokenizer without mmfm."""
    return {
        book.name: {
            **json.loads(book.where),
            "source": book.source,
            "first_id": book.offset,
            "codes": book.size,
        }
        for book in vocab.codebooks
        if book.where
    }


def _special_ids(vocab: Vocab) -> dict[str, int]:
    """bos / eos (/ pad) ids of the export: the text tokenizer's own (mmfm's: 1, 2, 3)."""
    if vocab.text_model is None:
        return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    text = text_of_vocab(vocab)
    special = {"bos_token_id": text.bos_id, "eos_token_id": text.eos_id}
    if text.kind == "sentencepiece" and text.sp.pad_id() >= 0:
        special["pad_token_id"] = text.sp.pad_id()
    return special


def hf_config(m: ModelConfig, arch: str = "llama", dtype: str = "float32", **extra):
    """The transformers config (LlamaConfig, MistralConfig, Qwen2Config) of an mmfm model."""
    config_class = _config_class(arch, m)
    arch_options = {
        "llama": {"attention_bias": m.qkv_bias},
        "mistral": {"sliding_window": None},
        "qwen2": {"use_sliding_window": False, "sliding_window": None},
    }[arch]
    return config_class(
        vocab_size=m.vocab_size,
        hidden_size=m.dim,
        intermediate_size=m.hidden_dim,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        max_position_embeddings=m.max_seq_len,
        tie_word_embeddings=m.tie_embeddings,
        hidden_act="silu",
        dtype=dtype,
        architectures=[f"{config_class.__name__.removesuffix('Config')}ForCausalLM"],
        **arch_options,
        **extra,
    )


def _config_class(arch: str, m: ModelConfig):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if arch == "mistral" and m.qkv_bias:
        raise ConversionError("Mistral has no q/k/v biases: export this model as qwen2 or llama")
    if arch == "qwen2" and not m.qkv_bias:
        raise ConversionError("Qwen2 always has q/k/v biases: export this model as llama")
    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- import -------------------------------------------------------------------------------------


def _hf_weights(hf_dir: Path) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, name, tensor) of a Hugging Face folder: safetensors (sharded or not) or .bin files
    read with `torch.load(weights_only=True)`; never unpickles anything else."""
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        yield file, name, f.get_tensor(name)
            except SafetensorError as e:
                raise ConversionError(
                    f"{file} is not a readable safetensors file ({e}): it is truncated or "
                    "damaged; download or save it again"
                ) from None
        return
    files = sorted(hf_dir.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{hf_dir} holds no *.safetensors or pytorch_model*.bin weights")
    for file in files:
        try:
            weights = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for anything but plain tensors
            raise ConversionError(f"{file}: refused to load (weights only): {e}") from None
        if not isinstance(weights, dict) or not all(
            isinstance(t, torch.Tensor) for t in weights.values()
        ):
            raise ConversionError(f"{file} is not a state dict (a mapping of names to tensors)")
        for name, tensor in weights.items():
            yield file, name, tensor


def _read_hf_config(hf_dir: Path) -> dict:
    file = hf_dir / "config.json"
    if not file.is_file():
        raise ConversionError(f"{hf_dir} has no config.json: not a Hugging Face model folder")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(
            f"{file} is not valid JSON ({e}): it is truncated or damaged; download or save it again"
        ) from None


def _import_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    """mmfm name -> fp32 tensor of every weight in the folder; refuses unknown names and
    NaN/Inf values, naming the file and the tensor."""
    state: dict[str, torch.Tensor] = {}
    for file, name, tensor in _hf_weights(hf_dir):
        try:
            mmfm_name = from_hf(name)
        except KeyError:
            raise ConversionError(
                f"{file}: weight {name!r} has no place in mmfm's Llama/Mistral/Qwen2 model; this "
                "is another architecture or a modified checkpoint (remove the weight if it is "
                "not part of the model)"
            ) from None
        if mmfm_name is None:
            continue
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            bad = "not floating point" if not tensor.is_floating_point() else "NaN or Inf values"
            raise ConversionError(f"{file}: weight {name!r} has {bad}; refusing to import it")
        state[mmfm_name] = tensor.float()
    return state


def _grow_rows(weight: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """`weight` with `rows` more rows: the mean row plus noise of 1% of the rows' std."""
    if rows == 0:
        return weight
    gen = torch.Generator().manual_seed(seed)
    mean, std = weight.float().mean(0), weight.float().std()
    new = mean + 0.01 * std * torch.randn(rows, weight.shape[1], generator=gen)
    return torch.cat([weight, new.to(weight.dtype)])


def import_hf(
    hf_dir: str | Path, out: str | Path, extend_vocab: str | None = None, seed: int = 0
) -> Path:
    """Write an mmfm checkpoint (model weights, config.yaml, vocab.json) from a HF folder."""
    hf_dir, out = Path(hf_dir), Path(out)
    hf_cfg = _read_hf_config(hf_dir)
    base = model_config_from_hf(hf_cfg, source=str(hf_dir / "config.json"))
    vocab = _extended_vocab(base, extend_vocab, hf_dir) if extend_vocab else None
    # A pretrained text part smaller than the embedding (rows padded to a multiple) puts the
    # modality tokens on the unused rows first.
    rows = base.vocab_size if vocab is None else max(vocab.size, base.vocab_size)
    model_cfg = replace(base, vocab_size=rows)

    state = _import_state(hf_dir)
    if model_cfg.tie_embeddings:
        state.pop("output.weight", None)
    _check_vocab_rows(state, base.vocab_size, hf_dir / "config.json")
    _check_state(state, base, hf_dir)
    added = model_cfg.vocab_size - base.vocab_size
    for name in ("tok_embeddings.weight", "output.weight"):
        if name in state:
            state[name] = _grow_rows(state[name], added, seed)

    out.mkdir(parents=True, exist_ok=True)
    with _single_process_quiet():
        dcp.save({"model": state}, checkpoint_id=out)
    # Only the model section matters to train.init_from; the rest must merely be valid.
    data = DataConfig(seq_len=min(2048, model_cfg.max_seq_len))
    save_config(Config(model=model_cfg, data=data), out / CONFIG_FILE)
    if vocab is not None:
        vocab.save(out / VOCAB_FILE)
    log.info(
        "wrote %s: %s (%d ids, %d added)", out, hf_cfg["model_type"], model_cfg.vocab_size, added
    )
    return out


def _extended_vocab(base: ModelConfig, layout: str, hf_dir: Path | None = None) -> Vocab:
    """The unified vocabulary with the imported model's tokenizer as its text part, the
    recipe's `text.pretrained` (the same vocabulary `mmfm tokenizer train` writes for it). A
    recipe whose text model mmfm trains is refused: the model's ids would have no text model,
    so no prompt could be encoded and the export would have no tokenizer."""

    recipe = load_recipe(layout)
    if not recipe.text.pretrained:
        raise ConfigError(
            f"--extend-vocab {layout}: the recipe's text model is one mmfm trains, not the "
            f"imported model's own tokenizer; give a recipe with text.pretrained set to the "
            f"model folder (copy tokenizers/llm.yaml, set text.pretrained: {hf_dir or 'HF_DIR'})"
        )
    if recipe.dna.scheme == "bpe":
        raise VocabError("--extend-vocab takes the char or kmer DNA scheme (no model to train)")
    dna = DnaTokenizer(recipe.dna)
    text = load_pretrained(recipe.text.pretrained, recipe.text.bos_token, recipe.text.eos_token)
    if text.size > base.vocab_size:
        raise ConversionError(
            f"{layout}: text.pretrained {recipe.text.pretrained} has {text.size} ids, the "
            f"model in {hf_dir or 'the folder'} only {base.vocab_size} embedding rows: it is "
            "another model's tokenizer"
        )
    return build_vocab(recipe, text, dna)


def _check_vocab_rows(state: dict, vocab_size: int, config_file: Path) -> None:
    """The embedding (and output) rows of the weights are the config's `vocab_size`: the
    model written has exactly the rows it was given (plus those --extend-vocab adds)."""
    for name in ("tok_embeddings.weight", "output.weight"):
        if name in state and state[name].shape[0] != vocab_size:
            raise ConversionError(
                f"{config_file}: vocab_size is {vocab_size}, but {to_hf(name)} has "
                f"{state[name].shape[0]} rows: the config and the weights disagree (set "
                f"vocab_size to {state[name].shape[0]}; --extend-vocab adds the modality rows)"
            )


def _check_state(state: dict, cfg: ModelConfig, source: Path) -> None:

    expected = {n: p.shape for n, p in build_model(cfg).named_parameters()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ConversionError(f"{source} lacks weights for {missing[:5]} ({len(missing)} in all)")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ConversionError(f"{source} has weights mmfm has no place for: {extra[:5]}")
    for name, shape in expected.items():
        have = state[name].shape
        if have != shape:
            raise ConversionError(
                f"{source}: {name} has shape {tuple(have)}, expected {tuple(shape)}"
            )
