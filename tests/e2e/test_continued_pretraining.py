"""Continued pretraining of a Hugging Face LLM on multimodal data, through the commands a user
runs: its tokenizer.json as the text part (`mmfm tokenizer train`), its weights with the
vocabulary grown (`mmfm convert from-hf --extend-vocab`), `mmfm prepare` of text and SVG,
`mmfm train`, `mmfm convert hf`; `transformers` loads the export and encodes like mmfm."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from mmfm.cli import main
from mmfm.convert.hf import import_hf
from mmfm.core.errors import ConversionError
from mmfm.core.types import TextRecord
from mmfm.data.shards import read_shard
from mmfm.testing import read_metrics
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.svg import normalize_svg
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.vocab import Vocab
from mmfm.train.checkpoint import load_checkpoint_model

TEXTS = ["In the beginning God created the heaven and the earth.", "漢字 😀 naïve café"]
TEXTS += ["  spaces   and\nnewlines\n\t", "<svg viewBox='0 0 1 1'/> as plain code"]


def small_llm(path: Path, verses: list[str], svgs: list[str]) -> int:
    """A random tiny Llama saved with a byte-level BPE tokenizer (about 400 merges) trained
    here on real prose and SVG, GPT-2 style: <|endoftext|> is its only special token."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=660,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([*verses, *svgs], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    fast.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=tk.get_vocab_size(),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return tk.get_vocab_size()


