"""Training, evaluating, saving and loading the visual tokenizers.

`mmfm tokenizer train tokenizers/<seed_image|himtok_mask|video>.yaml` trains one on real
pictures on CPU (a progress bar, a checkpoint every `checkpoint_every` steps), then
evaluates it on held-out pictures and writes `eval.json` next to the weights:

- images and frames: PSNR of the reconstruction, next to a baseline with the same bit budget
  (the picture downsampled to as many 8-bit RGB pixels as the codes have bits, then
  upsampled bicubically);
- masks: IoU when decoding from the first 1, 2, 4, 8, 16, 32 tokens, next to a baseline with
  the same bit budget (the mask downsampled to as many binary pixels as the codes have bits,
  then upsampled and thresholded);
- every quantiser: the perplexity of its codes (codes effectively in use) and the codes used;
- `beats_baseline` (true / false) and `margin` (PSNR in dB, or IoU of all the tokens, minus
  the baseline's): a tokenizer that does not beat the baseline wastes its codes.

Collapse is visible while training: every `log_every` steps the codebook usage of the codes
drawn since the previous log (perplexity, codes in use) is logged, with a warning when the
perplexity falls below `min_code_usage` of the codebook.

A trained tokenizer is a folder: `config.json` (kind + model config) and `model.safetensors`.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from mmfm.config.loading import load_structured
from mmfm.config.schema import _require, _require_choice, _require_positive
from mmfm.core.errors import ConfigError, TokenizerError
from mmfm.core.extras import require_extra
from mmfm.core.files import iter_files, suffixes_of
from mmfm.tokenization.svg import render_svg
from mmfm.tokenization.visual import data as vdata
from mmfm.tokenization.visual.models import MODELS, config_dict
from mmfm.tokenization.visual.quantizer import perplexity, perplexity_of_counts

log = logging.getLogger("mmfm")
VISUAL_KINDS = tuple(MODELS)


@dataclass
class VisualRecipe:
    kind: str = "seed_image"
    """seed_image, himtok_mask or video."""
    output_dir: str = "tokenizers/seed_image"
    """Where config.json, model.safetensors and eval.json go."""
    data: list[str] = field(default_factory=lambda: ["real:photos"])
    """Pictures: files, directories, globs, real:<name>. Masks come from silhouettes (files
    named *horse*, black on white; SVG icons, rendered: needs cairosvg) and Otsu thresholds
    of the others; videos' frames are read with fps / max_frames (for video, and as more
    training pictures for seed_image)."""
    held_out: list[str] = field(default_factory=lambda: ["chelsea.png", "coffee.png", "rocket.jpg"])
    """File names kept out of training and used for the evaluation."""
    fps: float = 2.0
    """video: frames per second taken from each clip."""
    max_frames: int = 64
    """video: at most this many frames per clip."""
    steps: int = 1500
    """Optimizer steps."""
    batch_size: int = 32
    """Crops per step."""
    lr: float = 1e-3
    """AdamW learning rate (linear warmup over min(100, steps / 10) steps, then cosine to 10%)."""
    grad_clip: float = 0.0
    """Clip the gradient norm to this before each step (0: no clipping)."""
    checkpoint_every: int = 500
    """Save the weights every this many steps (0: only at the end)."""
    log_every: int = 50
    """Log the loss and the codebook usage (perplexity, codes in use) of the codes drawn since
    the previous log every this many steps."""
    min_code_usage: float = 0.02
    """Warn at a log step whose codes' perplexity is below this fraction of the codebook
    (0.02 of 8192: 164 codes effectively in use); 0: never warn."""
    eval_items: int = 64
    """Held-out crops in the evaluation."""
    fit_items: int = 4096
    """Training crops a model with a fitted part (seed_image `frontend: pca`: its basis) is
    fitted on before the first step."""
    seed: int = 0
    """Seed of the weights and the crops."""
    cache_dir: str = "~/.cache/mmfm"
    """Where real:<name> data is fetched to."""
    model: dict[str, Any] = field(default_factory=dict)
    """Fields of the model's config (SeedImageConfig, HiMTokConfig or FrameVQConfig)."""

    def __post_init__(self) -> None:
        _require_choice("kind", self.kind, VISUAL_KINDS)
        _require_positive(self, "train", "steps", "batch_size", "lr", "eval_items", "fit_items")
        _require(self.checkpoint_every >= 0, "checkpoint_every must be >= 0")
        _require(self.grad_clip >= 0, "grad_clip must be >= 0 (0: no clipping)")
        _require_positive(self, "train", "log_every")
        _require(0 <= self.min_code_usage <= 1, "min_code_usage must be in [0, 1]")
        names = [f.name for f in fields(MODELS[self.kind][1])]
        for key in self.model:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; fields: {names}"
                raise ConfigError(f"model.{key} is not a {self.kind} model field{hint}")


