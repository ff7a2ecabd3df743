"""Hugging Face export and import, checked against `transformers` itself (offline, CPU, fp32)."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from mmfm.config import load_config
from mmfm.convert.hf import export_hf, import_hf
from mmfm.core.errors import ConversionError
from mmfm.core.types import Modality, TextRecord
from mmfm.data.shards import write_shard
from mmfm.decoding.engine import generate
from mmfm.decoding.sampling import Sampling
from mmfm.testing import run_distributed, tiny_shape, train_metrics
from mmfm.tokenization.document import DocumentBuilder
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.vocab import Vocab
from mmfm.train.checkpoint import load_checkpoint_model
from mmfm.train.command import build_trainer

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_hf")

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["In the beginning God created the heaven and the earth.", "def f(x):\n\treturn x  # ok"]
TEXTS += ["漢字 😀 naïve café", "  spaces   and\nnewlines\n", "<svg> is text to mmfm"]


@pytest.fixture(scope="module")
def base():
    recipe = load_recipe(REPO / "tokenizers/base.yaml", [f"output_dir={REPO}/tokenizers/base"])
    return Tokenizers.load(recipe)


def documents(tok: Tokenizers, n=60, seed=0):
    """Text, image-code and DNA documents in the base vocabulary."""
    rng = np.random.default_rng(seed)
    v, docs = tok.vocab, []
    for i in range(n):
        if i % 3 == 0:
            docs.append(tok.encode(TextRecord(f"t{i}", TEXTS[i % len(TEXTS)] * (1 + i % 4))))
            continue
        modality, book = (Modality.IMAGE, "image") if i % 3 == 1 else (Modality.DNA, "dna")
        start, end = v.delimiters(modality)
        codes = [v.code_id(book, int(c)) for c in rng.integers(0, 64, 32)]
        doc = DocumentBuilder().add([1], Modality.TEXT).add([start, *codes, end], modality)
        docs.append(doc.add([2], Modality.TEXT).build(f"d{i}"))
    return docs


def overrides(tmp_path, vocab_size):
    return [
        f"data.paths=[{tmp_path / 'shards'}]",
        f"data.vocab={REPO}/tokenizers/base/vocab.json",
        f"model.vocab_size={vocab_size}",
        *tiny_shape(n_layers=4, seq_len=128),
        "data.num_workers=0",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.steps=3",
        "optim.lr=3e-3",
        "optim.warmup_steps=1",
        "logging.progress=false",
        "logging.tensorboard=false",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base):
    """A tiny model trained 3 steps on the base vocabulary, and its checkpoint."""
    tmp = tmp_path_factory.mktemp("trained")
    (tmp / "shards").mkdir()
    docs = documents(base)
    write_shard(tmp / "shards" / "d-000000.tar", docs[:30])
    write_shard(tmp / "shards" / "d-000001.tar", docs[30:])
    vocab_size = -(-base.vocab.size // 64) * 64
    train_metrics([*overrides(tmp, vocab_size), f"train.run_dir={tmp / 'run'}"])
    return tmp, tmp / "run" / "checkpoints" / "step_3"


def single_documents(tok):
    v = tok.vocab
    text = tok.encode(TextRecord("t", TEXTS[0])).tokens.tolist()
    image = [
        1,
        v.special("<img>"),
        *(v.code_id("image", c) for c in (5, 9, 33)),
        v.special("</img>"),
    ]
    dna = [
        1,
        v.special("<dna>"),
        *(v.code_id("dna", c) for c in (0, 100, 7000)),
        v.special("</dna>"),
    ]
    return {"text": text, "image": image, "dna": dna}


def assert_hf_matches(ckpt: Path, out: Path, tok: Tokenizers):
    model, _ = load_checkpoint_model(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    for name, ids in single_documents(tok).items():
        x = torch.tensor([ids])
        with torch.no_grad():
            mine = model(x, torch.arange(len(ids))[None], torch.zeros_like(x))
            theirs = hf(x).logits
        assert (mine - theirs).abs().max() <= 1e-4, name
        generated = hf.generate(x, max_new_tokens=20, do_sample=False, eos_token_id=None)
        mine = generate(model, [ids], Sampling(max_new_tokens=20), stop_at_eos=False)[0]
        assert mine == generated[0, len(ids) :].tolist(), name


def test_export_loads_in_transformers_with_identical_logits(trained, base):
    tmp, ckpt = trained
    out = export_hf(ckpt, tmp / "hf", dtype="fp32", max_shard="1MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "generation_config.json").is_file() and (out / "mmfm_vocab.json").is_file()
    assert_hf_matches(ckpt, out, base)


def test_hf_tokenizer_gives_mmfm_ids(trained, base):
    tmp, ckpt = trained
    out = tmp / "hf_tok"
    export_hf(ckpt, out, dtype="fp32")
    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS[:-1]:  # the last one names an added token: HF would match it
        assert hf_tok.encode(text, add_special_tokens=False) == base.text.encode(text), text
        assert hf_tok.decode(base.text.encode(text)) == text
    v = base.vocab
    names = [v.piece(i) for i in range(v.text_size, v.size)]
    assert hf_tok.convert_tokens_to_ids(names) == list(range(v.text_size, v.size))
    sample = names[:: max(1, len(names) // 400)]
    encoded = hf_tok(sample, add_special_tokens=False)["input_ids"]
    assert encoded == [[v.text_size + names.index(n)] for n in sample]
    assert {"<img_0042>", "<mask_0007>", "<vid_1234>", "<dna_ACG>"} <= set(names)


def test_export_from_a_tp2_pp2_checkpoint(trained, base, tmp_path):
    tmp, _ = trained
    vocab_size = -(-base.vocab.size // 64) * 64
    run = tmp_path / "run"
    layout = ["parallel.tp=2", "parallel.pp=2", f"train.run_dir={run}"]
    run_distributed(train_metrics, 4, args=([*overrides(tmp, vocab_size), *layout],))
    ckpt = run / "checkpoints" / "step_3"
    assert load_config(ckpt / "config.yaml").parallel.tp == 2
    assert_hf_matches(ckpt, export_hf(ckpt, tmp_path / "hf", dtype="fp32"), base)


# -- import ---------------------------------------------------------------------------------------

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2)
SMALL |= dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
SMALL |= dict(rms_norm_eps=1e-5)
ARCHS = {
    "llama": (LlamaConfig, {"rope_theta": 5e5}),
    "mistral": (MistralConfig, {"sliding_window": None}),
    "qwen2": (Qwen2Config, {"tie_word_embeddings": True}),
}


def random_hf(path: Path, arch: str):
    config_class, extra = ARCHS[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_class(**SMALL, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():  # also give Qwen2's biases values
            p.normal_(0, 0.05)
    model.save_pretrained(path)
    return model


def logits(model, x, mmfm: bool):
    with torch.no_grad():
        if mmfm:
            return model(x, torch.arange(x.shape[1])[None], torch.zeros_like(x))
        return model(x).logits


@pytest.mark.parametrize("arch", list(ARCHS))
def test_import_matches_transformers_and_round_trips(arch, tmp_path):
    hf = random_hf(tmp_path / "hf", arch)
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, cfg = load_checkpoint_model(tmp_path / "ckpt")
    x = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(1))
    assert (logits(model, x, True) - logits(hf, x, False)).abs().max() <= 1e-4
    assert cfg.model.qkv_bias == (arch == "qwen2")

    back = export_hf(tmp_path / "ckpt", tmp_path / "back", dtype="fp32", arch=arch)
    before = load_file(str(tmp_path / "hf" / "model.safetensors"))
    after = load_file(str(back / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def word_tokenizer(folder: Path, size: int) -> Path:
    """A tokenizer.json of `size` whole words (<s>, </s>, w2, w3, ...) in `folder`, and a
    tokenizer recipe that imports it as the text part (text.pretrained, as tokenizers/llm.yaml)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<s>", "</s>", *(f"w{i}" for i in range(2, size))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="</s>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(folder / "tokenizer.json"))
    recipe = folder.parent / "llm.yaml"
    recipe.write_text(f"text: {{pretrained: {folder}}}\ndna: {{scheme: kmer, k: 6}}\n")
    return recipe


