"""A pretrained LLM's tokenizer as the vocabulary's text part (`text.pretrained`): its ids stay
the text ids, mmfm's tokens follow, documents are framed with its own bos / eos."""

import json
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mmfm.convert.hf_tokenizer import build_hf_tokenizer
from mmfm.core.errors import TokenizerError
from mmfm.core.types import SvgRecord, TextRecord
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.text import load_pretrained
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.vocab import FIXED_SPECIALS, Vocab

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_pretrained_text")

REPO = Path(__file__).resolve().parents[2]
HARD = ["漢字 😀 naïve café", "  spaces   and\nnewlines\n\t", "<|endoftext|> is text", "\u2581 x"]
SVG = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><path d="M1 1h14v14z"/></svg>'


@pytest.fixture(scope="module")
def verses(real_data):
    path = real_data("kjv") / "kjv.jsonl"
    return [json.loads(line)["text"] for line in path.read_text().splitlines()[:2000]]


def byte_level_bpe(texts, path, vocab_size=560):
    """GPT-2 style: byte-level BPE (about 300 merges) with <|endoftext|> as its only special."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    tk.save(str(path))
    return tk


def recipe(tmp_path, pretrained):
    """tokenizers/llm.yaml, the example recipe, on `pretrained`."""
    fields = [f"output_dir={tmp_path / 'tok'}", f"text.pretrained={pretrained}"]
    return load_recipe(REPO / "tokenizers/llm.yaml", [*fields, "dna.scheme=char"])


@pytest.fixture(scope="module")
def hf_set(tmp_path_factory, verses):
    tmp = tmp_path_factory.mktemp("hf")
    tk = byte_level_bpe(verses, tmp / "tokenizer.json")
    return tmp, tk, Tokenizers.train(recipe(tmp, tmp / "tokenizer.json"))


def test_text_ids_are_the_tokenizers_and_specials_follow(hf_set, verses):
    tmp, tk, tok = hf_set
    v, n = tok.vocab, tk.get_vocab_size()
    assert (v.text_kind, v.text_size) == ("hf", n) and 500 < n <= 560
    assert [v.piece(i) for i in range(n)] == [tk.id_to_token(i) for i in range(n)]
    assert [v.special(s) for s in FIXED_SPECIALS] == list(range(n, n + len(FIXED_SPECIALS)))
    assert v.codebook("image").offset == n + len(FIXED_SPECIALS)
    # GPT-2 style: <|endoftext|> (id 0) is the only special, so it starts and ends documents.
    assert (tok.text.bos_id, tok.text.eos_id) == (0, 0) == (v.text_bos, v.text_eos)
    text = verses[7]
    doc = tok.encode(TextRecord("v", text))
    assert doc.tokens.tolist() == [0, *tk.encode(text).ids, 0]
    svg = tok.encode(SvgRecord("s", SVG)).tokens.tolist()
    assert svg[:2] == [0, v.special("<svg>")] and svg[-2:] == [v.special("</svg>"), 0]
    assert max(svg[2:-2]) < n  # the SVG code is text of the pretrained tokenizer
    # A reload (what mmfm prepare does) is the same vocabulary.
    again = Tokenizers.load(recipe(tmp, tmp / "tokenizer.json"))
    assert again.vocab.fingerprint == v.fingerprint
    assert Vocab.load(tmp / "tok" / "vocab.json").fingerprint == v.fingerprint


def test_byte_level_decode_is_exact(hf_set, verses):
    tok = hf_set[2]
    for text in [*verses[:300], *HARD]:
        ids = tok.text.encode(text)
        assert tok.text.decode(ids) == text
    # Special-token names in a document stay text, as with mmfm's own model.
    assert 0 not in tok.text.encode("<|endoftext|>")
    doc = tok.encode(TextRecord("h", HARD[0]))
    assert tok.decode(doc.tokens.tolist()) == [("text", HARD[0])]


def test_bos_eos_from_the_recipe_or_tokenizer_config(tmp_path, verses):
    byte_level_bpe(verses[:500], tmp_path / "tokenizer.json")
    tk = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tk.add_special_tokens(["<s>", "</s>", "<|im_end|>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    s, end, im_end = (tk.token_to_id(t) for t in ("<s>", "</s>", "<|im_end|>"))
    text = load_pretrained(tmp_path / "tokenizer.json")
    assert (text.bos_id, text.eos_id) == (s, end)  # common names
    text = load_pretrained(tmp_path, eos_token="<|im_end|>")  # a folder: its tokenizer.json
    assert (text.bos_id, text.eos_id) == (s, im_end)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|im_end|>"})
    )
    text = load_pretrained(tmp_path / "tokenizer.json")
    assert (text.bos_id, text.eos_id) == (0, im_end)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json has no token '<nope>'.*bos_token"):
        load_pretrained(tmp_path / "tokenizer.json", bos_token="<nope>")


def test_an_llm_sentencepiece_model_is_a_pretrained_text_part(tmp_path, verses):
    """A Llama-style .model (dummy prefix, byte fallback, bos 1 / eos 2): the layout follows
    it, and the Hugging Face export encodes like mmfm."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(verses),
        model_prefix=str(tmp_path / "llm"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    tok = Tokenizers.train(recipe(tmp_path, tmp_path / "llm.model"))
    v = tok.vocab
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "llm.model"))
    assert (v.text_kind, v.text_size) == ("sentencepiece", 400) and v.special("<img>") == 400
    assert (v.text_bos, v.text_eos) == (sp.bos_id(), sp.eos_id()) == (1, 2)
    text = verses[3]
    assert tok.encode(TextRecord("v", text)).tokens.tolist() == [1, *sp.encode(text), 2]
    assert Tokenizers.load(recipe(tmp_path, tmp_path / "llm.model")).vocab == v
    hf = build_hf_tokenizer(v)
    for text in [*verses[:50], "漢字 😀 naïve café", "two  spaces"]:
        assert hf.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert hf.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert hf.convert_tokens_to_ids(["<img>", "</svg>"]) == [400, v.special("</svg>")]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("tokenizer.json", None, r"cannot read .*tokenizer\.json"),
        ("tokenizer.json", b'{"version": "1.0", "model": {"type": "BPE", "vo', "not a readable"),
        ("tokenizer.json", b"\x00\xff garbage", "not a readable"),
        ("llm.model", b"not a protobuf", "not a readable sentencepiece model"),
        ("vocab.txt", b"", "neither a tokenizer.json nor a sentencepiece"),
    ],
)
def test_missing_or_corrupt_tokenizer_is_one_line_naming_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TokenizerError, match=match) as info:
        Tokenizers.train(recipe(tmp_path, path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "tok" / "vocab.json").exists()