def load_visual_recipe(path, overrides=()) -> VisualRecipe:
    return load_structured(VisualRecipe, path, overrides)


def build(recipe: VisualRecipe) -> nn.Module:
    torch.manual_seed(recipe.seed)
    return _model(recipe.kind, recipe.model)


def _model(kind: str, config: dict[str, Any]) -> nn.Module:
    """A fresh `kind` model from its config fields (lists from YAML / JSON become tuples)."""
    model_class, config_class = MODELS[kind]
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return model_class(config_class(**values))


# -- data ---------------------------------------------------------------------------------------


def require_decoders(recipe: VisualRecipe) -> None:
    """Refuse, before anything is fetched or trained, data whose files need a missing extra:
    PyAV for clips (video, and seed_image's extra frames), cairosvg for mask icons."""
    suffixes = suffixes_of(recipe.data, recipe.cache_dir)
    clips = sorted(suffixes & vdata.PYAV_SUFFIXES)
    if clips and recipe.kind in ("video", "seed_image"):
        require_extra("av", "video", f"{recipe.kind}: decoding the {'/'.join(clips)} clips of data")
    if ".svg" in suffixes and recipe.kind == "himtok_mask":
        require_extra("cairosvg", "svg", f"{recipe.kind}: rendering the .svg icons of data")


def pictures(recipe: VisualRecipe, size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training pictures, held-out pictures) of the recipe's kind."""
    files = list(iter_files(recipe.data, recipe.cache_dir))
    train, held = [], []
    for path in files:
        for picture in _read(recipe, path, size):
            (held if path.name in recipe.held_out else train).append(picture)
    if not train or not held:
        raise ConfigError(
            f"{recipe.kind}: {len(train)} training and {len(held)} held-out pictures from "
            f"{recipe.data} (held_out {recipe.held_out}): both must be non-empty"
        )
    return train, held


def _read(recipe: VisualRecipe, path: Path, size: int) -> list[np.ndarray]:
    suffix = path.suffix.lower()
    if recipe.kind == "video":
        if suffix in vdata.IMAGE_SUFFIXES and suffix not in {".gif", ".apng"}:
            return [vdata.read_image(path)]
        return list(vdata.read_video(path, recipe.fps, recipe.max_frames))
    if recipe.kind == "seed_image" and suffix in vdata.VIDEO_SUFFIXES - vdata.IMAGE_SUFFIXES:
        frames = vdata.read_video(path, recipe.fps, recipe.max_frames)  # more real pictures
        return [f for f in frames if min(f.shape[:2]) >= size]
    if recipe.kind == "himtok_mask" and suffix == ".svg":  # icons: clean real shapes
        return [vdata.silhouette(render_svg(path.read_text(errors="replace"), 2 * size))]
    if suffix not in vdata.IMAGE_SUFFIXES:
        return []
    image = vdata.read_image(path)
    if min(image.shape[:2]) < size:
        return []
    if recipe.kind == "himtok_mask":
        return [vdata.silhouette(image) if "horse" in path.name else vdata.otsu_mask(image)]
    return [image]


def as_batch(kind: str, pictures: list[np.ndarray]) -> torch.Tensor:
    if kind == "himtok_mask":
        return torch.from_numpy(np.stack(pictures))
    return vdata.to_tensor(pictures)


# -- train and evaluate -------------------------------------------------------------------------


def item_size(model: nn.Module) -> int:
    """Side of the square pictures a tokenizer takes."""
    cfg = model.cfg
    return getattr(cfg, "image_size", None) or getattr(cfg, "mask_size", None) or cfg.frame_size


