"""Published visual tokenizers (mmfm/tokenization/visual/published.py) against their libraries.

Tiny random configs of transformers' JanusVQVAE, Emu3VQVAE, ChameleonVQVAE and diffusers'
VQModel are saved with `save_pretrained` once per module (Janus also as the `model.vqmodel.`
part of a sharded full-model checkpoint); mmfm's codes of real photos must equal the
library's own encode, and mmfm's decode the library's decode.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mmfm.core.errors import ConfigError, TokenizerError
from mmfm.tokenization.recipe import TokenizerRecipe
from mmfm.tokenization.tokenizers import reserved_codebooks
from mmfm.tokenization.visual import data as vdata
from mmfm.tokenization.visual.published import _factor, load_published, parse_spec
from mmfm.tokenization.visual.records import VisualTokenizers
from mmfm.tokenization.vocab import Vocab, VocabError

from helpers import PUBLISHED_SIZE
from helpers import tiny_published_models as _tiny_models

transformers = pytest.importorskip("transformers")

# One worker runs the published-tokenizer files (make test: --dist loadgroup), so the tiny
# models are saved once and diffusers (~4 s of CPU to import) is imported by that worker only.
pytestmark = pytest.mark.xdist_group("published_tokenizers")

SIZE = PUBLISHED_SIZE


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(library models by class, their specs) saved once; Janus also inside a sharded full
    checkpoint whose LLM-only shard is not safetensors at all (so it must never be read)."""
    root = tmp_path_factory.mktemp("published")
    models, specs = _tiny_models(), {}
    for name, model in models.items():
        library = "diffusers" if name == "VQModel" else "transformers"
        folder = root / name
        model.save_pretrained(folder / "vqvae" if library == "diffusers" else folder)
        specs[name] = {"library": library, "class": name, "path": str(folder)}
        if library == "diffusers":
            specs[name]["subfolder"] = "vqvae"
        if name in ("Emu3VQVAE", "VQModel"):  # no native resolution in their configs
            specs[name]["resolution"] = SIZE
    full = root / "janus-full"
    full.mkdir()
    vq = models["JanusVQVAE"]
    config = {"model_type": "janus", "vq_config": vq.config.to_dict(), "text_config": {}}
    (full / "config.json").write_text(json.dumps(config))
    tensors = {f"model.vqmodel.{k}": v.contiguous() for k, v in vq.state_dict().items()}
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = {
        "model-00001-of-00003.safetensors": {k: tensors[k] for k in keys[:half]},
        "model-00002-of-00003.safetensors": {
            **{k: tensors[k] for k in keys[half:]},
            "model.language_model.norm.weight": torch.ones(4),
        },
    }
    weight_map = {k: name for name, part in shards.items() for k in part}
    for name, part in shards.items():
        save_file(part, str(full / name))
    (full / "model-00003-of-00003.safetensors").write_bytes(b"the LLM: never read")
    weight_map["model.language_model.embed_tokens.weight"] = "model-00003-of-00003.safetensors"
    (full / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    specs["janus-full"] = {
        "library": "transformers", "class": "JanusVQVAE", "path": str(full),
        "prefix": "model.vqmodel.",
    }  # fmt: skip
    return models, specs


@pytest.fixture(scope="module")
def photos():
    from mmfm.core.examples import fetch

    folder = fetch("photos")
    files = [folder / n for n in ("astronaut.png", "coffee.png", "chelsea.png")]
    return [vdata.square(vdata.read_image(p), SIZE) for p in files]


@pytest.mark.parametrize("name", ["JanusVQVAE", "Emu3VQVAE", "ChameleonVQVAE", "VQModel"])
def test_codes_and_pictures_are_the_library_s_own(saved, photos, name):
    models, specs = saved
    library = models[name].eval()
    mine = load_published(parse_spec(specs[name], "image_tokenizer"))
    x = vdata.to_tensor(photos)
    codes = mine.encode(x)
    with torch.no_grad():
        if name == "Emu3VQVAE":
            sizes = torch.tensor([[SIZE, SIZE]] * len(x))
            theirs = torch.stack(library.encode(x, image_sizes=sizes).image_tokens)
        elif name == "VQModel":
            theirs = library.quantize(library.encode(x).latents)[2][2]
        else:
            theirs = library.encode(x).image_tokens
    assert codes.shape == (len(x), mine.tokens_per_item)
    assert torch.equal(codes.flatten(), theirs.flatten())
    assert mine.num_codes == 64
    if name == "ChameleonVQVAE":
        with pytest.raises(TokenizerError, match="ChameleonVQVAE has no decoder"):
            mine.decode(codes)
        return
    with torch.no_grad():
        if name == "JanusVQVAE":
            reference = library.decode(theirs.view(len(x), -1))
        elif name == "Emu3VQVAE":
            reference = library.decode(theirs)
        else:  # the library's decode of the latents quantises them itself
            reference = library.decode(library.encode(x).latents).sample
    torch.testing.assert_close(mine.decode(codes), reference.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    assert mine.decode(codes).shape == (len(x), 3, SIZE, SIZE)


def test_a_prefix_reads_only_its_tensors_from_only_their_shards(saved, photos):
    _, specs = saved
    whole = load_published(parse_spec(specs["JanusVQVAE"], "image_tokenizer"))
    part = load_published(parse_spec(specs["janus-full"], "image_tokenizer"))
    x = vdata.to_tensor(photos)
    assert torch.equal(whole.encode(x), part.encode(x))
    assert part.source == whole.source  # the same tensors: the same tokenizer


def test_grid_follows_resolution_and_downsampling():
    janus = transformers.JanusVQVAEConfig().to_dict()  # the published Janus's levels
    spec = parse_spec({"library": "transformers", "class": "JanusVQVAE", "path": "."}, "x")
    assert 384 // _factor(spec, janus) == 24
    emu3 = transformers.Emu3VQVAEConfig().to_dict()
    assert _factor(parse_spec({**vars_of(spec), "class": "Emu3VQVAE"}, "x"), emu3) == 8


def vars_of(spec) -> dict:
    return {"library": spec.library, "class": spec.class_name, "path": spec.path}


def test_pickles_auto_map_escaping_indexes_hub_ids_offline_and_unknown_classes_are_refused(
    saved, tmp_path, monkeypatch
):
    models, _ = saved
    spec = {"library": "transformers", "class": "JanusVQVAE", "path": str(tmp_path)}
    (tmp_path / "config.json").write_text(json.dumps(models["JanusVQVAE"].config.to_dict()))
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(TokenizerError, match=r"pytorch_model\.bin is a pickle"):
        load_published(parse_spec(spec, "image_tokenizer"))
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(TokenizerError, match="auto_map"):
        load_published(parse_spec(spec, "image_tokenizer"))
    index = {"weight_map": {"encoder.conv_in.weight": "../elsewhere.safetensors"}}
    (tmp_path / "config.json").write_text(json.dumps(models["JanusVQVAE"].config.to_dict()))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(TokenizerError, match="outside its folder"):
        load_published(parse_spec(spec, "image_tokenizer"))
    (tmp_path / "model.safetensors.index.json").unlink()
    no_size = {k: v for k, v in saved[1]["VQModel"].items() if k != "resolution"}
    with pytest.raises(TokenizerError, match="set resolution in the recipe"):
        load_published(parse_spec(no_size, "image_tokenizer"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerError, match="HF_HUB_OFFLINE is set"):
        load_published(parse_spec({**spec, "path": "deepseek-community/Janus-Pro-1B"}, "x"))
    with pytest.raises(ConfigError, match="is not one of"):
        parse_spec({**spec, "class": "os.system"}, "image_tokenizer")
    with pytest.raises(ConfigError, match="did you mean 'prefix'"):
        parse_spec({**spec, "prefx": "model."}, "image_tokenizer")
    with pytest.raises(ConfigError, match=r"image_tokenizer\.framing 'rows' is not one of"):
        parse_spec({**spec, "framing": "rows"}, "image_tokenizer")
    with pytest.raises(ConfigError, match="only an image_tokenizer takes emu3 framing"):
        TokenizerRecipe(video_tokenizer={**spec, "framing": "emu3"})


def test_the_vocabulary_reserves_the_codebook_and_refuses_another_tokenizer(saved, tmp_path):
    _, specs = saved
    recipe = TokenizerRecipe(image_tokenizer=specs["JanusVQVAE"])
    books = reserved_codebooks(recipe)
    vocab = Vocab.build(300, [], books)
    assert vocab.codebook("image").size == 64
    assert vocab.codebook("image").source.startswith("transformers JanusVQVAE 32px")
    assert Vocab.from_json(json.loads(json.dumps(vocab.to_json()))) == vocab
    recorded = vocab.to_json()["codebooks"][0]["tokenizer"]  # how to load it, e.g. after export
    assert recorded == {**specs["JanusVQVAE"], "fit": "crop"}
    path = specs["JanusVQVAE"]["path"]
    moved = [(*b[:4], b[4].replace(path, "/elsewhere")) if len(b) > 4 else b for b in books]
    assert Vocab.build(300, [], moved).fingerprint == vocab.fingerprint  # where is not what
    visual = VisualTokenizers(recipe, vocab)
    spans = visual.encode_many([_image_record()])
    assert len(spans[0][0][0]) == 2 + 64  # <img> 8 x 8 codes </img>

    # a codebook larger than the range the vocabulary reserves: refused by name
    small = Vocab.build(300, [], [("image", 32), ("mask", 1024), ("video", 8192)])
    with pytest.raises(VocabError, match=r"JanusVQVAE .* codebook of 64 codes does not fit"):
        VisualTokenizers(recipe, small).model("image")

    # the same class and config with other weights: another source, another fingerprint
    other = tmp_path / "other"
    changed = _tiny_models()["JanusVQVAE"]
    with torch.no_grad():
        changed.quantize.embedding.weight.add_(1.0)
    changed.save_pretrained(other)
    recipe2 = TokenizerRecipe(image_tokenizer={**specs["JanusVQVAE"], "path": str(other)})
    with pytest.raises(VocabError, match="not the image tokenizer the vocabulary was made with"):
        VisualTokenizers(recipe2, vocab).model("image")
    assert Vocab.build(300, [], reserved_codebooks(recipe2)).fingerprint != vocab.fingerprint


def _image_record():
    from mmfm.core.types import ImageRecord

    picture = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    return ImageRecord("x", picture, "a caption", "test")


def test_a_published_tokenizer_codes_every_frame_of_a_clip_with_lwm_framing(saved, photos):
    from mmfm.core.types import Modality, VideoRecord

    models, specs = saved
    recipe = TokenizerRecipe(video_tokenizer=specs["VQModel"])
    vocab = Vocab.build(300, [], reserved_codebooks(recipe))
    book = vocab.codebook("video")
    assert book.size == 64 and book.source.startswith("diffusers VQModel 32px")
    visual = VisualTokenizers(recipe, vocab)
    clip = np.stack(photos)  # three 32 x 32 frames
    (ids, modality), *_ = visual.encode_many([VideoRecord("clip", clip, None, "test")])[0]
    assert modality == Modality.VIDEO
    eof, eov = vocab.special("<eof>"), vocab.special("<eov>")
    body = ids[1:-1]
    assert [i for i in body if i in (eof, eov)] == [eof, eof, eov]
    library = models["VQModel"].eval()
    with torch.no_grad():
        theirs = library.quantize(library.encode(vdata.to_tensor(photos)).latents)[2][2]
    codes = [i - book.offset for i in body if i not in (eof, eov)]
    assert codes == theirs.tolist()
    frames = visual.decode(Modality.VIDEO, body)
    assert frames.shape == (3, SIZE, SIZE, 3) and frames.dtype == np.uint8


def test_emu3_compresses_every_four_frames_of_a_clip_into_one_grid(saved, photos):
    """Emu3's own video tokens: the library's encode of the clip `[1, T, 3, S, S]`, each grid
    standing for temporal_downsample_factor (4) frames, framed as LWM frames its frames; five
    frames are padded with the last to eight (the library would drop the fifth)."""
    from mmfm.core.types import Modality, VideoRecord

    models, specs = saved
    recipe = TokenizerRecipe(video_tokenizer=specs["Emu3VQVAE"])
    vocab = Vocab.build(300, [], reserved_codebooks(recipe))
    visual = VisualTokenizers(recipe, vocab)
    clip = np.stack([*photos, *photos[:2]])  # five 32 x 32 frames
    (ids, modality), *_ = visual.encode_many([VideoRecord("clip", clip, None, "test")])[0]
    eof, eov = vocab.special("<eof>"), vocab.special("<eov>")
    body = ids[1:-1]
    assert modality == Modality.VIDEO and [i for i in body if i in (eof, eov)] == [eof, eov]
    library = models["Emu3VQVAE"].eval()
    padded = vdata.to_tensor([*photos, *photos[:2], photos[1], photos[1], photos[1]])
    sizes = torch.tensor([[SIZE, SIZE]])
    with torch.no_grad():
        (theirs,) = library.encode(padded[None], image_sizes=sizes).image_tokens
        want = vdata.to_uint8(library.decode(theirs[None])[0].clamp(-1, 1))
    assert theirs.shape == (2, 16, 16)
    offset = vocab.codebook("video").offset
    assert [i - offset for i in body if i not in (eof, eov)] == theirs.flatten().tolist()
    frames = visual.decode(Modality.VIDEO, body)
    assert frames.shape == (8, SIZE, SIZE, 3) and np.array_equal(frames, want)
