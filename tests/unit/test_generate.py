"""mmfm.generate: the KV cache against the no-cache path, ragged batches, samplers, the span
grammar on an untrained model, and every decoded file opened by its own library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfm.config.schema import ModelConfig
from mmfm.core.types import Modality
from mmfm.decoding.constraints import SpanConstraint
from mmfm.decoding.engine import generate, unconditional_prompt
from mmfm.decoding.layout import Layout, demo_layout
from mmfm.decoding.outputs import SpanWriter, split_spans
from mmfm.decoding.sampling import Sampling, filter_logits
from mmfm.model import build_model, init_weights
from mmfm.model.cache import KVCache
from mmfm.tokenization.vocab import DELIMITERS, Vocab


def tiny_model(vocab_size: int, dtype=torch.float32, seed: int = 0, **extra):
    cfg = ModelConfig(
        vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
        ffn_multiple_of=32, max_seq_len=2048, **extra,
    )  # fmt: skip
    model = build_model(cfg)
    model.to_empty(device="cpu")
    init_weights(model, cfg, seed)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def small_layout() -> Layout:
    """The unified vocabulary's specials and delimiters around 256 byte ids and small
    codebooks (video frames keep LWM's 256 codes), so that 200 sequences sample quickly."""
    books = [("image", 64), ("mask", 64), ("video", 64), ("dna", 5, list("ACGTN"))]
    vocab = Vocab.build(260, (), books, text_kind="bytes")
    return Layout(
        size=vocab.size,
        bos=1,
        eos=2,
        text=range(4, 260),
        delimiters={m: vocab.delimiters(m) for m in DELIMITERS},
        codes={b.name: range(b.offset, b.offset + b.size) for b in vocab.codebooks},
        specials={name: vocab.special(name) for name in vocab.specials},
        tokens_per_item={"image": 32, "mask": 32, "video": 256},
        encode_text=lambda s: [4 + b for b in s.encode()],
        decode_text=lambda ids: bytes(i - 4 for i in ids).decode(errors="replace"),
        dna_pieces=tuple("ACGTN"),
    )


def test_cached_greedy_equals_the_no_cache_path_with_logits_to_1e5():
    model = tiny_model(384, tie_embeddings=True)
    prompt = [1, 40, 41, 42, 43, 44, 45]
    new = generate(model, [prompt], Sampling(max_new_tokens=64))[0]
    assert len(new) == 64
    # Logits of every step, cached one token at a time, against one forward of everything.
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        full = model(ids, torch.arange(ids.shape[1])[None], torch.zeros_like(ids))
    # The no-cache greedy path: the model is causal, so one forward of prompt + new gives
    # every step's logits; each new token must be the argmax of the step before it.
    assert full[0, len(prompt) - 1 : -1].argmax(-1).tolist() == new
    with torch.no_grad():
        cache = KVCache(model.cfg, 1, ids.shape[1])
        n = len(prompt)
        steps = [
            model(ids[:, :n], torch.arange(n)[None], torch.zeros(1, n, dtype=torch.long), cache)
        ]
        for t in range(n, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], torch.tensor([[t]]), torch.zeros(1, 1), cache))
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max() <= 1e-5


def test_a_ragged_batch_gives_each_prompt_what_it_gets_alone():
    model = tiny_model(384)
    layout = demo_layout()
    prompts = [
        layout.prompt("a red cross on a blue background", "image"),
        layout.prompt("the"),
        layout.prompt("a long prompt about a green stripe on a black background", "dna"),
        [1, 9],
    ]
    sampling = Sampling(max_new_tokens=68)
    batch = generate(model, prompts, sampling, layout)
    alone = [generate(model, [p], sampling, layout)[0] for p in prompts]
    assert batch == alone
    image = split_spans([prompts[0][-1], *batch[0]], layout)[0]
    assert image.closed and len(image.body) == 64
    short = Sampling(max_new_tokens=12)
    unconstrained = generate(model, prompts, short, layout, constrain=False)
    assert unconstrained == [generate(model, [p], short, layout, False)[0] for p in prompts]


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others():
    model = tiny_model(384)
    prompts = [[1, 50, 60], [1, 70, 80, 90, 100]]
    run = lambda seed: generate(  # noqa: E731
        model, prompts, Sampling(32, temperature=1.0, top_k=100, top_p=0.95, seed=seed)
    )
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_top_k_and_top_p_keep_the_right_ids():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda k, p: torch.isfinite(filter_logits(logits, k, p))[0].tolist()  # noqa: E731
    assert kept(2, 1.0) == [True, True, False, False, False]
    assert kept(0, 0.6) == [True, True, False, False, False]  # 0.5 < 0.6 <= 0.7
    assert kept(0, 0.5) == [True, False, False, False, False]
    assert kept(0, 0.01) == [True, False, False, False, False]


