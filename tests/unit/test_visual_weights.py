"""Published-layout loading of the visual tokenizers (mmfm/tokenization/visual/weights.py).

The real SEED / TiTok / LWM checkpoints cannot be fetched here: every state dict below is
built by mmfm's own architecture code and renamed by the documented key map."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mmfm.core.errors import TokenizerError
from mmfm.tokenization.visual.layers import patchify
from mmfm.tokenization.visual.models import (
    FrameVQ,
    FrameVQConfig,
    HiMTokConfig,
    HiMTokMaskTokenizer,
    SeedImageConfig,
    SeedImageTokenizer,
)
from mmfm.tokenization.visual.weights import export_published, load_published

TINY = dict(dim=32, heads=2, encoder_layers=2, codebook_size=64, code_dim=8)


def _seed(seed: int) -> SeedImageTokenizer:
    torch.manual_seed(seed)
    return SeedImageTokenizer(SeedImageConfig(image_size=32, tokens=8, **TINY)).eval()


def _model(kind: str, seed: int):
    torch.manual_seed(seed)
    if kind == "seed_image":
        return _seed(seed)
    if kind == "himtok_mask":
        cfg = HiMTokConfig(mask_size=32, tokens=8, levels=(8, 32), level_weights=(1.0, 1.0), **TINY)
        return HiMTokMaskTokenizer(cfg).eval()
    return FrameVQ(FrameVQConfig(frame_size=16, hidden=16, dim=16, codebook_size=64)).eval()


def _save(state: dict, path) -> str:
    save_file(state, str(path))
    return str(path)


@pytest.mark.parametrize(
    "kind,layout",
    [("seed_image", "mmfm"), ("himtok_mask", "mmfm"), ("video", "mmfm"), ("seed_image", "titok")],
)
def test_renamed_state_dict_loads_back_identical(tmp_path, kind, layout):
    src, dst = _model(kind, 0), _model(kind, 1)
    path = _save(export_published(src, layout), tmp_path / "w.safetensors")
    load_published(layout, path, dst)
    a, b = src.state_dict(), dst.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_titok_names_and_patch_conv_layout(tmp_path):
    """TiTok's names are used, and its Conv2d patch embedding computes mmfm's Linear one."""
    model = _seed(0)
    state = export_published(model, "titok")
    for name in ("latent_tokens", "quantize.embedding.weight", "encoder.transformer.1.ln_1.bias"):
        assert name in state
    assert "queries" not in state and "encoder.layers.0.norm1.weight" not in state
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    conv = F.conv2d(images, state["encoder.patch_embed.weight"], state["encoder.patch_embed.bias"],
                    stride=8).flatten(2).transpose(1, 2)  # fmt: skip
    torch.testing.assert_close(conv, model.patch_embed(patchify(images, 8)))
    loaded = load_published("titok", _save(state, tmp_path / "t.safetensors"), _seed(1))
    assert torch.equal(loaded.encode(images), model.encode(images))


def test_missing_extra_and_misshapen_keys_are_refused(tmp_path):
    state = export_published(_seed(0), "titok")
    missing = {k: v for k, v in state.items() if k != "latent_tokens"}
    with pytest.raises(TokenizerError, match="'latent_tokens' is missing"):
        load_published("titok", _save(missing, tmp_path / "m.safetensors"), _seed(1))
    extra = {**state, "encoder.class_embedding": torch.zeros(1, 32)}  # a real TiTok key
    with pytest.raises(TokenizerError, match=r"'encoder\.class_embedding' has no counterpart"):
        load_published("titok", _save(extra, tmp_path / "e.safetensors"), _seed(1))
    wrong = {**state, "quantize.embedding.weight": torch.zeros(64, 12)}
    with pytest.raises(TokenizerError, match=r"'quantize\.embedding\.weight' has shape \(64, 12\)"):
        load_published("titok", _save(wrong, tmp_path / "s.safetensors"), _seed(1))
    with pytest.raises(TokenizerError, match="seed_image tokenizer only"):
        load_published("titok", _save(state, tmp_path / "v.safetensors"), _model("video", 0))


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_pickles_are_read_weights_only(tmp_path):
    """A torch.save'd state dict loads; a code-running pickle and LWM's pickled numpy params
    (its VQGAN checkpoint format) are refused without running anything."""
    src, dst = _seed(0), _seed(1)
    torch.save(export_published(src, "mmfm"), tmp_path / "ok.pt")
    load_published("mmfm", tmp_path / "ok.pt", dst)
    assert torch.equal(src.queries, dst.queries)
    marker = tmp_path / "ran"
    torch.save({"queries": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(TokenizerError, match=r"evil\.pt: not a safetensors or weights-only"):
        load_published("mmfm", tmp_path / "evil.pt", _seed(1))
    assert not marker.exists()
    with open(tmp_path / "vqgan", "wb") as f:
        pickle.dump({"quantize": {"embeddings": np.zeros((8, 4), np.float32)}}, f)
    with pytest.raises(TokenizerError, match="vqgan: not a safetensors or weights-only"):
        load_published("mmfm", tmp_path / "vqgan", _model("video", 0))
