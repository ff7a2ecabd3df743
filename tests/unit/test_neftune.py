"""NEFTune (model.neftune_alpha): noise on the input embeddings in training, none in eval."""

import math

import pytest
import torch

from mmfm.config import ModelConfig, load_config
from mmfm.core.errors import ConfigError
from mmfm.model import build_model, init_weights
from mmfm.testing import packed_batch

SEQ, DIM = 12, 16


def tiny(alpha: float):
    cfg = ModelConfig(
        vocab_size=32, dim=DIM, n_layers=1, n_heads=2, max_seq_len=SEQ, neftune_alpha=alpha
    )
    model = build_model(cfg).to_empty(device="cpu")
    init_weights(model, cfg, seed=0)
    return model


def block_input(model, batch) -> torch.Tensor:
    """What the first block gets: the embeddings plus the noise, if any."""
    seen = []
    hook = model.layers["0"].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    logits = model(batch.tokens, batch.positions, batch.doc_ids)
    hook.remove()
    return seen[0], logits


def test_neftune_adds_bounded_uniform_noise_in_training_only():
    batch = packed_batch([[5, 7], [12]], vocab_size=32)
    noisy, plain = tiny(alpha=5.0), tiny(alpha=0.0)
    embeddings = plain.tok_embeddings(batch.tokens)
    with torch.no_grad():
        noisy.eval()
        h, logits = block_input(noisy, batch)
        assert h.equal(embeddings) and logits.equal(block_input(plain, batch)[1])
        noisy.train()
        torch.manual_seed(0)
        h, logits = block_input(noisy, batch)
        torch.manual_seed(0)
        again, _ = block_input(noisy, batch)  # deterministic from the seed
        fresh, _ = block_input(noisy, batch)  # and new noise on every forward
    noise = h - embeddings
    scale = 5.0 / math.sqrt(SEQ * DIM)
    assert again.equal(h) and not fresh.equal(h)
    assert noise.abs().max() <= scale * (1 + 1e-6)
    assert noise.abs().max() > 0.9 * scale  # 384 uniform draws reach the bound
    assert noise.std().item() == pytest.approx(scale / math.sqrt(3), rel=0.15)
    noisy.train()
    noisy.tok_embeddings.eval()  # a pipeline stage in eval: only its shared modules switch
    with torch.no_grad():
        assert block_input(noisy, batch)[0].equal(embeddings)


@pytest.mark.parametrize("layout", [["parallel.cp=2"], ["parallel.tp=2"]])
def test_neftune_refuses_layouts_that_split_a_row(layout):
    base = ["model.neftune_alpha=5", "model.vocab_size=64", "model.n_kv_heads=2"]
    with pytest.raises(ConfigError, match="neftune_alpha"):
        load_config(None, [*base, *layout])
    if layout == ["parallel.tp=2"]:  # replicated embeddings: accepted
        load_config(None, [*base, *layout, "parallel.sequence_parallel=false"])
