"""GPTModel checkpoints between megatron-core and mmfm, checked against megatron-core itself
(CPU, gloo, fp32).

megatron-core 0.16.0 cannot run `GPTModel.forward` or `dist_checkpointing.save` whole on a
CPU-only torch; docs/checkpoints.md's "Coming from Megatron-LM: checkpoints" says where. The
megatron side here therefore runs GPTModel's own stages (`embedding`, `decoder`,
`output_layer`) and megatron-core's own torch_dist writer, stepping only around those calls.
"""

import json
import os
import pickle
import re

import pytest
import torch

from mmfm.cli import main
from mmfm.config import ModelConfig
from mmfm.convert.megatron import (
    MegatronReader,
    from_megatron,
    fuse_qkv,
    import_megatron,
    model_config_from_megatron,
    read_megatron,
    split_qkv,
    stack_layers,
    to_megatron,
)
from mmfm.core.errors import ConversionError
from mmfm.model import build_model
from mmfm.testing import run_distributed
from mmfm.train.checkpoint import load_checkpoint_model
from mmfm.train.dcp_reader import UnsafeCheckpointError

from helpers import MEGATRON, require_or_skip

# One worker runs this file and the other files that need megatron-core (make test: --dist
# loadgroup), so its module fixtures are built once and megatron-core (~7 s of CPU) is imported
# once, at the first test instead of at every worker's collection.
pytestmark = pytest.mark.xdist_group("megatron")


@pytest.fixture(scope="module", autouse=True)
def _megatron_core():
    require_or_skip("megatron.core", MEGATRON)  # under CI=true (the test extra): fails, never skips


VOCAB, SEQ = 128, 12
ARGS = {
    "num_layers": 2,
    "hidden_size": 64,
    "ffn_hidden_size": 96,
    "num_attention_heads": 4,
    "group_query_attention": True,
    "num_query_groups": 2,
    "normalization": "RMSNorm",
    "norm_epsilon": 1e-5,
    "swiglu": True,
    "position_embedding_type": "rope",
    "rotary_base": 10000,
    "untie_embeddings_and_output_weights": True,
    "max_position_embeddings": 64,
}
TOKENS = torch.arange(2 * SEQ).reshape(2, SEQ) * 37 % VOCAB


def _gpt(tp: int, pp: int = 1):
    """megatron-core's GPTModel of ARGS (local layer spec) on CPU, in a gloo group: this
    rank's TP shard of its pipeline stage."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    config = TransformerConfig(
        num_layers=ARGS["num_layers"],
        hidden_size=ARGS["hidden_size"],
        ffn_hidden_size=ARGS["ffn_hidden_size"],
        num_attention_heads=ARGS["num_attention_heads"],
        num_query_groups=ARGS["num_query_groups"],
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        normalization="RMSNorm",
        layernorm_epsilon=ARGS["norm_epsilon"],
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_dropout_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=ARGS["max_position_embeddings"],
        position_embedding_type="rope",
        rotary_base=ARGS["rotary_base"],
        share_embeddings_and_output_weights=False,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    ).eval()


def _megatron_logits(model, received: torch.Tensor | None = None) -> torch.Tensor:
    """GPTModel.forward's own stages. On CPU three things are set up differently: the RoPE
    table is `RotaryEmbedding.get_emb`'s (whose first line moves `inv_freq` to CUDA), the
    attention-score buffer is a CPU tensor in megatron's global memory buffer (it allocates on
    CUDA), the causal mask is given (the default one is made on CUDA), and the RNG tracker is
    megatron's inference one (the training one forks CUDA RNG states even without dropout).
    A later pipeline stage starts from `received`, the earlier stage's output; a stage before
    the last gives its output."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    parallel_state.get_global_memory_buffer().buffer[("mpu", torch.float32)] = torch.empty(4096)
    positions = torch.arange(SEQ)[None].expand_as(TOKENS)
    freqs = model.rotary_pos_emb.get_freqs_non_repeated(SEQ)
    rope = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)[None, None]
    with torch.no_grad():
        if model.pre_process:
            hidden = model.embedding(input_ids=TOKENS, position_ids=positions)
        else:
            model.decoder.set_input_tensor(received)
            hidden = None
        hidden = model.decoder(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rope)
        if not model.post_process:
            return hidden
        logits, _ = model.output_layer(hidden)
    return logits.transpose(0, 1)


