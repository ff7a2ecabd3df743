"""Mixture-of-Transformers (model.mot): the config's rules, routing by input id on hand-made
rows, one group = the dense model, global attention, the KV cache, upcycling a dense
checkpoint and the refused export. The parallel layouts are in distributed/test_parity.py."""

from dataclasses import replace

import pytest
import torch

from mmfm.config import ConfigError, load_config, save_config
from mmfm.config.schema import ModelConfig, MotConfig
from mmfm.convert.hf import export_hf
from mmfm.convert.megatron import export_megatron
from mmfm.core.errors import ConversionError
from mmfm.data.demo import DEMO_RANGES, DEMO_VOCAB_SIZE, DNA_OFFSET, IMAGE_OFFSET, SPECIAL
from mmfm.data.demo import TEXT_OFFSET as TEXT
from mmfm.model import build_model, init_weights
from mmfm.model.cache import KVCache
from mmfm.model.mot import token_groups, upcycled_name
from mmfm.testing import read_metrics, train_metrics
from mmfm.tokenization.vocab import Vocab
from mmfm.train.checkpoint import CONFIG_FILE

TWO = {"language": ["text", "dna", "svg"], "vision": ["image", "mask", "video"]}
ONE = {"all": ["text", "dna", "svg", "image", "mask", "video"]}
SHAPE = dict(vocab_size=DEMO_VOCAB_SIZE, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)


def model_of(groups: dict, seed: int = 0, **mot):
    cfg = ModelConfig(**SHAPE, attention="docs")
    if groups:
        cfg = replace(cfg, mot=MotConfig(groups=groups, ranges=list(DEMO_RANGES), **mot))
    model = build_model(cfg)
    model.to_empty(device="cpu")
    init_weights(model, cfg, seed)
    return model


def packed_rows():
    """Two rows of documents that mix every demo range: a caption and a picture, a DNA task."""
    image = [SPECIAL["<bos>"], TEXT + 97, SPECIAL["<img>"], *range(IMAGE_OFFSET, IMAGE_OFFSET + 6)]
    image += [SPECIAL["</img>"], SPECIAL["<eos>"]]
    dna = [SPECIAL["<bos>"], SPECIAL["<dna>"], DNA_OFFSET, DNA_OFFSET + 3, SPECIAL["</dna>"]]
    dna += [SPECIAL["<sep>"], TEXT + 121, SPECIAL["<eos>"]]
    text = [SPECIAL["<bos>"], *range(TEXT + 100, TEXT + 106)]
    rows = [(image, text[:6]), (dna, image[:9])]
    tokens = torch.tensor([first + second for first, second in rows])
    doc_ids = torch.tensor([[0] * len(first) + [1] * len(second) for first, second in rows])
    positions = torch.tensor([[*range(len(a)), *range(len(b))] for a, b in rows])
    return tokens, positions, doc_ids


def test_config_names_every_modality_once():
    assert MotConfig(groups=TWO, ranges=list(DEMO_RANGES)).id_groups() == [
        (0, 0),
        (IMAGE_OFFSET, 1),
        (DNA_OFFSET, 0),
    ]
    with pytest.raises(ConfigError, match="leaves out image, mask, video"):
        MotConfig(groups={"language": ["text", "dna", "svg"]})
    with pytest.raises(ConfigError, match="puts text in both"):
        MotConfig(groups={**TWO, "more": ["text"]})
    with pytest.raises(ConfigError, match=r"svg .* apart from text"):
        MotConfig(groups={"a": ["text", "dna"], "b": ["image", "mask", "video", "svg"]})
    with pytest.raises(ConfigError, match=r"model\.mot\.specials='nope'"):
        MotConfig(groups=TWO, specials="nope")
    with pytest.raises(ConfigError, match="must start at 0 and increase"):
        MotConfig(groups=TWO, ranges=["0:text", "10:image", "5:dna"])
    with pytest.raises(ConfigError, match="sequence_parallel=false"):
        load_config(None, ["model.mot.groups={all: [text, dna, svg, image, mask, video]}",
                           "parallel.tp=2"])  # fmt: skip


def test_vocab_ranges_route_delimiters_to_the_specials_group():
    vocab = Vocab.build(100, codebooks=[("image", 8), ("mask", 4), ("video", 4), ("dna", 4)])
    mot = MotConfig(groups=TWO, specials="vision", ranges=vocab.id_ranges())
    ids = torch.tensor([[0, 99, vocab.special("<img>"), vocab.code_id("image", 3),
                         vocab.code_id("dna", 1), vocab.code_id("video", 0)]])  # fmt: skip
    assert token_groups(mot.id_groups(), ids).tolist() == [[0, 0, 1, 1, 0, 1]]


