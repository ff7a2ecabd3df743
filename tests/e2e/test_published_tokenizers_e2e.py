"""A published image tokenizer end to end on real photos: `mmfm tokenizer train` reserves its
codebook, `mmfm prepare` frames its codes, `mmfm train` runs a few steps on them and
`mmfm generate --modality image` decodes a PNG of the tokenizer's native size through the
library's own decoder (tiny random JanusVQVAE and diffusers VQModel, saved with
save_pretrained)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmfm.cli import main
from mmfm.data.shards import read_shard
from mmfm.testing import read_metrics, tiny_shape
from mmfm.tokenization.vocab import Vocab

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
SIZE, GRID = 32, 8  # both tiny tokenizers downsample 4x: 8 x 8 = 64 codes per picture
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")


def _save(kind: str, folder: Path) -> str:
    """The tokenizer recipe's image_tokenizer line for a tiny `kind` saved in `folder`."""
    if kind == "JanusVQVAE":
        transformers.JanusVQVAE(
            transformers.JanusVQVAEConfig(
                embed_dim=4, num_embeddings=64, latent_channels=8, base_channels=32,
                channel_multiplier=[1, 1, 2], num_res_blocks=1, num_patches=GRID,
            )
        ).save_pretrained(folder)  # fmt: skip
        return f"{{library: transformers, class: JanusVQVAE, path: {folder}}}"
    diffusers = pytest.importorskip("diffusers")  # here: ~4 s of CPU, not at every collection
    diffusers.VQModel(
        block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, num_vq_embeddings=48,
        vq_embed_dim=4, layers_per_block=1, sample_size=SIZE, lookup_from_codebook=True,
    ).save_pretrained(folder / "vqvae")  # fmt: skip
    where = f"path: {folder}, subfolder: vqvae, resolution: {SIZE}"
    return f"{{library: diffusers, class: VQModel, {where}}}"