def _megatron_save(model, folder: str, metadata: dict | None = None) -> None:
    """megatron-core's torch_dist save, its own writer and planner. On CPU the GPU-to-host
    preload (`torch.cuda.synchronize`) is skipped (the tensors are on the host already), and
    the failure flag broadcast after `.metadata` is written (a CUDA tensor) fails: each rank
    checks it is that, then `metadata.json` is written by megatron's own finaliser."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    request = dist_checkpointing.save(
        model.sharded_state_dict(metadata=metadata),
        folder,
        TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1),
        async_sharded_save=True,
    )
    request.async_fn(*request.async_fn_args)
    with pytest.raises(AssertionError, match="CUDA"):
        request.finalize_fns[0]()
    for finalize in request.finalize_fns[1:]:
        finalize()


def _reference(folder: str):
    """A TP1 GPTModel with seeded weights (norms too, so that layers differ): saved by
    megatron-core, with its state dict, logits, and per-module outputs of layer 0."""
    model = _gpt(tp=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=gen)
            p.copy_(1 + noise if "layernorm" in name else noise)
    _megatron_save(model, folder)
    for layout in ("non_homogeneous_layers", "singleton_local_shards"):  # per-layer keys
        os.mkdir(f"{folder}_{layout}")
        _megatron_save(model, f"{folder}_{layout}", {layout: True})
    layer = model.decoder.layers[0]
    x = torch.randn(SEQ, 2, ARGS["hidden_size"], generator=gen)  # megatron: [seq, batch, dim]
    with torch.no_grad():
        q, k, v = layer.self_attention.get_query_key_value_tensors(x)[:3]
        mlp, _ = layer.mlp(x)
    state = {k: t.clone() for k, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    return state, _megatron_logits(model), {"x": x, "q": q, "k": k, "v": v, "mlp": mlp}


def _tp2_load_and_save(source: str, folder: str):
    """Each of 2 TP ranks loads `source` through megatron-core, runs it, saves it again."""
    from megatron.core import dist_checkpointing

    model = _gpt(tp=2)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), source))
    logits = _megatron_logits(model)  # this rank's half of the vocabulary
    _megatron_save(model, folder)
    return logits


def _tp2_then_pp2_load_and_save(source: str, folder: str, tp2_folder: str):
    """Each of 2 pipeline stages loads `source` through megatron-core, runs its layer (stage
    0's output broadcast to stage 1) and saves again; stage 1 gives the logits. First the
    same at TP2 (`_tp2_load_and_save`), in the same two processes: (TP2 logits, PP2 logits)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    half = _tp2_load_and_save(source, tp2_folder)
    model = _gpt(tp=1, pp=2)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), source))
    first = dist.get_rank() == 0
    hidden = _megatron_logits(model) if first else torch.empty(SEQ, 2, ARGS["hidden_size"])
    dist.broadcast(hidden, src=0)
    logits = None if first else _megatron_logits(model, hidden)
    _megatron_save(model, folder)
    return half, logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("megatron")
    (tmp / "meg").mkdir()
    (tmp / "args.json").write_text(json.dumps(ARGS))
    [(state, logits, parts)] = run_distributed(_reference, 1, (str(tmp / "meg"),))
    import_megatron(tmp / "meg", tmp / "mmfm", tmp / "args.json")
    return tmp, state, logits, parts


def test_megatron_checkpoint_runs_in_mmfm_with_megatrons_logits(converted):
    tmp, _, logits, parts = converted
    model, _ = load_checkpoint_model(tmp / "mmfm")
    with torch.no_grad():
        mine = model(TOKENS, torch.arange(SEQ)[None].expand_as(TOKENS), torch.zeros_like(TOKENS))
        # Each fused tensor on its own, against megatron-core's own split and MLP.
        x = parts["x"].transpose(0, 1)
        block = model.layers["0"]
        q, k, v = (getattr(block.attention, w)(x) for w in ("wq", "wk", "wv"))
        mlp = block.feed_forward(x)
    assert (mine - logits).abs().max() <= 1e-5
    for name, t in {"q": q, "k": k, "v": v}.items():
        theirs = parts[name].transpose(0, 1).reshape(t.shape)
        assert (t - theirs).abs().max() <= 1e-6, name
    assert (mlp - parts["mlp"].transpose(0, 1)).abs().max() <= 1e-6


