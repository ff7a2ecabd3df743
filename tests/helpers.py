"""What only the tests use (spawned ranks and benchmarks use mmfm.testing): the tiny
end-to-end overrides (`TINY`, under conftest.py's `tiny_overrides` fixture), tiny untrained
visual tokenizers (`tiny_visual_recipe`), a callback that signals the trainer at a step
(`SignalAt`), an untrained model saved as a checkpoint (`random_checkpoint`), and the
optional extras that skip locally but fail under `CI=true` (`require_or_skip`,
`megatron_indexed_or_skip`).

pyproject.toml puts tests/ on pytest's `pythonpath`: test files say `from helpers import ...`.
"""

from __future__ import annotations

import importlib
import os
import signal
import struct
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest

from mmfm.core.errors import LaunchError
from mmfm.testing import tiny_demo_model
from mmfm.train.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
MEGATRON = "pip install -e '.[megatron]'"

TINY = [
    *tiny_demo_model(n_layers=2, seq_len=128),
    "data.num_workers=1",  # the end-to-end runs keep a loader worker, as users run
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "optim.warmup_steps=2",
    "optim.lr=1e-3",
    "logging.progress=false",
    "logging.print_every=1000",
]


TINY_VISUAL = {
    "seed_image": {"image_size": 32, "patch": 8, "dim": 32, "heads": 2, "encoder_layers": 1,
                   "qformer_layers": 1, "decoder_layers": 1, "tokens": 8, "codebook_size": 64},
    "himtok_mask": {"mask_size": 32, "stem": 4, "dim": 32, "heads": 2, "encoder_layers": 1,
                    "latent_layers": 1, "decoder_layers": 1, "tokens": 32, "codebook_size": 64,
                    "levels": [8, 16, 32], "level_weights": [2.0, 1.0, 1.0]},
    "video": {"frame_size": 32, "hidden": 16, "dim": 16, "codebook_size": 64},
}  # fmt: skip
"""Model options of tiny visual tokenizers: built untrained in well under a second each."""


def tiny_visual_recipe(root: str | Path) -> Path:
    """A tokenizer recipe under `root`: the base text model and vocabulary
    (tokenizers/base) with tiny untrained image, mask and video tokenizers. Their codes mean
    nothing; the layout of documents and everything downstream of tokenizing are real."""
    from mmfm.tokenization.visual.train import VisualRecipe, build, save_visual

    root = Path(root)
    base = REPO / "tokenizers" / "base"
    lines = [f"output_dir: {base}\n"]
    for slot, kind in (("image", "seed_image"), ("mask", "himtok_mask"), ("video", "video")):
        save_visual(build(VisualRecipe(kind=kind, model=TINY_VISUAL[kind])), root / kind)
        lines.append(f"{slot}_tokenizer: {root / kind}\n")
    (root / "tok.yaml").write_text("".join(lines))
    return root / "tok.yaml"


class SignalAt(Callback):
    """Sends this process `signum` (default SIGUSR1: checkpoint and stop) after `step`."""

    def __init__(self, step: int, signum: int = signal.SIGUSR1):
        self.step, self.signum = step, signum

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.step:
            os.kill(os.getpid(), self.signum)


def in_ci() -> bool:
    """`CI=true` (.ci/run sets it): the test extra is installed, so nothing it installs may
    be missing."""
    return os.environ.get("CI", "").lower() in ("true", "1")


def require_or_skip(module: str, install: str) -> ModuleType:
    """`import module`, or skip the calling test (the whole module when called at its top)
    saying `install`; under CI, where setup.py's test extra installed it, fail instead: a
    failed install of an extra must fail the run, not skip its tests."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if in_ci():
            raise ImportError(f"{module} is missing under CI=true: {install}") from error
        pytest.skip(f"{module} is not installed: {install}", allow_module_level=True)


def megatron_indexed_or_skip():
    """megatron-core's indexed_dataset module, or skip the calling test module when the
    extra is not installed; under CI (setup.py's test extra installs it) never skip."""
    from mmfm.data import megatron as mdata

    try:
        return mdata.megatron_indexed()
    except LaunchError:
        if in_ci():
            raise
        pytest.skip(f"megatron-core is not installed: {MEGATRON}", allow_module_level=True)


def random_checkpoint(path: Path, overrides: Sequence[str], vocab: Path | None = None) -> Path:
    """An untrained model of the config `overrides` make, saved at `path` as an mmfm checkpoint
    (weights and config.yaml; vocab.json from `vocab` when given), without a training run."""
    import torch.distributed.checkpoint as dcp

    from mmfm.config import load_config, save_config
    from mmfm.model import build_model, init_weights
    from mmfm.tokenization.vocab import Vocab
    from mmfm.train.checkpoint import _single_process_quiet

    cfg = load_config(None, list(overrides))
    model = build_model(cfg.model)
    model.to_empty(device="cpu")
    init_weights(model, cfg.model, 0)
    with _single_process_quiet():
        dcp.save({"model": model.state_dict()}, checkpoint_id=path)
    save_config(cfg, Path(path) / "config.yaml")
    if vocab is not None:
        Vocab.load(vocab).save(Path(path) / "vocab.json")
    return Path(path)


def wandb_records(path: Path):
    """The records of a .wandb file: W&B's LevelDB-style log (a 7-byte `:W&B` header, then
    32 KiB blocks of chunks with a 7-byte header each) of `wandb_internal_pb2.Record`s."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, record = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length, kind) == (0, 0):  # the zero padding at a block's end
            pos += left
            continue
        record += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            record = b""
            yield parsed


PUBLISHED_SIZE = 32
"""The side of the pictures the tiny published tokenizers encode."""


def tiny_published_models() -> dict:
    """Tiny random JanusVQVAE, Emu3VQVAE, ChameleonVQVAE (transformers) and VQModel (diffusers)
    by class name, the same weights on every call (seed 0): save them with save_pretrained."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(0)
    return {
        "JanusVQVAE": transformers.JanusVQVAE(
            transformers.JanusVQVAEConfig(
                embed_dim=4, num_embeddings=64, latent_channels=8, base_channels=32,
                channel_multiplier=[1, 1, 2], num_res_blocks=1, num_patches=8,
            )
        ),
        "Emu3VQVAE": transformers.Emu3VQVAE(
            transformers.Emu3VQVAEConfig(
                codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32,
                channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[],
                hidden_size=64,
            )
        ),
        "ChameleonVQVAE": transformers.ChameleonVQVAE(
            transformers.ChameleonVQVAEConfig(
                embed_dim=4, num_embeddings=64, latent_channels=8, base_channels=32,
                channel_multiplier=[1, 2], num_res_blocks=1, resolution=PUBLISHED_SIZE,
            )
        ),
        "VQModel": diffusers.VQModel(
            block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, num_vq_embeddings=64,
            vq_embed_dim=4, layers_per_block=1, sample_size=PUBLISHED_SIZE,
            lookup_from_codebook=True,
        ),
    }  # fmt: skip