def test_extend_vocab_appends_modality_rows(tmp_path):
    hf = random_hf(tmp_path / "hf", "llama")
    recipe = word_tokenizer(tmp_path / "hf", 300)
    import_hf(tmp_path / "hf", tmp_path / "ckpt", extend_vocab=str(recipe))
    model, cfg = load_checkpoint_model(tmp_path / "ckpt")
    vocab = json.loads((tmp_path / "ckpt" / "vocab.json").read_text())
    assert Vocab.load(tmp_path / "ckpt" / "vocab.json").text_model is not None
    assert cfg.model.vocab_size == vocab["size"] == 300 + 15 + 8192 + 1024 + 8192 + 19530
    emb = model.tok_embeddings.weight.detach()
    old = hf.model.embed_tokens.weight.detach()
    assert torch.equal(emb[:300], old)
    new = emb[300:]
    assert (new.mean(0) - old.mean(0)).abs().max() < 0.01
    assert 0 < new.std(0).mean() < 0.02 * old.std()  # mean + 1% noise, not copies
    x = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(2))
    assert (logits(model, x, True)[..., :300] - logits(hf, x, False)).abs().max() <= 1e-4


def test_init_from_an_imported_checkpoint(tmp_path, tiny_config):
    random_hf(tmp_path / "hf", "llama")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, cfg = load_checkpoint_model(tmp_path / "ckpt")
    m = cfg.model
    shape = [f"model.{k}={getattr(m, k)}" for k in ("dim", "n_layers", "n_heads", "n_kv_heads")]
    shape += [f"model.ffn_dim={m.ffn_dim}", f"model.norm_eps={m.norm_eps}", "model.vocab_size=300"]
    shape += [f"model.rope_theta={m.rope_theta}"]
    trainer = build_trainer(tiny_config(*shape, f"train.init_from={tmp_path / 'ckpt'}"))
    trainer.load_model(tmp_path / "ckpt")
    for (name, p), q in zip(trainer.model.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), name