@pytest.mark.slow  # two megatron-core processes, each importing it and saving through it
def test_mmfm_to_megatron_is_identical_and_loads_at_tp2_and_pp2(converted):
    tmp, _, logits, _ = converted
    main(["convert", "megatron", str(tmp / "mmfm"), str(tmp / "back")])
    original, back = read_megatron(tmp / "meg"), read_megatron(tmp / "back")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    assert json.loads((tmp / "back" / "megatron_args.json").read_text())["num_query_groups"] == 2
    # megatron-core loads mmfm's export into a TP2 model and into a PP2 one, runs them and
    # saves them TP2- and PP2-sharded.
    (tmp / "tp2").mkdir()
    (tmp / "pp2").mkdir()
    folders = (str(tmp / "back"), str(tmp / "pp2"), str(tmp / "tp2"))
    (half0, _), (half1, last) = run_distributed(_tp2_then_pp2_load_and_save, 2, folders)
    assert (torch.cat([half0, half1], dim=-1) - logits).abs().max() <= 1e-5
    assert (last - logits).abs().max() <= 1e-5
    # PP2 stores each stage's layer at its global offset of the stacked tensors (global ids,
    # no renumbering), so a PP-sharded checkpoint reads whole, as TP-sharded ones do.
    metadata = MegatronReader(tmp / "pp2").read_metadata().state_dict_metadata
    chunks = metadata["decoder.layers.self_attention.linear_proj.weight"].chunks
    assert sorted(tuple(c.offsets) for c in chunks) == [(0, 0, 0), (1, 0, 0)]  # one per stage
    for sharded in ("tp2", "pp2"):
        stored = read_megatron(tmp / sharded)
        assert original.keys() == stored.keys()
        assert all(torch.equal(original[k], stored[k]) for k in original)
        import_megatron(tmp / sharded, tmp / f"mmfm_{sharded}", tmp / "args.json")
        first, second = read_mmfm(tmp / "mmfm"), read_mmfm(tmp / f"mmfm_{sharded}")
        assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    ("layout", "key"),
    [
        ("non_homogeneous_layers", "decoder.layers.1.mlp.linear_fc1.weight"),
        ("singleton_local_shards", "decoder.layers.1.mlp.linear_fc1.weight_w"),
    ],
)
def test_checkpoints_with_per_layer_keys_import_the_same(converted, layout, key):
    """megatron-core's other layouts: a key per layer under its global id (as every stage of
    a PP run writes its own), SwiGLU halves apart in `singleton_local_shards`."""
    tmp = converted[0]
    folder = tmp / f"meg_{layout}"
    stored = read_megatron(folder)
    assert key in stored and "decoder.layers.mlp.linear_fc1.weight" not in stored
    import_megatron(folder, tmp / f"mmfm_{layout}", tmp / "args.json")
    first, second = read_mmfm(tmp / "mmfm"), read_mmfm(tmp / f"mmfm_{layout}")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    stage = {k: v for k, v in stored.items() if not k.startswith("decoder.layers.0.")}
    with pytest.raises(ConversionError, match=r"decoder\.layers\.0\..* is missing"):
        stack_layers(stage)


def test_module_state_dict_names_of_the_local_spec_map_too(converted):
    tmp, state, _, _ = converted
    cfg = model_config_from_megatron(ARGS, _shapes(tmp / "meg"), "ARGS")
    imported = read_mmfm(tmp / "mmfm")
    mine = from_megatron(state, cfg)  # decoder.layers.{i}.input_layernorm.weight, ...
    assert mine.keys() == imported.keys()
    assert all(torch.equal(mine[k], imported[k]) for k in mine)


# Transformer Engine's layer spec (get_gpt_layer_with_transformer_engine_spec) folds each
# norm into the linear after it (TELayerNormColumnParallelLinear: `layer_norm_weight`; the
# spec's input_layernorm / pre_mlp_layernorm are IdentityOp) and gives every TE module an
# `_extra_state` (fp8 metadata). TE cannot be installed here (it builds against CUDA), so its
# state dict is made from the local spec's by exactly that renaming.
TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
TE_EXTRA = ("linear_qkv", "linear_proj", "core_attention")


def _te_state(local: dict) -> dict:
    te = {}
    for name, tensor in local.items():
        layer, _, rest = name.partition(".layers.")
        index, _, suffix = rest.partition(".")
        te[f"{layer}.layers.{index}.{TE_NAMES[suffix]}" if suffix in TE_NAMES else name] = tensor
    for i in range(ARGS["num_layers"]):
        extra = [f"self_attention.{m}" for m in TE_EXTRA] + ["mlp.linear_fc1", "mlp.linear_fc2"]
        te |= {f"decoder.layers.{i}.{m}._extra_state": torch.zeros(0) for m in extra}
    return te


def test_transformer_engine_names_map_both_ways(converted):
    tmp, state, _, _ = converted
    te = _te_state(state)
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te
    assert not any("layernorm" in k for k in te if k.startswith("decoder.layers."))
    cfg = model_config_from_megatron(ARGS, _shapes(tmp / "meg"), "ARGS")
    imported = read_mmfm(tmp / "mmfm")
    mine = from_megatron(te, cfg)
    assert mine.keys() == imported.keys()
    assert all(torch.equal(mine[k], imported[k]) for k in mine)
    stacked = to_megatron(imported, cfg)  # back: torch_dist's stacked names are TE's
    for name, tensor in te.items():
        if name.endswith("_extra_state"):
            continue
        match = re.match(r"decoder\.layers\.(\d+)\.(.+)", name)
        theirs = stacked[f"decoder.layers.{match[2]}"][int(match[1])] if match else stacked[name]
        assert torch.equal(theirs, tensor), name