@pytest.mark.slow  # about 50 s each on 2 loaded cores: text model, prepare, train, generate
@pytest.mark.parametrize("kind,codes", [("JanusVQVAE", 64), ("VQModel", 48)])
def test_prepare_train_generate_with_a_published_tokenizer(
    tmp_path, real_data, monkeypatch, kind, codes
):
    monkeypatch.chdir(tmp_path)
    photos = real_data("photos")
    slot = _save(kind, tmp_path / kind)
    (tmp_path / "tok.yaml").write_text(
        f"name: pub\noutput_dir: {tmp_path / 'tok'}\n"
        "text: {vocab_size: 400, corpus: [real:kjv], max_corpus_mb: 0.05}\n"
        f"image_tokenizer: {slot}\n"
    )
    main(["tokenizer", "train", "tok.yaml"])
    vocab = Vocab.load(tmp_path / "tok" / "vocab.json")
    book = vocab.codebook("image")
    assert book.size == codes and book.source.startswith(
        f"{'diffusers' if kind == 'VQModel' else 'transformers'} {kind} {SIZE}px"
    )

    paths = ", ".join(str(photos / name) for name in PHOTOS)
    (tmp_path / "prep.yaml").write_text(
        f"name: pub\noutput: {tmp_path / 'shards'}\ntokenizer: tok.yaml\nshard_size: 10\n"
        f"sources:\n  - {{kind: image-text, name: photos, paths: [{paths}]}}\n"
    )
    main(["prepare", "prep.yaml", "--workers", "1"])
    docs = [d for p in sorted((tmp_path / "shards").glob("*.tar")) for d in read_shard(str(p))]
    assert len(docs) == len(PHOTOS)
    img, end = vocab.special("<img>"), vocab.special("</img>")
    for doc in docs:
        ids = doc.tokens.tolist()
        body = ids[ids.index(img) + 1 : ids.index(end)]
        assert len(body) == GRID * GRID and all(
            book.offset <= t < book.offset + codes for t in body
        )

    size = -(-vocab.size // 64) * 64
    run = tmp_path / "run"
    main(
        [
            "train", str(REPO / "launch/demo.yaml"), *tiny_shape(2, 128),
            f"model.vocab_size={size}", f"data.paths=[{tmp_path / 'shards'}]",
            f"data.vocab={tmp_path / 'tok' / 'vocab.json'}", "data.num_workers=0",
            "train.steps=2", "train.global_batch_size=2", "train.micro_batch_size=2",
            "optim.warmup_steps=1", f"train.run_dir={run}", "logging.progress=false",
            "logging.tensorboard=false",
        ]
    )  # fmt: skip
    assert len([row for row in read_metrics(run) if "loss" in row]) == 2

    out = tmp_path / "out"
    args = ["generate", str(run / "checkpoints" / "step_2"), "--prompt", "a cat"]
    args += ["--modality", "image", "--tokenizers", "tok.yaml", "--out", str(out)]
    main([*args, "--max-new-tokens", str(GRID * GRID + 2), "--seed", "1"])
    span = json.loads((out / "generations.jsonl").read_text())["spans"][0]
    assert span["modality"] == "image" and span["length"] == GRID * GRID, span
    with Image.open(span["path"]) as im:
        assert im.size == (SIZE, SIZE)


@pytest.mark.slow  # about a minute on 2 loaded cores
def test_a_clip_per_frame_through_a_published_vqgan_end_to_end(tmp_path, real_data, monkeypatch):
    """LWM's framing with aMUSEd's class: prepare a real clip, train, generate a GIF."""
    monkeypatch.chdir(tmp_path)
    slot = _save("VQModel", tmp_path / "VQModel")
    (tmp_path / "tok.yaml").write_text(
        f"name: pub\noutput_dir: {tmp_path / 'tok'}\n"
        "text: {vocab_size: 400, corpus: [real:kjv], max_corpus_mb: 0.05}\n"
        f"video_tokenizer: {slot}\n"
    )
    main(["tokenizer", "train", "tok.yaml"])
    vocab = Vocab.load(tmp_path / "tok" / "vocab.json")
    assert vocab.codebook("video").size == 48
    clip = real_data("gif") / "no_time_for_that_tiny.gif"
    (tmp_path / "prep.yaml").write_text(
        f"name: pub\noutput: {tmp_path / 'shards'}\ntokenizer: tok.yaml\nshard_size: 10\n"
        f"sources:\n  - {{kind: video, name: clip, paths: [{clip}], max_frames: 2}}\n"
    )
    main(["prepare", "prep.yaml", "--workers", "1"])
    (doc,) = [d for p in sorted((tmp_path / "shards").glob("*.tar")) for d in read_shard(str(p))]
    ids = doc.tokens.tolist()
    eof, eov = vocab.special("<eof>"), vocab.special("<eov>")
    assert [i for i in ids if i in (eof, eov)] == [eof, eov]
    assert ids.index(eof) - ids.index(vocab.special("<vision>")) == GRID * GRID + 1

    size = -(-vocab.size // 64) * 64
    run = tmp_path / "run"
    main(
        [
            "train", str(REPO / "launch/demo.yaml"), *tiny_shape(2, 256),
            f"model.vocab_size={size}", f"data.paths=[{tmp_path / 'shards'}]",
            f"data.vocab={tmp_path / 'tok' / 'vocab.json'}", "data.num_workers=0",
            "train.steps=2", "train.global_batch_size=1", "train.micro_batch_size=1",
            "optim.warmup_steps=1", f"train.run_dir={run}", "logging.progress=false",
            "logging.tensorboard=false",
        ]
    )  # fmt: skip
    out = tmp_path / "out"
    args = ["generate", str(run / "checkpoints" / "step_2"), "--prompt", "a clip"]
    args += ["--modality", "video", "--tokenizers", "tok.yaml", "--out", str(out)]
    main([*args, "--max-new-tokens", str(2 * (GRID * GRID + 1) + 1), "--seed", "1"])
    span = json.loads((out / "generations.jsonl").read_text())["spans"][0]
    assert span["modality"] == "video" and span["path"].endswith(".gif"), span
    with Image.open(span["path"]) as im:
        assert im.size == (SIZE, SIZE)