def test_continue_pretraining_an_hf_llm_end_to_end(tmp_path, real_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kjv = real_data("kjv") / "kjv.jsonl"
    verses = [json.loads(line)["text"] for line in kjv.read_text().splitlines()[:3000]]
    icons = sorted((real_data("svg")).rglob("*.svg"))[:40]
    text_size = small_llm(tmp_path / "llm", verses, [p.read_text() for p in icons])

    (tmp_path / "tok.yaml").write_text(
        f"name: llm\noutput_dir: {tmp_path / 'tok'}\n"
        f"text: {{pretrained: {tmp_path / 'llm'}/tokenizer.json}}\ndna: {{scheme: char}}\n"
    )
    main(["tokenizer", "train", "tok.yaml"])
    main(["convert", "from-hf", "llm", "ckpt", "--extend-vocab", "tok.yaml"])
    vocab = Vocab.load(tmp_path / "tok" / "vocab.json")
    assert Vocab.load(tmp_path / "ckpt" / "vocab.json").fingerprint == vocab.fingerprint
    assert (vocab.text_kind, vocab.text_size) == ("hf", text_size) == ("hf", vocab.special("<img>"))

    (tmp_path / "prep.yaml").write_text(
        f"name: cp\noutput: {tmp_path / 'shards'}\ntokenizer: tok.yaml\nshard_size: 30\n"
        "sources:\n  - {kind: text, name: kjv, paths: [real:kjv], limit: 40}\n"
        "  - {kind: svg, name: icons, paths: [real:svg], limit: 12}\n"
    )
    main(["prepare", "prep.yaml", "--workers", "1"])
    docs = [d for p in sorted((tmp_path / "shards").glob("*.tar")) for d in read_shard(str(p))]
    tok = Tokenizers.load(load_recipe(tmp_path / "tok.yaml"))
    text_docs = [d for d in docs if d.source == "kjv"]
    svg_docs = [d for d in docs if d.source == "icons"]
    assert len(text_docs) == 40 and len(svg_docs) == 12
    first = text_docs[0].tokens.tolist()
    assert first[0] == first[-1] == 0  # <|endoftext|> frames documents
    assert tok.text.decode(first[1:-1]) in verses

    run = tmp_path / "run"
    main(
        [
            "train",
            "ckpt/config.yaml",
            "train.init_from=ckpt",
            f"data.paths=[{tmp_path / 'shards'}]",
            f"data.vocab={tmp_path / 'tok' / 'vocab.json'}",
            "data.num_workers=0",
            "train.steps=3",
            "train.global_batch_size=2",
            "train.micro_batch_size=2",
            "optim.warmup_steps=1",
            f"train.run_dir={run}",
            "logging.progress=false",
            "logging.tensorboard=false",
        ]
    )
    losses = [row["loss"] for row in read_metrics(run) if "loss" in row]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    ckpt = run / "checkpoints" / "step_3"
    main(["convert", "hf", str(ckpt), "hf", "--dtype", "fp32"])

    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in [*TEXTS, *verses[:200]]:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.text.encode(text), text
        assert hf_tok.decode(tok.text.encode(text)) == text
    names = ["<img>", "</img>", "<svg>", "</svg>", "<dna>", "<sep>", "<img_0042>", "<dna_A>"]
    ids = [vocab.piece(i) for i in range(vocab.text_size, vocab.size)]
    assert hf_tok.convert_tokens_to_ids(names) == [vocab.text_size + ids.index(n) for n in names]
    assert hf_tok("<img><svg></svg>", add_special_tokens=False)["input_ids"] == [
        vocab.special("<img>"),
        vocab.special("<svg>"),
        vocab.special("</svg>"),
    ]
    # A whole prepared SVG document: <|endoftext|> <svg> code </svg> <|endoftext|>.
    doc = svg_docs[0].tokens.tolist()
    code = tok.text.decode(doc[2:-2])
    assert normalize_svg(code, tok.recipe.svg) == code
    hf_ids = hf_tok.encode(code, add_special_tokens=False, split_special_tokens=True)
    assert [0, vocab.special("<svg>"), *hf_ids, vocab.special("</svg>"), 0] == doc
    assert hf_tok.decode(hf_ids) == code
    assert hf_tok.bos_token_id == hf_tok.eos_token_id == 0

    model, _ = load_checkpoint_model(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.tensor([first[:128]])
    with torch.no_grad():
        mine = model(x, torch.arange(x.shape[1])[None], torch.zeros_like(x))
        assert (mine - hf(x).logits).abs().max() <= 1e-4
    record = tok.encode(TextRecord("t", TEXTS[1])).tokens.tolist()
    assert record == [0, *hf_tok.encode(TEXTS[1], add_special_tokens=False), 0]


def test_a_tokenizer_smaller_than_the_embedding_reuses_its_spare_rows(tmp_path, real_data):
    """LLM embeddings are often padded past the tokenizer (to a multiple of 64...): the
    modality tokens take the spare rows first, then new rows follow; a tokenizer with more
    ids than the model has rows is another model's."""
    kjv = real_data("kjv") / "kjv.jsonl"
    verses = [json.loads(line)["text"] for line in kjv.read_text().splitlines()[:1000]]
    text_size = small_llm(tmp_path / "llm", verses, [])
    config = json.loads((tmp_path / "llm" / "config.json").read_text())
    for rows in (text_size + 40, text_size - 1):
        (tmp_path / "llm" / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(LlamaConfig(**{**config, "vocab_size": rows}))
        hf.save_pretrained(tmp_path / "llm")
        recipe = tmp_path / "tok.yaml"
        recipe.write_text(f"text: {{pretrained: {tmp_path / 'llm'}}}\ndna: {{scheme: char}}\n")
        if rows < text_size:
            with pytest.raises(ConversionError, match=r"has \d+ ids, the model in .* only"):
                import_hf(tmp_path / "llm", tmp_path / "x", extend_vocab=str(recipe))
            continue
        import_hf(tmp_path / "llm", tmp_path / "ckpt", extend_vocab=str(recipe))
        model, cfg = load_checkpoint_model(tmp_path / "ckpt")
        vocab = Vocab.load(tmp_path / "ckpt" / "vocab.json")
        assert vocab.special("<img>") == text_size and cfg.model.vocab_size == vocab.size
        old = hf.model.embed_tokens.weight.detach()
        assert torch.equal(model.tok_embeddings.weight.detach()[:rows], old)
