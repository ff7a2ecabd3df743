"""HiMTok's pooled latent queries: new checkpoints keep them, older ones still load."""

import json

import pytest
import torch

from mmfm.core.errors import TokenizerError
from mmfm.tokenization.visual.models import HiMTokConfig, HiMTokMaskTokenizer
from mmfm.tokenization.visual.train import load_visual, save_visual

TINY = dict(mask_size=16, stem=4, dim=32, heads=2, tokens=4, codebook_size=16, levels=(4, 16))


def _model(**kw) -> HiMTokMaskTokenizer:
    torch.manual_seed(0)
    return HiMTokMaskTokenizer(HiMTokConfig(level_weights=(1.0, 1.0), **TINY, **kw)).eval()


def _masks() -> torch.Tensor:
    return (torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).byte()


def test_pooled_queries_round_trip(tmp_path):
    model = _model()
    assert model.query_pool is not None
    save_visual(model, tmp_path)
    loaded = load_visual(tmp_path)
    assert torch.equal(loaded.query_pool, model.query_pool)
    assert torch.equal(loaded.encode(_masks()), model.encode(_masks()))


def test_checkpoint_saved_before_the_field_loads_without_pooling(tmp_path):
    model = _model(query_pool=False)
    save_visual(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["query_pool"]  # as written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_visual(tmp_path)
    assert loaded.query_pool is None
    assert torch.equal(loaded.encode(_masks()), model.encode(_masks()))


def test_pooled_weights_under_an_old_config_are_refused(tmp_path):
    save_visual(_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["query_pool"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match=r"does not fit config\.json"):
        load_visual(tmp_path)
