"""Collapse is visible: codebook usage logged while training, a warning on a collapsed book,
the same-bits verdict in eval.json, and the FSQ quantiser's codes."""

import json
import logging

import numpy as np
import pytest
import torch

from mmfm.core.errors import ConfigError, TokenizerError
from mmfm.tokenization.visual.models import HiMTokConfig, HiMTokMaskTokenizer
from mmfm.tokenization.visual.quantizer import FiniteScalarQuantizer, VectorQuantizer
from mmfm.tokenization.visual.train import (
    VisualRecipe,
    _read,
    build,
    evaluate,
    load_visual,
    log_usage,
    same_bits_mask_baseline,
    save_visual,
    train_visual,
)

from helpers import TINY_VISUAL


def _counts(vq: VectorQuantizer, features: torch.Tensor) -> torch.Tensor:
    return torch.bincount(vq(features)[1].flatten(), minlength=vq.codebook_size)


def test_usage_warning_fires_on_a_collapsed_book_and_not_on_a_healthy_one(caplog):
    torch.manual_seed(0)
    features = torch.randn(4096, 16)
    healthy = VectorQuantizer(16, 256, code_dim=8).eval()
    collapsed = VectorQuantizer(16, 256, code_dim=8).eval()
    with torch.no_grad():  # every code the same direction: one code wins every argmax
        collapsed.codebook.copy_(collapsed.codebook[:1].expand(256, -1))
    with caplog.at_level(logging.INFO, logger="mmfm"):
        good = log_usage(10, 0.5, _counts(healthy, features), min_usage=0.1)
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
        bad = log_usage(20, 0.5, _counts(collapsed, features), min_usage=0.1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step 20: codebook collapsing" in warnings[0]
    assert good["perplexity"] > 0.1 * 256 and good["codes_in_use"] > 100
    assert bad["perplexity"] == pytest.approx(1.0) and bad["codes_in_use"] == 1
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info[0].startswith("step 10: loss 0.5000, codebook perplexity")


def test_training_logs_usage_each_log_step_and_eval_says_if_it_beats_the_baseline(
    tmp_path, real_data, caplog
):
    photos = real_data("photos")
    model = {"image_size": 32, "dim": 32, "heads": 2, "tokens": 4, "codebook_size": 16}
    recipe = VisualRecipe(
        kind="seed_image", output_dir=str(tmp_path / "out"),
        data=[str(photos / "camera.png"), str(photos / "coffee.png")],
        held_out=["coffee.png"], steps=4, batch_size=2, eval_items=2, log_every=2,
        min_code_usage=1.0, model=model,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="mmfm"):
        metrics = train_visual(recipe, False)
    # 8 codes drawn per log step can never reach a perplexity of 16: a warning each log step
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split(":")[0] for w in warned] == ["step 2", "step 4"]
    assert [u["step"] for u in metrics["train_usage"]] == [2, 4]
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())  # the verdict is saved;
    assert isinstance(saved["beats_baseline"], bool)  # its values: test_the_verdict_on_...
    assert saved["psnr"] > 0 and saved["psnr_same_bits_baseline"] > 0
    assert isinstance(saved["margin"], float)
    with pytest.raises(ConfigError, match="min_code_usage"):
        VisualRecipe(min_code_usage=2.0)


def test_mask_baseline_and_verdict():
    masks = torch.zeros(2, 32, 32, dtype=torch.uint8)
    masks[:, 8:24, 8:24] = 1
    assert torch.equal(same_bits_mask_baseline(masks, 16 * 16), masks)  # a 16 x 16 thumbnail
    model = HiMTokMaskTokenizer(
        HiMTokConfig(mask_size=32, stem=4, dim=32, heads=2, encoder_layers=1, latent_layers=1,
                     decoder_layers=1, tokens=4, codebook_size=64, levels=(8, 32),
                     level_weights=(1.0, 1.0), level_tokens=(1, 2))
    ).eval()  # fmt: skip
    metrics = evaluate(model, masks)  # 24 bits: a 4 x 4 thumbnail, blurred at the square's edge
    assert metrics["iou_same_bits_baseline"] == pytest.approx(0.90625)
    assert set(metrics) >= {"iou@1", "iou@2", "iou@4", "beats_baseline", "margin"}