# -- errors ---------------------------------------------------------------------------------------


def test_extend_vocab_with_a_trained_text_model_is_refused(tmp_path, capsys):
    """tokenizers/base.yaml's text model is mmfm's own, not the LLM's: the imported ids would
    have no text model (no prompt could be encoded, the export no tokenizer)."""
    from mmfm.cli import main

    random_hf(tmp_path / "hf", "llama")
    args = ["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([*args, "--extend-vocab", str(REPO / "tokenizers/base.yaml")])
    code, (line,) = stop.value.code, capsys.readouterr().err.splitlines()
    assert code == 2 and "text.pretrained" in line and "tokenizers/llm.yaml" in line, line
    assert "base.yaml" in line and not (tmp_path / "ckpt").exists()


def test_conversion_errors_say_what_is_wrong(tmp_path, trained):
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(
        ConversionError, match=r"unsupported architecture 'gpt2'.*llama, mistral, qwen2"
    ):
        import_hf(tmp_path / "gpt2", tmp_path / "x")
    with pytest.raises(ConversionError, match=r"no config\.json"):
        import_hf(tmp_path / "nothing", tmp_path / "x")
    random_hf(tmp_path / "hf", "llama")
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    from safetensors.torch import save_file

    save_file(weights, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"up_proj|w3.*has shape \(3, 3\)"):
        import_hf(tmp_path / "hf", tmp_path / "x")
    MistralConfig(**SMALL).save_pretrained(tmp_path / "swa")
    cfg = json.loads((tmp_path / "swa" / "config.json").read_text())
    cfg["sliding_window"] = 64
    (tmp_path / "swa" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="sliding_window=64"):
        import_hf(tmp_path / "swa", tmp_path / "x")
    with pytest.raises(ConversionError, match="not an mmfm checkpoint"):
        export_hf(tmp_path, tmp_path / "y")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mmfm-pwned",))


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "bad").mkdir()
    LlamaConfig(**SMALL).save_pretrained(tmp_path / "bad")
    with open(tmp_path / "bad" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": _Exploit()}, f)
    with pytest.raises(ConversionError, match="refused to load"):
        import_hf(tmp_path / "bad", tmp_path / "x")
    assert not Path("/tmp/mmfm-pwned").exists()
