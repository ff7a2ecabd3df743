"""HiMTok's DCT architecture: every prefix decodes, later tokens cannot change it, and the
fixed basis is rebuilt identically on load."""

import json

import pytest
import torch

from mmfm.core.errors import ConfigError
from mmfm.tokenization.visual.models import HiMTokConfig, HiMTokMaskTokenizer, dct_basis
from mmfm.tokenization.visual.train import load_visual, save_visual

TINY = dict(
    mask_size=16,
    tokens=8,
    dim=8,
    hidden=32,
    coefficients=32,
    codebook_size=16,
    quantizer="fsq",
    fsq_levels=(2, 2, 2, 2),
    levels=(4, 16),
    level_weights=(1.0, 1.0),
    full_prefix=True,
)


def _model() -> HiMTokMaskTokenizer:
    torch.manual_seed(0)
    return HiMTokMaskTokenizer(HiMTokConfig(architecture="dct", **TINY)).eval()


def _masks() -> torch.Tensor:
    return (torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).byte()


def test_basis_is_orthonormal_and_starts_with_the_mean():
    basis = dct_basis(16, 32)
    assert torch.allclose(basis @ basis.t(), torch.eye(32), atol=1e-5)
    assert torch.allclose(basis[0], torch.full((256,), 1 / 16))
    assert basis[1:3].abs().amax(1).lt(0.2).all()  # then the two lowest frequencies


def test_every_prefix_decodes_to_a_mask():
    model = _model()
    codes = model.encode(_masks())
    assert codes.shape == (3, 8) and codes.max() < model.num_codes
    for k in range(1, 9):
        mask = model.decode(codes[:, :k])
        assert mask.shape == (3, 16, 16) and mask.dtype == torch.uint8
        assert set(mask.unique().tolist()) <= {0, 1}


def test_hidden_tokens_cannot_change_a_prefix():
    model = _model()
    z = model.quantizer.lookup(model.encode(_masks()))
    noisy = z.clone()
    noisy[:, 3:] = torch.randn_like(noisy[:, 3:])
    keep = torch.full((3,), 3)
    assert torch.equal(model._logits(z, keep), model._logits(noisy, keep))
    assert not torch.equal(model._logits(z, keep + 1), model._logits(noisy, keep + 1))


def test_training_step_reaches_the_encoder():
    model = _model().train()
    model(_masks())["loss"].backward()
    assert model.dct_encoder[0].weight.grad.abs().sum() > 0  # through the FSQ's straight-through


def test_round_trip_rebuilds_the_basis(tmp_path):
    model = _model()
    save_visual(model, tmp_path)
    loaded = load_visual(tmp_path)
    assert "basis" not in model.state_dict()  # fixed: rebuilt from the config, not saved
    assert torch.equal(loaded.basis, model.basis)
    codes = model.encode(_masks())
    assert torch.equal(loaded.encode(_masks()), codes)
    assert torch.equal(loaded.decode(codes[:, :2]), model.decode(codes[:, :2]))


def test_bad_architecture_fields_are_config_errors():
    with pytest.raises(ConfigError, match=r"model\.architecture 'unet'"):
        HiMTokMaskTokenizer(HiMTokConfig(architecture="unet", **TINY))
    with pytest.raises(ConfigError, match=r"model\.coefficients 257"):
        HiMTokMaskTokenizer(HiMTokConfig(architecture="dct", **{**TINY, "coefficients": 257}))


def test_checkpoint_saved_before_the_fields_loads_as_transformer(tmp_path):
    torch.manual_seed(0)
    small = dict(mask_size=16, stem=4, dim=16, heads=2, tokens=4, codebook_size=16)
    model = HiMTokMaskTokenizer(HiMTokConfig(levels=(4, 16), level_weights=(1.0, 1.0), **small))
    save_visual(model.eval(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for field in ("architecture", "coefficients", "hidden"):
        del cfg[field]  # as written before the fields existed
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_visual(tmp_path)
    assert loaded.cfg.architecture == "transformer"
    assert torch.equal(loaded.encode(_masks()), model.encode(_masks()))
