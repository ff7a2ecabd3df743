"""Published visual tokenizers: a library's own VQ class, named in a tokenizer recipe.

    image_tokenizer: {library: transformers, class: JanusVQVAE, path: <folder or hub id>,
                      prefix: model.vqmodel., resolution: 384, fit: crop}
    image_tokenizer: {library: diffusers, class: VQModel, path: <folder>, subfolder: vqvae}

The library class does the work (its own `encode` / `decode`); mmfm adds loading by path or
prefix, the square picture of `resolution` pixels, the flat span of `grid x grid` codes and
the vocabulary range. The classes are a fixed allow-list (`CLASSES`), each imported by its
explicit name: nothing in a recipe or a checkpoint is resolved to code. Weights are read
from safetensors only (a pickle `.bin` is refused by name), a config with `auto_map` (code of
its own, `trust_remote_code`) is refused, and with `prefix` only the tensors under it are read,
from only the shards of `model.safetensors.index.json` that hold them (a full multimodal
checkpoint's LLM is never read). `source` names the class, resolution, config and weights, so
the vocabulary's fingerprint changes with the tokenizer (`Codebook.source`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from mmfm.core.errors import ConfigError, TokenizerError
from mmfm.core.extras import require_extra
from mmfm.tokenization.visual.data import FITS

FRAMINGS = ("flat", "emu3")
"""flat: the grid's codes in row-major order; emu3: Emu3's header and row ends (framing.py)."""
SPEC_KEYS = ("library", "class", "path", "prefix", "subfolder", "resolution", "fit", "framing")


@dataclass(frozen=True)
class PublishedSpec:
    library: str
    class_name: str
    path: str
    prefix: str = ""
    """Where the tokenizer's tensors sit in a full model's checkpoint (e.g. model.vqmodel.);
    its config is then the full config's sub-config (vq_config)."""
    subfolder: str = ""
    """A folder inside `path` (diffusers pipelines: vqvae)."""
    resolution: int = 0
    """Side of the square pictures encoded; 0: the checkpoint's native size."""
    fit: str = "crop"
    """How a picture that is not square becomes square: crop or letterbox."""
    framing: str = "flat"
    """flat: `<img>` and the grid's codes; emu3: Emu3's header and row ends (framing.py)."""

    @property
    def entry(self) -> LibraryClass:
        return CLASSES[(self.library, self.class_name)]

    @property
    def no_decoder(self) -> str:
        """Why the class cannot decode codes into pictures; empty where it can."""
        return self.entry.no_decoder if self.entry.decode is None else ""

    def describe(self) -> str:
        """The recipe mapping as JSON (recorded in vocab.json, so exports say how to load it)."""
        value = {"library": self.library, "class": self.class_name, "path": self.path}
        value.update(prefix=self.prefix, subfolder=self.subfolder, resolution=self.resolution)
        value["fit"] = self.fit
        if self.framing != "flat":
            value["framing"] = self.framing
        return json.dumps({k: v for k, v in value.items() if v}, sort_keys=True)


def parse_spec(value, where: str) -> PublishedSpec | None:
    """The published tokenizer a recipe slot names (a mapping), or None for a folder of
    mmfm's own (a string) or no tokenizer."""
    if value is None or isinstance(value, str):
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a folder or a mapping {{library, class, path, ...}}")
    for key in value:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r} (keys: {', '.join(SPEC_KEYS)}){hint}")
    pair = (value.get("library"), value.get("class"))
    if pair not in CLASSES:
        have = ", ".join(f"{lib} {name}" for lib, name in CLASSES)
        raise ConfigError(f"{where}: library {pair[0]!r} class {pair[1]!r} is not one of: {have}")
    if not value.get("path"):
        raise ConfigError(f"{where}: path (a local folder or a hub id) is required")
    resolution = value.get("resolution") or 0
    if not isinstance(resolution, int) or resolution < 0:
        raise ConfigError(f"{where}.resolution must be a positive number of pixels (0: native)")
    if value.get("fit", "crop") not in FITS:
        raise ConfigError(f"{where}.fit {value.get('fit')!r} is not one of {', '.join(FITS)}")
    framing = value.get("framing", "flat")
    if framing not in FRAMINGS:
        raise ConfigError(f"{where}.framing {framing!r} is not one of {', '.join(FRAMINGS)}")
    return PublishedSpec(
        pair[0],
        pair[1],
        str(value["path"]),
        str(value.get("prefix") or ""),
        str(value.get("subfolder") or ""),
        resolution,
        value.get("fit", "crop"),
        framing,
    )


# -- the allow-list -------------------------------------------------------------------------------


def _janus() -> type:
    from transformers import JanusVQVAE

    return JanusVQVAE