def test_guidance_runs_the_unconditional_prompt_and_scale_one_is_plain():
    model = tiny_model(384)
    layout = demo_layout()
    prompt = layout.prompt("a red cross on a blue background", "image")
    assert unconditional_prompt(prompt, layout) == [layout.bos, prompt[-1]]
    plain = generate(model, [prompt], Sampling(66), layout)
    guided = generate(model, [prompt], Sampling(66, cfg_scale=3.0), layout)
    assert generate(model, [prompt], Sampling(66, cfg_scale=1.0), layout) == plain
    assert guided != plain
    assert split_spans([prompt[-1], *guided[0]], layout)[0].closed  # still a whole image


# -- the grammar on an untrained model ------------------------------------------------------


def obeys(modality: str, body: list[int], closed: bool, layout: Layout) -> bool:
    """An independent reading of the span grammar (a cut span: its prefix must obey)."""
    codes = layout.codes
    n = layout.tokens_per_item
    if modality == "image":
        ok = all(t in codes["image"] for t in body)
        return ok and (len(body) == n["image"] if closed else len(body) <= n["image"])
    if modality == "mask":
        ok = all(t in codes["mask"] for t in body)
        return ok and (1 <= len(body) <= n["mask"] if closed else len(body) <= n["mask"])
    if modality == "video":
        eof, eov = layout.specials["<eof>"], layout.specials["<eov>"]
        frames, frame, ended = [], [], False
        for t in body:
            if ended:
                return False  # anything after <eov>
            if t in (eof, eov):
                frames.append(len(frame))
                frame, ended = [], t == eov
            elif t in codes["video"]:
                frame.append(t)
            else:
                return False
        whole = all(f == n["video"] for f in frames) and len(frame) <= n["video"]
        return whole and (ended and not frame if closed else True)
    if modality == "dna":
        return all(t in codes["dna"] for t in body)
    if modality == "svg":
        return all(t in layout.text and t not in (layout.bos, layout.eos) for t in body)
    raise AssertionError(modality)