def _accept(kind: str):
    return vdata.informative if kind == "himtok_mask" else (lambda crop: True)


def held_out_batch(recipe: VisualRecipe, held: list[np.ndarray], size: int) -> torch.Tensor:
    """The evaluation batch: `eval_items` crops of the held-out pictures (seeded)."""
    sampler = vdata.CropSampler(held, size, seed=recipe.seed + 1)
    return as_batch(recipe.kind, sampler.sample(recipe.eval_items, _accept(recipe.kind)))


def train_visual(recipe: VisualRecipe, progress: bool = True) -> dict[str, Any]:
    require_decoders(recipe)
    model = build(recipe)
    size = item_size(model)
    train, held = pictures(recipe, size)
    accept = _accept(recipe.kind)
    sampler = vdata.CropSampler(train, size, seed=recipe.seed)
    eval_batch = held_out_batch(recipe, held, size)
    if getattr(model, "needs_fit", False):  # a frozen part fitted on training crops first
        fit_sampler = vdata.CropSampler(train, size, seed=recipe.seed + 2)
        log.info("%s: fitting on %d training crops", recipe.kind, recipe.fit_items)
        model.fit(as_batch(recipe.kind, fit_sampler.sample(recipe.fit_items, accept)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    warmup = max(1, min(100, recipe.steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / recipe.steps)))
        ),
    )
    out = Path(recipe.output_dir)
    log.info(
        "%s: %d training and %d held-out pictures, %d steps",
        recipe.kind,
        len(train),
        len(held),
        recipe.steps,
    )
    bar = tqdm(range(recipe.steps), desc=f"train {recipe.kind}", disable=not progress)
    history, usage = [], []
    counts = torch.zeros(model.num_codes, dtype=torch.long)
    model.train()
    for step in bar:
        result = model(as_batch(recipe.kind, sampler.sample(recipe.batch_size, accept)))
        optimizer.zero_grad(set_to_none=True)
        result["loss"].backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        schedule.step()
        history.append(result["loss"].item())
        counts += torch.bincount(result["codes"].flatten().cpu(), minlength=model.num_codes)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if (step + 1) % recipe.log_every == 0 or step + 1 == recipe.steps:
            usage.append(log_usage(step + 1, history[-1], counts, recipe.min_code_usage))
            counts.zero_()
        if recipe.checkpoint_every and (step + 1) % recipe.checkpoint_every == 0:
            save_visual(model, out)
    save_visual(model, out)
    metrics = {
        "steps": recipe.steps,
        "first_loss": history[0],
        "last_loss": float(np.mean(history[-20:])),
        "train_usage": usage,
    }
    metrics.update(evaluate(model.eval(), eval_batch))
    (out / "eval.json").write_text(json.dumps(metrics, indent=1))
    log.info(
        "%s: %s", out, {k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()}
    )
    return metrics


def log_usage(step: int, loss: float, counts: torch.Tensor, min_usage: float) -> dict[str, Any]:
    """Log the codebook usage of the code histogram `counts`; warn when its perplexity is
    below `min_usage` of the codebook (a collapsing book). Returns the numbers logged."""
    ppl, in_use, size = perplexity_of_counts(counts), int((counts > 0).sum()), len(counts)
    log.info(
        "step %d: loss %.4f, codebook perplexity %.1f, %d of %d codes in use",
        step,
        loss,
        ppl,
        in_use,
        size,
    )
    if ppl < min_usage * size:
        log.warning(
            "step %d: codebook collapsing: perplexity %.1f of %d codes is below min_code_usage "
            "%g (%.0f); try a lower lr, more data or quantizer: fsq",
            step,
            ppl,
            size,
            min_usage,
            min_usage * size,
        )
    return {"step": step, "perplexity": ppl, "codes_in_use": in_use}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of pictures in [-1, 1], over the whole batch."""
    mse = F.mse_loss((a.clamp(-1, 1) + 1) / 2, (b + 1) / 2).item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def same_bits_baseline(images: torch.Tensor, bits: int) -> torch.Tensor:
    """Downsample to as many 8-bit RGB pixels as `bits` allows, upsample back (bicubic)."""
    side = max(1, int(math.sqrt(bits / 24)))
    size = images.shape[-1]
    out = []
    for picture in vdata.to_uint8(images):
        small = Image.fromarray(picture).resize((side, side), Image.BOX)
        out.append(np.asarray(small.resize((size, size), Image.BICUBIC)))
    return vdata.to_tensor(out)


def same_bits_mask_baseline(masks: torch.Tensor, bits: int) -> torch.Tensor:
    """Downsample {0, 1} masks to as many binary pixels as `bits` allows, upsample (bilinear)
    and threshold."""
    side = max(1, int(math.sqrt(bits)))
    small = F.adaptive_avg_pool2d(masks.float()[:, None], side).round()
    up = F.interpolate(small, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return (up[:, 0] > 0.5).to(torch.uint8)


def iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean IoU of {0, 1} masks `[B, H, W]` (an empty union counts as 0)."""
    pred, target = pred.bool(), target.bool()
    inter = (pred & target).flatten(1).sum(1).float()
    union = (pred | target).flatten(1).sum(1).clamp(min=1).float()
    return (inter / union).mean().item()