@pytest.mark.parametrize("specials", ["", "vision"])
def test_every_token_reaches_its_group(specials):
    """The first block's group norms see exactly the embeddings of their group's tokens (row
    order kept), decided by the input id: specials and delimiters go to `specials`."""
    model = model_of(TWO, specials=specials)
    tokens, positions, doc_ids = packed_rows()
    seen = {}
    for name, group in model.layers["0"].groups.items():
        group.attention_norm.register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, args[0])
        )
    model(tokens, positions, doc_ids)
    vision = (tokens >= IMAGE_OFFSET) & (tokens < DNA_OFFSET)
    if specials:
        vision |= tokens < TEXT
    embedded = model.tok_embeddings(tokens)
    assert torch.equal(seen["vision"], embedded[vision])
    assert torch.equal(seen["language"], embedded[~vision])
    assert 0 < int(vision.sum()) < tokens.numel()


@pytest.mark.parametrize("share_attention", [False, True])
def test_one_group_is_the_dense_model(share_attention):
    dense = model_of({})
    mot = model_of(ONE, seed=1, share_attention=share_attention)
    weights = dense.state_dict()
    mot.load_state_dict({name: weights[upcycled_name(name)] for name in mot.state_dict()})
    tokens, positions, doc_ids = packed_rows()
    want, got = dense(tokens, positions, doc_ids), mot(tokens, positions, doc_ids)
    assert torch.equal(got, want)
    want.square().mean().backward()
    got.square().mean().backward()
    grads = dict(dense.named_parameters())
    for name, param in mot.named_parameters():
        assert torch.equal(param.grad, grads[upcycled_name(name)].grad), name


def test_groups_have_their_own_weights_and_attention_stays_global():
    model = model_of(TWO)
    tokens, positions, doc_ids = packed_rows()
    before = model(tokens, positions, doc_ids).detach()
    with torch.no_grad():  # change the vision group's feed-forward only
        model.layers["1"].groups["vision"].feed_forward.w2.weight.mul_(3)
    after = model(tokens, positions, doc_ids).detach()
    vision = (tokens >= IMAGE_OFFSET) & (tokens < DNA_OFFSET)
    changed = (after - before).abs().amax(-1) > 0
    # The last block's feed-forward acts per token: exactly the vision tokens change.
    assert torch.equal(changed, vision)
    with torch.no_grad():  # an earlier block's vision weights reach later text tokens
        model.layers["0"].groups["vision"].attention.wv.weight.mul_(3)
    later = model(tokens, positions, doc_ids).detach()
    text_after_picture = (~vision) & (doc_ids == 0) & (torch.arange(tokens.shape[1]) > 9)
    assert ((later - after).abs().amax(-1) > 0)[text_after_picture].all()


def test_kv_cache_decoding_matches_the_full_forward():
    model = model_of(TWO).eval()
    tokens, positions, _ = packed_rows()
    tokens, positions = tokens[:1], positions[:1, :12]  # the caption and picture document
    tokens = tokens[:, :12]
    full = model(tokens, positions, torch.zeros_like(tokens))
    cache = KVCache(model.cfg, batch=1, max_len=16)
    steps = [model(tokens[:, :5], positions[:, :5], torch.zeros_like(tokens[:, :5]), cache)]
    for t in range(5, 12):
        one = tokens[:, t : t + 1]
        steps.append(model(one, positions[:, t : t + 1], torch.zeros_like(one), cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_export_refuses_mot(tmp_path):
    checkpoint = tmp_path / "step_1"
    checkpoint.mkdir()
    save_config(load_config(None, [f"model.mot.groups={TWO}"]), checkpoint / CONFIG_FILE)
    (checkpoint / ".metadata").write_bytes(b"")  # refused before any weight is read
    with pytest.raises(ConversionError, match=r"Mixture-of-Transformers .* nothing is exported"):
        export_hf(checkpoint, tmp_path / "hf")
    with pytest.raises(ConversionError, match=r"GPTModel has no architecture"):
        export_megatron(checkpoint, tmp_path / "megatron")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "megatron").exists()


@pytest.mark.slow  # three tiny runs: 18 s on 2 loaded cores
def test_upcycling_a_dense_checkpoint(tmp_path):
    """train.init_from a dense checkpoint puts its blocks into every group: the first step's
    loss is the dense model's from the same weights."""
    common = [
        f"model.vocab_size={DEMO_VOCAB_SIZE}",
        *(f"model.{k}={v}" for k, v in SHAPE.items() if k != "vocab_size"),
        "model.max_seq_len=64",
        "data.seq_len=64",
        "data.paths=[builtin:demo]",
        "data.num_workers=0",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.global_batch_size=2",
        "train.micro_batch_size=2",
        "logging.progress=false",
        "logging.tensorboard=false",
        "train.steps=1",
    ]
    dense_run = tmp_path / "dense"
    train_metrics([*common, f"train.run_dir={dense_run}"])
    start = dense_run / "checkpoints" / "step_1"
    again = train_metrics([*common, f"train.init_from={start}", f"train.run_dir={tmp_path / 'a'}"])
    mot = "model.mot.groups={language: [text, dna, svg], vision: [image, mask, video]}"
    run = tmp_path / "mot"
    upcycled = train_metrics([*common, mot, f"train.init_from={start}", f"train.run_dir={run}"])
    assert upcycled[0]["loss"] == pytest.approx(again[0]["loss"], rel=1e-6)
    assert read_metrics(run)[0]["grad_norm"] != again[0]["grad_norm"]  # two groups' gradients
