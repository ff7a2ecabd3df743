"""The SEED-style image tokenizer's PCA frontend: a frozen basis fitted on training crops,
stored with the weights, and a tokenizer that beats its same-bits baseline on real photos."""

import json

import pytest
import torch

from mmfm.core.errors import ConfigError, TokenizerError
from mmfm.tokenization.visual.layers import PCABasis
from mmfm.tokenization.visual.models import SeedImageConfig, SeedImageTokenizer
from mmfm.tokenization.visual.train import (
    VisualRecipe,
    _read,
    load_visual,
    save_visual,
    train_visual,
)
from mmfm.tokenization.visual.weights import export_published

PCA = {"image_size": 16, "dim": 16, "heads": 2, "tokens": 4, "codebook_size": 64,
       "frontend": "pca", "components": 24, "qformer_layers": 1, "decoder_hidden": 32,
       "quantizer": "fsq", "fsq_levels": [4, 4, 4]}  # fmt: skip


TRAINING = (
    "astronaut.png",
    "camera.png",
    "coins.png",
    "motorcycle_left.png",
    "rocket.jpg",
    "brick.png",
    "grass.png",
    "retina.jpg",
)


def test_basis_is_whitened_and_exact_on_its_span():
    torch.manual_seed(0)
    mixing = torch.randn(6, 40) * torch.tensor([9.0, 5, 3, 2, 1, 0.5])[:, None]
    samples = torch.randn(500, 6) @ mixing + 3.0  # rank 6 around a mean of 3
    basis = PCABasis(40, 6)
    basis.fit(samples)
    coefficients = basis.analyse(samples)
    assert coefficients.mean(0).abs().max() < 1e-4
    assert torch.allclose(coefficients.std(0, correction=0), torch.ones(6), atol=1e-3)
    assert (basis.scale[:-1] >= basis.scale[1:]).all()  # leading components first
    assert torch.allclose(basis.synthesise(coefficients), samples, atol=1e-3)
    with pytest.raises(ValueError, match="needs >= 6 samples"):
        PCABasis(40, 6).fit(samples[:5])


def test_an_unfitted_basis_is_refused_and_a_fitted_one_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = SeedImageTokenizer(SeedImageConfig(**PCA)).eval()
    images = torch.rand(64, 3, 16, 16) * 2 - 1
    with pytest.raises(TokenizerError, match="never fitted"):
        model.encode(images)
    model.fit(images)
    codes = model.encode(images)
    assert codes.shape == (64, 4) and int(codes.max()) < 64
    save_visual(model, tmp_path)
    loaded = load_visual(tmp_path)
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_pca_weights_export_in_mmfm_layout_only():
    torch.manual_seed(0)
    model = SeedImageTokenizer(SeedImageConfig(**PCA))
    assert "basis.components" in export_published(model, "mmfm")  # the basis travels along
    with pytest.raises(TokenizerError, match="'titok' maps the patch frontend only"):
        export_published(model, "titok")


def test_bad_frontends_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"model\.frontend 'cnn' is not patches or pca"):
        SeedImageTokenizer(SeedImageConfig(**{**PCA, "frontend": "cnn"}))
    with pytest.raises(ConfigError, match="feature_loss needs frontend: patches"):
        SeedImageTokenizer(SeedImageConfig(**{**PCA, "feature_loss": 0.5}))


@pytest.mark.slow  # fits and evaluates on the real photos: 37 s on 2 loaded cores
def test_pca_tokenizer_beats_its_same_bits_baseline_on_held_out_photos(tmp_path, real_data):
    """32 x 32 crops, 8 tokens of 64 codes (48 bits: the baseline is the picture's mean
    colour, a 1 x 1 thumbnail): in 150 steps the pca frontend codes more than that. The
    recipe's 64 x 64, 416-bit run against a 4 x 4 thumbnail is bench/visual_tokenizers.py's."""
    photos = real_data("photos")
    model = {**PCA, "image_size": 32, "tokens": 8, "components": 64}
    recipe = VisualRecipe(
        kind="seed_image", output_dir=str(tmp_path / "out"),
        data=[str(photos / name) for name in (*TRAINING, "chelsea.png", "coffee.png")],
        held_out=["chelsea.png", "coffee.png"], steps=150, batch_size=32, lr=2e-3,
        eval_items=32, fit_items=512, model=model,
    )  # fmt: skip
    metrics = train_visual(recipe, progress=False)
    assert metrics["bits_per_item"] == 48
    assert metrics["beats_baseline"] and metrics["margin"] > 0, metrics["margin"]
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["psnr"] == pytest.approx(metrics["psnr"])


def test_image_recipes_train_on_video_frames_too(real_data):
    """A clip in an image recipe's data gives its frames (at `fps`, up to `max_frames`) as more
    training pictures; frames smaller than the tokenizer's size are left out."""
    clip = real_data("video") / "carphone_pristine.mp4"  # 176 x 144, 30 fps
    recipe = VisualRecipe(kind="seed_image", fps=2.0, max_frames=3)
    frames = _read(recipe, clip, 64)
    assert len(frames) == 3 and all(f.shape == (144, 176, 3) for f in frames)
    assert _read(recipe, clip, 160) == []