@torch.no_grad()
def evaluate(model: nn.Module, batch: torch.Tensor) -> dict[str, Any]:
    start = time.perf_counter()
    codes = model.encode(batch)
    seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {
        "perplexity": perplexity(codes, model.num_codes),
        "codes_in_use": int(codes.unique().numel()),
        "codebook_size": model.num_codes,
        "tokens_per_item": model.tokens_per_item,
        "bits_per_item": model.tokens_per_item * math.ceil(math.log2(model.num_codes)),
        "encode_items_per_s": len(batch) / seconds,
    }
    bits = metrics["bits_per_item"]
    if model.kind == "himtok_mask":
        for k in (1, 2, 4, 8, 16, 32):
            if k <= model.tokens_per_item:
                metrics[f"iou@{k}"] = iou(model.decode(codes[:, :k]), batch)
        quality = iou(model.decode(codes), batch)  # all the tokens
        baseline = iou(same_bits_mask_baseline(batch, bits), batch)
        metrics["iou_same_bits_baseline"] = baseline
    else:
        quality = metrics["psnr"] = psnr(model.decode(codes), batch)
        baseline = metrics["psnr_same_bits_baseline"] = psnr(same_bits_baseline(batch, bits), batch)
    metrics["beats_baseline"] = quality > baseline
    metrics["margin"] = quality - baseline
    return metrics


# -- files --------------------------------------------------------------------------------------


def save_visual(model: nn.Module, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config_dict(model), indent=1))


def load_visual(path: str | Path) -> nn.Module:
    """A trained visual tokenizer (eval mode) from its folder; a missing, damaged or mismatched
    one is a TokenizerError naming the file and how to (re)train it."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise TokenizerError(
            f"{path} is not a trained visual tokenizer (config.json + model.safetensors): "
            f"run {_train_command(path)}"
        )
    try:
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("kind") == "himtok_mask":  # saved before the field: trained without it
            cfg.setdefault("query_pool", False)
        model = _model(cfg.pop("kind"), cfg)
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        raise TokenizerError(
            f"{path / 'config.json'} is unreadable ({type(e).__name__}: {e}): run "
            f"{_train_command(path)} again"
        ) from None
    try:
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    except RuntimeError as e:  # e.g. quantizer: fsq in config.json, a VQ codebook in the weights
        detail = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise TokenizerError(
            f"{path}: model.safetensors does not fit config.json ({model.kind}, quantizer "
            f"{getattr(model.cfg, 'quantizer', 'vq')}): {detail}; retrain it with its recipe"
        ) from None
    except SafetensorError as e:  # a cut or damaged file
        raise TokenizerError(
            f"{path / 'model.safetensors'} is unreadable ({type(e).__name__}: {e}): run "
            f"{_train_command(path)} again"
        ) from None
    return model.eval()


def _train_command(path: Path) -> str:
    """The command that trains the tokenizer of folder `path`: its recipe is <path>.yaml in
    the shipped layout (tokenizers/seed_image.yaml -> tokenizers/seed_image)."""
    recipe = path.with_name(path.name + ".yaml")
    return f"mmfm tokenizer train {recipe if recipe.is_file() else '<its recipe>.yaml'}"