class _Known(torch.nn.Module):
    """A tokenizer stand-in whose reconstruction is known from outside `evaluate`: it decodes
    any codes to `decoded`. 4 tokens of 16 codes (16 bits) for pictures, of 64 (24 bits) for
    masks."""

    def __init__(self, kind: str, decoded: torch.Tensor):
        super().__init__()
        self.kind, self.decoded, self.tokens_per_item = kind, decoded, 4
        self.num_codes = 64 if kind == "himtok_mask" else 16

    def encode(self, batch):
        return torch.zeros(len(batch), self.tokens_per_item, dtype=torch.long)

    def decode(self, codes):
        return self.decoded


def test_the_verdict_on_reconstructions_of_known_quality():
    masks = torch.zeros(2, 32, 32, dtype=torch.uint8)
    masks[:, 8:24, 8:24] = 1  # the 24-bit thumbnail's IoU: 0.90625 (above)
    perfect = evaluate(_Known("himtok_mask", masks), masks)
    assert perfect["iou@4"] == 1.0 and perfect["beats_baseline"] is True
    assert perfect["margin"] == pytest.approx(1 - 0.90625)
    blank = evaluate(_Known("himtok_mask", torch.zeros_like(masks)), masks)
    assert blank["iou@4"] == 0.0 and blank["beats_baseline"] is False
    assert blank["margin"] == pytest.approx(-0.90625)

    # A one-pixel checkerboard of black and white. 16 bits buy one RGB pixel: grey 127 or 128
    # of 255, off by 127.5 +- 0.5 everywhere: MSE 0.25 (to 1e-5), PSNR 10 log10(4) = 6.02 dB.
    board = (torch.arange(32)[:, None] + torch.arange(32)) % 2 * 2.0 - 1
    pictures = board.expand(1, 3, 32, 32).clone()
    exact = evaluate(_Known("seed_image", pictures), pictures)
    assert exact["psnr_same_bits_baseline"] == pytest.approx(6.0206, abs=1e-3)
    assert exact["psnr"] == pytest.approx(120.0)  # MSE 0, floored at 1e-12
    assert exact["beats_baseline"] is True
    assert exact["margin"] == pytest.approx(120.0 - 6.0206, abs=1e-3)
    inverted = evaluate(_Known("seed_image", -pictures), pictures)  # every pixel off by 1: 0 dB
    assert inverted["psnr"] == pytest.approx(0.0) and inverted["beats_baseline"] is False
    assert inverted["margin"] == pytest.approx(-6.0206, abs=1e-3)


def test_fsq_codes_cover_the_book_and_round_trip():
    torch.manual_seed(0)
    fsq = FiniteScalarQuantizer(16, (8, 8, 4, 4))
    z = 3 * torch.randn(8192, 16)
    out, codes, loss = fsq(z)
    assert codes.min() >= 0 and codes.max() < 1024 and codes.unique().numel() > 500
    assert torch.allclose(fsq.lookup(codes), out) and loss.item() == 0
    out.sum().backward()  # straight-through: the projection gets gradients
    assert fsq.proj_in.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="fsq_levels"):
        HiMTokMaskTokenizer(HiMTokConfig(quantizer="fsq", fsq_levels=(4, 4)))


def test_weights_of_another_quantizer_are_refused_by_name(tmp_path):
    save_visual(build(VisualRecipe(kind="seed_image", model=TINY_VISUAL["seed_image"])), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for new in ("quantizer", "fsq_levels"):  # as written before these fields existed
        del config[new]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_visual(tmp_path).cfg.quantizer == "vq"
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(quantizer="fsq", fsq_levels=[4, 4, 4])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"does not fit config\.json .*quantizer fsq"):
        load_visual(tmp_path)


def test_svg_icons_are_read_as_shape_masks(real_data):
    icon = next(p for p in sorted(real_data("svg").glob("*.svg")))
    (mask,) = _read(VisualRecipe(kind="himtok_mask"), icon, 32)
    assert mask.shape == (64, 64) and set(np.unique(mask).tolist()) == {0, 1}
    assert _read(VisualRecipe(kind="seed_image"), icon, 32) == []  # not an image source