def _shapes(folder):
    return {k: tuple(v.shape) for k, v in read_megatron(folder).items()}


def read_mmfm(folder):
    model, _ = load_checkpoint_model(folder)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"normalization": "LayerNorm"}, "normalization='LayerNorm'"),
        ({"swiglu": False}, "swiglu=False"),
        ({"rotary_interleaved": True}, "rotary_interleaved=True"),
        ({"rotary_percent": 0.5}, "rotary_percent=0.5"),
        ({"use_rope_scaling": True}, "use_rope_scaling=True"),
        ({"num_experts": 8}, "num_experts=8"),
        ({"qk_layernorm": True}, "qk_layernorm=True"),
        ({"add_bias_linear": True}, "add_bias_linear=True"),
        ({"position_embedding_type": "learned_absolute"}, "position_embedding_type="),
        ({"apply_layernorm_1p": True}, "apply_layernorm_1p=True"),
        ({"multi_latent_attention": True}, "multi_latent_attention=True"),
        ({"window_size": [128, 0]}, "window_size=[128, 0]"),
        ({"softmax_type": "learnable"}, "softmax_type='learnable'"),
        ({"hidden_size": 128}, "hidden_size=128 but the checkpoint's weights have 64"),
        ({"num_query_groups": 4}, "with 4 query groups does not match"),
        (
            {"untie_embeddings_and_output_weights": False},
            "untie_embeddings_and_output_weights=False but the checkpoint has",
        ),
    ],
)
def test_what_mmfm_cannot_run_is_refused(converted, change, named):
    tmp = converted[0]
    with pytest.raises(ConversionError, match=re.escape(named)):
        model_config_from_megatron({**ARGS, **change}, _shapes(tmp / "meg"), "args.json")


class _Evil:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_unknown_weights_missing_args_and_legacy_checkpoints_are_refused(
    converted, tmp_path, capsys
):
    tmp = converted[0]
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "from-megatron", str(tmp / "meg"), str(tmp_path / "out")])
    assert exit_.value.code == 1
    assert "conversion error: " in capsys.readouterr().err
    with pytest.raises(ConversionError, match=r"no megatron_args\.json: pass --args"):
        import_megatron(tmp / "meg", tmp_path / "out")
    with pytest.raises(ConversionError, match="not a torch_dist checkpoint"):
        import_megatron(tmp_path, tmp_path / "out", tmp / "args.json")
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system; refusing"):
        import_megatron(tmp_path / "evil", tmp_path / "out", tmp / "args.json")
    cfg = model_config_from_megatron(ARGS, _shapes(tmp / "meg"), "ARGS")
    router = {"decoder.layers.0.mlp.router.weight": torch.zeros(8, 64)}
    with pytest.raises(KeyError, match=r"mlp\.router\.weight"):
        from_megatron(router, cfg)


def test_the_fused_qkv_interleaves_query_groups():
    """Rows labelled by (head, row): q heads 0,1 then k 0 then v 0 form group 0."""
    cfg = model_config_from_megatron(
        ARGS,
        {
            "decoder.layers.mlp.linear_fc1.weight": (2, 192, 64),
            "embedding.word_embeddings.weight": (VOCAB, 64),
            "output_layer.weight": (VOCAB, 64),
            "decoder.layers.self_attention.linear_qkv.weight": (2, 128, 64),
        },
        "ARGS",
    )
    hd = cfg.head_dim
    q, k, v = (
        torch.arange(n * hd)[:, None] + offset for n, offset in ((4, 0), (2, 1000), (2, 2000))
    )
    fused = fuse_qkv(q, k, v, cfg)
    group0 = torch.cat([q[: 2 * hd], k[:hd], v[:hd]])
    assert torch.equal(fused[: 4 * hd], group0)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, cfg), (q, k, v), strict=True))


@pytest.mark.parametrize("variant", ["tied", "qkv_bias"])
def test_tied_and_biased_models_round_trip_through_the_names(variant):
    """mmfm -> torch_dist names -> mmfm, identical, for the variants the GPTModel above is not."""
    cfg = ModelConfig(
        vocab_size=VOCAB,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=96,
        tie_embeddings=variant == "tied",
        qkv_bias=variant == "qkv_bias",
    )
    gen = torch.Generator().manual_seed(1)
    state = {
        name: torch.randn(p.shape, generator=gen) for name, p in build_model(cfg).named_parameters()
    }
    stored = to_megatron(state, cfg)
    assert ("output_layer.weight" in stored) is (variant != "tied")
    assert ("decoder.layers.self_attention.linear_qkv.bias" in stored) is (variant == "qkv_bias")
    back = from_megatron(stored, cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