def _emu3() -> type:
    from transformers import Emu3VQVAE

    return Emu3VQVAE


def _chameleon() -> type:
    from transformers import ChameleonVQVAE

    return ChameleonVQVAE


def _vqmodel() -> type:
    from diffusers import VQModel

    return VQModel


def _encode_flat(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Janus, Chameleon: `encode(pixels).image_tokens`, row-major over the latent grid."""
    return model.encode(x).image_tokens.view(len(x), -1)


def _encode_emu3(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    sizes = torch.tensor([list(x.shape[-2:])] * len(x))
    return torch.stack(model.encode(x, image_sizes=sizes).image_tokens).view(len(x), -1)


def _encode_vqmodel(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """aMUSEd's own path: the quantizer's indices of the encoder's latents."""
    return model.quantize(model.encode(x).latents)[2][2].view(len(x), -1)


def _decode_janus(model: nn.Module, codes: torch.Tensor, grid: int) -> torch.Tensor:
    return model.decode(codes)


def _decode_emu3(model: nn.Module, codes: torch.Tensor, grid: int) -> torch.Tensor:
    return model.decode(codes.view(len(codes), grid, grid))


def _decode_vqmodel(model: nn.Module, codes: torch.Tensor, grid: int) -> torch.Tensor:
    shape = (len(codes), grid, grid, model.quantize.vq_embed_dim)
    if model.config.lookup_from_codebook:  # aMUSEd's VQGAN: the decoder looks the codes up
        return model.decode(codes.flatten(), force_not_quantize=True, shape=shape).sample
    latents = model.quantize.get_codebook_entry(codes.flatten(), shape)
    return model.decode(latents, force_not_quantize=True).sample


@dataclass(frozen=True)
class LibraryClass:
    library: str
    load: Callable[[], type]
    """Imports the class by its explicit name."""
    codebook: str
    """The config field of the codebook size."""
    encode: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    """(model, pixels `[B, 3, S, S]` in [-1, 1]) -> codes `[B, grid * grid]`."""
    decode: Callable[[nn.Module, torch.Tensor, int], torch.Tensor] | None
    """(model, codes, grid) -> pixels; None: the class has no decoder."""
    no_decoder: str = ""

    @property
    def weights(self) -> tuple[str, str]:
        """(single file, sharded index) of the library's safetensors names."""
        stem = "diffusion_pytorch_model" if self.library == "diffusers" else "model"
        return f"{stem}.safetensors", f"{stem}.safetensors.index.json"

    @property
    def pickle(self) -> tuple[str, str]:
        stem = "diffusion_pytorch_model" if self.library == "diffusers" else "pytorch_model"
        return f"{stem}.bin", f"{stem}.bin.index.json"


CLASSES: dict[tuple[str, str], LibraryClass] = {
    ("transformers", "JanusVQVAE"): LibraryClass(
        "transformers", _janus, "num_embeddings", _encode_flat, _decode_janus
    ),
    ("transformers", "Emu3VQVAE"): LibraryClass(
        "transformers", _emu3, "codebook_size", _encode_emu3, _decode_emu3
    ),
    ("transformers", "ChameleonVQVAE"): LibraryClass(
        "transformers",
        _chameleon,
        "num_embeddings",
        _encode_flat,
        None,
        "transformers' ChameleonVQVAE has no decoder (Chameleon's release left it out; Anole's "
        "checkpoint has the weights but no transformers class decodes them)",
    ),
    ("diffusers", "VQModel"): LibraryClass(
        "diffusers", _vqmodel, "num_vq_embeddings", _encode_vqmodel, _decode_vqmodel
    ),
}
"""(library, class name) -> the class and how mmfm calls it."""


# -- files ----------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_OFFLINE = ("1", "true", "yes", "on")


def _file(spec: PublishedSpec, name: str) -> Path | None:
    """`name` of the tokenizer's folder (with its subfolder), fetched from the hub where `path`
    is a hub id and the hub is reachable; None where the folder has no such file."""
    folder = Path(spec.path).expanduser()
    if folder.is_dir():
        path = folder / spec.subfolder / name
        return path if path.is_file() else None
    if not _HUB_ID.match(spec.path):
        raise TokenizerError(f"{spec.path} is neither a local folder nor a hub id (owner/name)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _OFFLINE:
        raise TokenizerError(
            f"{spec.path} is not a local folder and HF_HUB_OFFLINE is set: download it where the "
            "hub is reachable and give its local folder as path"
        )
    hub = require_extra("huggingface_hub", "visual", "a hub id as a tokenizer path")
    try:
        return Path(hub.hf_hub_download(spec.path, name, subfolder=spec.subfolder or None))
    except hub.errors.EntryNotFoundError:
        return None
    except Exception as e:  # offline, unknown repo, gated: one line, not a traceback
        raise TokenizerError(
            f"cannot fetch {name} of {spec.path} from the Hugging Face hub ({type(e).__name__}): "
            "give a local folder as path (set HF_HUB_OFFLINE=1 where the hub is unreachable)"
        ) from None


def _config(spec: PublishedSpec) -> dict:
    """The tokenizer's config: config.json, or its `vq_config` where it is a full model's."""
    path = _file(spec, "config.json")
    if path is None:
        raise TokenizerError(f"{spec.path}: no config.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: unreadable config ({e})") from None
    key = getattr(spec.entry.load(), "config_class", None)
    sub = getattr(key, "base_config_key", "") if key is not None else ""
    for part in (config, config.get(sub) if sub else None):
        if isinstance(part, dict) and "auto_map" in part:
            raise TokenizerError(
                f"{path} has auto_map (code of its own, trust_remote_code): mmfm runs no code "
                f"from a checkpoint; use {spec.library}'s own {spec.class_name} weights"
            )
    if sub and isinstance(config.get(sub), dict):
        config = config[sub]
    elif spec.prefix:
        raise TokenizerError(f"{path}: prefix {spec.prefix!r} given but the config has no {sub}")
    named = config.get("_class_name")
    if named is not None and named != spec.class_name:
        raise TokenizerError(f"{path} is a {named}, not a {spec.class_name}")
    return config


def _weight_files(spec: PublishedSpec) -> list[Path]:
    """The safetensors files that hold the tokenizer (with `prefix`: only the shards of the
    index that hold tensors under it)."""
    single, index = spec.entry.weights
    if (path := _file(spec, index)) is not None:
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TokenizerError(f"{path}: unreadable index ({e})") from None
        shards = sorted({s for k, s in weight_map.items() if k.startswith(spec.prefix)})
        if not shards:
            raise TokenizerError(f"{path} lists no tensor under prefix {spec.prefix!r}")
        for shard in shards:
            if Path(shard).name != shard:  # an index must not point outside its folder
                raise TokenizerError(f"{path} names shard {shard!r} outside its folder")
        files = [_file(spec, s) for s in shards]
        missing = [s for s, f in zip(shards, files, strict=True) if f is None]
        if missing:
            raise TokenizerError(f"{path} names shards that are missing: {', '.join(missing)}")
        return files  # type: ignore[return-value]
    if (path := _file(spec, single)) is not None:
        return [path]
    for name in spec.entry.pickle:
        if _file(spec, name) is not None:
            raise TokenizerError(
                f"{spec.path}: {name} is a pickle, which mmfm does not read (it can run code); "
                f"convert it to {single} with the library's save_pretrained"
            )
    raise TokenizerError(f"{spec.path}: no {single} or {index}")


def read_weights(spec: PublishedSpec) -> dict[str, torch.Tensor]:
    """The tensors under `spec.prefix` (the prefix taken off their names)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(spec):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                    if key.startswith(spec.prefix):
                        tensors[key[len(spec.prefix) :]] = f.get_tensor(key)
        except (OSError, SafetensorError) as e:
            raise TokenizerError(f"{path}: unreadable safetensors ({e})") from None
    if not tensors:
        raise TokenizerError(f"{spec.path} holds no tensors under prefix {spec.prefix!r}")
    return tensors


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """16 hex digits of a SHA-256 of every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _config_digest(spec: PublishedSpec, config: dict) -> str:
    """The fields of the class's own config, as the library reads them (spelled or left at
    their defaults alike), without bookkeeping (versions, paths, generic fields) or Janus's
    `num_patches` (the resolution, in `source`, sets the grid)."""
    if spec.library == "diffusers":
        kept = {k: v for k, v in config.items() if not k.startswith("_")}
    else:
        cls = spec.entry.load().config_class
        generic = set(cls.__mro__[1]().to_dict())  # PreTrainedConfig's own fields
        built = cls.from_dict(config).to_dict()
        kept = {k: v for k, v in built.items() if k not in generic and k != "num_patches"}
    blob = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- the tokenizer --------------------------------------------------------------------------------


def _factor(spec: PublishedSpec, config: dict) -> int:
    """Downsampling of the encoder: one per level of channels but the last."""
    levels = config.get(
        "block_out_channels" if spec.library == "diffusers" else "channel_multiplier"
    )
    if not levels:
        raise TokenizerError(f"{spec.path}: the config has no levels to downsample by")
    return 2 ** (len(levels) - 1)


def _native(spec: PublishedSpec, config: dict, factor: int) -> int:
    """The size the config records (Janus: its grid, Chameleon: `resolution`); 0 for Emu3
    (any size) and VQModel (`sample_size` is not the picture's: aMUSEd's says 32)."""
    if spec.class_name == "JanusVQVAE":
        return int(config.get("num_patches", 0)) * factor
    if spec.class_name == "ChameleonVQVAE":
        return int(config.get("resolution", 0))
    return 0


class PublishedTokenizer(nn.Module):
    """A library's VQ model behind the interface of mmfm's own visual tokenizers: `encode`
    pixels `[B, 3, S, S]` in [-1, 1] to codes `[B, grid * grid]` (row-major), `decode` them
    back, `num_codes`, `tokens_per_item`; `source` names it for the vocabulary."""

    kind = "published"

    def __init__(self, spec: PublishedSpec, model: nn.Module, config: dict, digest: str):
        super().__init__()
        self.spec, self.model = spec, model.eval()
        factor = _factor(spec, config)
        self.resolution = spec.resolution or _native(spec, config, factor)
        if self.resolution <= 0 or self.resolution % factor:
            raise TokenizerError(
                f"{spec.class_name} {spec.path}: resolution {self.resolution} must be a positive "
                f"multiple of its downsampling {factor} (set resolution in the recipe)"
            )
        self.grid = self.resolution // factor
        self.frames_per_grid = 1
        """Frames of a clip one code grid stands for (Emu3: temporal_downsample_factor, 4)."""
        if spec.class_name == "Emu3VQVAE":
            self.frames_per_grid = int(model.config.temporal_downsample_factor)
        self._num_codes = int(config[spec.entry.codebook])
        self.source = (
            f"{spec.library} {spec.class_name} {self.resolution}px config "
            f"{_config_digest(spec, config)} weights {digest}"
        )
        if spec.framing != "flat":  # another layout of the spans: another vocabulary
            self.source += f" framing {spec.framing}"

    @property
    def num_codes(self) -> int:
        return self._num_codes

    @property
    def tokens_per_item(self) -> int:
        return self.grid * self.grid

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.spec.entry.encode(self.model, pixels)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        entry = self.spec.entry
        if entry.decode is None:
            raise TokenizerError(f"{self.spec.path}: decoding refused: {entry.no_decoder}")
        return entry.decode(self.model, codes, self.grid).float().clamp(-1, 1)

    @torch.no_grad()
    def encode_clip(self, frames: torch.Tensor) -> torch.Tensor:
        """A clip's frames `[T, 3, S, S]` -> code grids `[grids, grid * grid]`: one per frame,
        or (Emu3) one per `frames_per_grid` frames through the library's video encode, the
        last frame repeated up to a whole group (the library drops a part group)."""
        t = self.frames_per_grid
        if t == 1:
            return self.encode(frames)
        frames = torch.cat([frames, frames[-1:].expand(-len(frames) % t, -1, -1, -1)])
        sizes = torch.tensor([list(frames.shape[-2:])])
        (codes,) = self.model.encode(frames[None], image_sizes=sizes).image_tokens
        return codes.reshape(len(codes), -1)

    @torch.no_grad()
    def decode_clip(self, codes: torch.Tensor) -> torch.Tensor:
        """Code grids `[grids, grid * grid]` -> frames `[grids * frames_per_grid, 3, S, S]`."""
        if self.frames_per_grid == 1:
            return self.decode(codes)
        grids = codes.view(1, len(codes), self.grid, self.grid)
        return self.model.decode(grids)[0].float().clamp(-1, 1)


def load_published(spec: PublishedSpec) -> PublishedTokenizer:
    """The tokenizer `spec` names, its weights loaded (strict) from safetensors, eval mode."""
    entry = spec.entry
    require_extra(entry.library, "visual", f"image_tokenizer {spec.class_name}")
    config = _config(spec)
    tensors = read_weights(spec)
    cls = entry.load()
    built = dict(config)
    if spec.class_name == "JanusVQVAE" and spec.resolution:  # its decoder's fixed grid
        built["num_patches"] = spec.resolution // _factor(spec, config)
    try:
        with torch.device("meta"):  # no random init of weights the file replaces
            if entry.library == "diffusers":
                model = cls.from_config({k: v for k, v in built.items() if not k.startswith("_")})
            else:
                model = cls(cls.config_class.from_dict(built))
        model.load_state_dict(tensors, strict=True, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise RuntimeError("tensors that are neither in the file nor rebuilt by the class")
    except (RuntimeError, TypeError, ValueError) as e:
        detail = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        under = f" under {spec.prefix!r}" if spec.prefix else ""
        raise TokenizerError(
            f"{spec.path}: the weights{under} do not fit {spec.class_name} built from its "
            f"config: {detail}"
        ) from None
    return PublishedTokenizer(spec, model.float(), config, weights_digest(tensors))