@pytest.mark.parametrize(
    "modality,max_new",
    [
        ("image", 34),
        ("mask", 34),
        ("video", 260),  # 200 x 260 steps: 2.6 s in CI
        ("dna", 40),
        ("svg", 24),
    ],
)
def test_every_sampled_span_of_an_untrained_model_obeys_the_grammar(
    small_layout, modality, max_new
):
    layout = small_layout
    model = tiny_model(-(-layout.size // 64) * 64)  # padded rows past the vocabulary
    prompts = [layout.prompt(f"prompt {i}", modality) for i in range(200)]
    sampling = Sampling(max_new, temperature=1.0, seed=1)
    new = generate(model, prompts, sampling, layout)
    spans, closed = [], 0
    for prompt, ids in zip(prompts, new, strict=True):
        found = split_spans([prompt[-1], *ids], layout)
        assert found[0].modality == modality
        spans += [s for s in found if s.modality != "text"]
        closed += found[0].closed
        assert all(t < layout.size for t in ids)
    assert all(obeys(s.modality, s.body, s.closed, layout) for s in spans)
    if modality in ("image", "mask"):
        assert closed == 200  # the budget fits a whole span: the grammar closes every one
    else:
        assert closed > 0
    if modality == "mask":
        assert len({len(s.body) for s in spans}) > 3  # the length is the model's choice


def test_the_constraint_rows_follow_state():
    layout = demo_layout()
    c = SpanConstraint(layout, 384, 1, torch.device("cpu"))
    start, end = layout.delimiter(Modality.IMAGE)
    c.update(torch.tensor([start]))
    logits = torch.zeros(1, 384)
    allowed = torch.isfinite(c(logits))[0].nonzero().flatten().tolist()
    assert allowed == list(layout.codes["image"])
    for _ in range(64):
        c.update(torch.tensor([layout.codes["image"].start]))
    assert torch.isfinite(c(logits))[0].nonzero().flatten().tolist() == [end]
    c.update(torch.tensor([end]))
    free = torch.isfinite(c(logits))[0]
    assert (
        free[layout.eos] and free[start] and not free[end] and not free[layout.codes["image"]].any()
    )
    assert not free[layout.size :].any()


# -- files -----------------------------------------------------------------------------------


def test_demo_image_spans_become_pngs_and_bad_lengths_are_named(tmp_path):
    layout = demo_layout()
    start, end = layout.delimiter(Modality.IMAGE)
    image = layout.codes["image"].start
    ids = [start, *[image + 2 * 8] * 64, end, start, *[image] * 52, end, start, image]
    spans = [
        SpanWriter(layout, tmp_path).write(s, f"s{i}")
        for i, s in enumerate(split_spans(ids, layout))
    ]
    with Image.open(spans[0].path) as im:
        assert im.size == (128, 128)
        assert np.asarray(im.convert("RGB"))[0, 0].tolist() == [220, 30, 30]  # colour 2: red
    assert spans[1].path is None
    assert "an image span of 52 ids; its tokenizer makes 64" in spans[1].note
    assert not spans[2].closed and "unterminated" in spans[2].note and spans[2].path is None


def test_svg_dna_and_text_files_open_in_their_libraries(small_layout, tmp_path):
    from Bio import SeqIO

    from mmfm.tokenization.svg import parse_svg

    layout = small_layout
    svg_open, svg_close = layout.delimiter(Modality.SVG)
    dna_open, dna_close = layout.delimiter(Modality.DNA)
    good = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 8 8"><path d="M0 0h8v8z"/></svg>'
    code = layout.encode_text(good)
    dna = [layout.codes["dna"].start + "ACGTN".index(b) for b in "GATTACA"]
    ids = [
        *layout.encode_text("hello"), svg_open, *code, svg_close, dna_open, *dna, dna_close,
        svg_open, *code[:5],
    ]  # fmt: skip
    writer = SpanWriter(layout, tmp_path)
    spans = [writer.write(s, f"s{i}") for i, s in enumerate(split_spans(ids, layout))]
    assert [s.modality for s in spans] == ["text", "svg", "dna", "svg"]
    assert Path(spans[0].path).read_text() == "hello"
    assert parse_svg(Path(spans[1].path).read_text()) is not None
    assert spans[1].path.endswith(".svg") and spans[1].note is None
    assert str(next(SeqIO.parse(spans[2].path, "fasta")).seq) == "GATTACA"
    cut = spans[3]
    assert not cut.closed and cut.path.endswith(".svg.txt") and "kept as text" in cut.note


# -- mmfm tokenizer decode on what models emit ----------------------------------------------


def test_tokenizer_decode_takes_cut_spans_and_checks_image_lengths(tmp_path, caplog):
    from mmfm.tokenization.recipe import load_recipe
    from mmfm.tokenization.tokenizers import Tokenizers
    from mmfm.tokenization.visual.train import VisualRecipe, build, save_visual
    from mmfm.tokenization.vocab import VocabError

    repo = Path(__file__).resolve().parents[2]
    tiny = {"image_size": 32, "patch": 8, "dim": 32, "heads": 2, "encoder_layers": 1}
    tiny |= {"qformer_layers": 1, "decoder_layers": 1, "tokens": 8, "codebook_size": 64}
    save_visual(build(VisualRecipe(kind="seed_image", model=tiny)), tmp_path / "image")
    recipe = load_recipe(
        repo / "tokenizers/base.yaml",
        [f"output_dir={repo / 'tokenizers/base'}", f"image_tokenizer={tmp_path / 'image'}"],
    )
    tok = Tokenizers.load(recipe)
    v = tok.vocab
    svg = tok.text.encode('<svg xmlns="http://www.w3.org/2000/svg"><circle r="1"/></svg>')
    cut_svg = [1, v.special("<svg>"), *svg[:6]]
    [(kind, code)] = tok.decode(cut_svg)
    assert kind == "svg" and code == tok.text.decode(svg[:6])
    assert "svg span at 1 has no closing id: decoded as far as it goes" in caplog.text
    dna = [v.code_id("dna", c) for c in (0, 1)]
    assert tok.decode([1, v.special("<dna>"), *dna]) == [("dna", tok.dna.decode(dna, v))]
    image = [v.code_id("image", c) for c in range(8)]
    [(kind, picture)] = tok.decode([1, v.special("<img>"), *image, v.special("</img>")])
    assert kind == "image" and picture.shape == (32, 32, 3)
    with pytest.raises(VocabError, match="image span of 52 codes; the image tokenizer makes 8"):
        tok.decode([1, v.special("<img>"), *image * 6, *image[:4], v.special("</img>")])
    with pytest.raises(VocabError, match="outside the 64 codes of its tokenizer"):
        tok.decode([1, v.special("<img>"), *[v.code_id("image", 100)] * 8, v.special("</img>")])


def test_two_runs_into_one_out_take_turns_numbering(tmp_path):
    """A run numbering and writing its files holds generations.jsonl locked: a second run
    into the same folder waits, then numbers after the first's files."""
    import threading

    from mmfm.decoding.outputs import numbering, write_generations

    def second() -> None:
        with numbering(tmp_path) as n:
            got.append(n)

    got: list[int] = []
    with numbering(tmp_path) as first:
        other = threading.Thread(target=second)
        other.start()
        other.join(0.3)
        assert first == 0 and other.is_alive() and not got  # it waits for the lock
        (tmp_path / "0000-0-text.txt").write_text("a")
        write_generations(tmp_path, [{"index": 0}], [[]])
    other.join(5)
    assert got == [1]
