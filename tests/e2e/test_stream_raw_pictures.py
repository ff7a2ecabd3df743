"""Raw image-text shards (img2dataset's `.jpg` + `.txt`) tokenized in the training stream with
a SEED-style image tokenizer: the pictures of a window of samples are encoded in one batched
call, giving the documents of one-at-a-time encoding; resume mid-window is exact with and
without loader workers; the training device is refused for the tokenizers in workers."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmfm.config import load_config
from mmfm.config.schema import RawFields
from mmfm.core.errors import ConfigError
from mmfm.data import raw_stream
from mmfm.data.deal import Unit
from mmfm.data.loader import StreamingLoader
from mmfm.data.raw_stream import POSITIONS
from mmfm.data.settings import SourceSpec, StreamSettings
from mmfm.data.skips import Skips
from mmfm.data.units import read_raw_unit
from mmfm.testing import source_spec, stream_settings
from mmfm.tokenization.visual.records import VisualTokenizers
from mmfm.tokenization.visual.train import VisualRecipe, build, save_visual

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_stream_raw_pictures")

REPO = Path(__file__).resolve().parents[2]
TINY_IMAGE = {
    "image_size": 32, "patch": 8, "dim": 32, "heads": 2, "encoder_layers": 1,
    "qformer_layers": 1, "decoder_layers": 1, "tokens": 8, "codebook_size": 64,
}  # fmt: skip
"""The image tokenizer of tests/e2e/test_prepare_raw.py: untrained (what is measured here is
that batching and resume give the same codes, not their quality)."""


@pytest.fixture(scope="module")
def photos(tmp_path_factory, real_data) -> dict:
    """Three raw shards, each of the 26 scikit-image photos as small JPEGs with captions (one
    sample without a caption), and a tokenizer recipe with the tiny image tokenizer."""
    root = tmp_path_factory.mktemp("raw-pictures")
    save_visual(build(VisualRecipe(kind="seed_image", model=TINY_IMAGE)), root / "seed")
    (root / "tok.yaml").write_text(
        f"output_dir: {REPO / 'tokenizers/base'}\nimage_tokenizer: {root / 'seed'}\n"
    )
    jpegs = {}
    for path in sorted(real_data("photos").iterdir()):
        picture = Image.open(path).convert("RGB")
        picture.thumbnail((96, 96))
        jpg = io.BytesIO()
        picture.save(jpg, "JPEG", quality=90)
        jpegs[path.stem] = jpg.getvalue()
    with wds.ShardWriter(str(root / "photos-%06d.tar"), maxcount=len(jpegs), verbose=0) as sink:
        for r in range(3):
            for stem, jpg in jpegs.items():
                sample = {"__key__": f"{r}-{stem}", "jpg": jpg}
                if (r, stem) != (0, "chelsea"):
                    sample["txt"] = stem.replace("_", " ").encode()
                sink.write(sample)
    urls = tuple(sorted(str(p) for p in root.glob("photos-*.tar")))
    assert len(urls) == 3
    return {"urls": urls, "tok": str(root / "tok.yaml")}


def spec(photos, batch: int = 4, device: str = "cpu") -> SourceSpec:
    return source_spec(
        "photos",
        photos["urls"],
        tokenize=photos["tok"],
        fields=RawFields(),
        tokenize_batch=batch,
        tokenize_device=device,
    )


def settings(n_streams: int) -> StreamSettings:
    return stream_settings(n_streams, seed=5, seq_len=64, shuffle_buffer=8, pack_buffer=4)


def as_lists(read) -> list[tuple]:
    return [(p, d.key, d.tokens.tolist(), d.modality.tolist()) for p, d in read]


def test_the_pictures_of_a_window_are_encoded_in_one_call(photos, monkeypatch):
    calls = []
    encode = VisualTokenizers._encode

    def counted(self, name, pictures, device):
        calls.append(len(pictures))
        return encode(self, name, pictures, device)

    monkeypatch.setattr(VisualTokenizers, "_encode", counted)
    url = photos["urls"][0]  # 26 samples, the fifth without a caption
    batched = as_lists(read_raw_unit(Unit(url, 1, 0), 0, Skips(1.0), spec(photos), settings(1)))
    pictures = [n for n in calls if n]
    calls.clear()
    skips = Skips(1.0)
    alone = as_lists(read_raw_unit(Unit(url, 1, 0), 0, skips, spec(photos, 1), settings(1)))
    assert pictures == [4, 3, 4, 4, 4, 4, 2]  # windows 0-3, 4-7 (one is missing), ..., 24-25
    assert [n for n in calls if n] == [1] * 25
    assert batched == alone and len(alone) == 25
    assert dict(skips.counts) == {"missing_field": 1}
    # Decoded pixels past the bound split a window's call (here: one picture each).
    calls.clear()
    monkeypatch.setattr(raw_stream, "PICTURE_BYTES", 1)
    split = as_lists(read_raw_unit(Unit(url, 1, 0), 0, Skips(1.0), spec(photos), settings(1)))
    assert [n for n in calls if n] == [1] * 25 and split == batched
    # Read from the middle of a window: its first samples are encoded again, not delivered.
    second = batched[5][0] // POSITIONS
    middle = read_raw_unit(
        Unit(url, 1, 0), second * POSITIONS, Skips(1.0), spec(photos), settings(1)
    )
    assert as_lists(middle) == batched[5:]


def batches(ld: StreamingLoader, steps: int) -> list[list[dict]]:
    return [
        [{k: v.numpy() for k, v in vars(b).items()} for b in ld.next_step()] for _ in range(steps)
    ]


def same(a, b) -> bool:
    return all(
        np.array_equal(x[k], y[k])
        for sa, sb in zip(a, b, strict=True)
        for x, y in zip(sa, sb, strict=True)
        for k in x
    )


def test_raw_pictures_resume_mid_window_exactly_with_and_without_workers(photos):
    straight = StreamingLoader([spec(photos)], settings(2), 1)
    batches(straight, 3)
    state = straight.state_dict()
    readers = [s["readers"][0] for s in straight.snapshots.values()]
    assert {epoch for epoch, _, _ in readers} == {0}
    assert any(position // POSITIONS % 4 for *_, position in readers)  # stopped mid-window
    want = batches(straight, 6)
    assert len({tuple(s[0]["tokens"][0]) for s in want}) == 6  # rows differ
    for workers in (0, 2):
        with StreamingLoader([spec(photos)], settings(2), 1, num_workers=workers) as resumed:
            resumed.load_state_dict(state)
            got = batches(resumed, 6)
        assert same(got, want), workers


def test_tokenizers_on_the_training_device_need_no_loader_workers(photos):
    source = f"{{name: photos, paths: [{photos['urls'][0]}], tokenize: {photos['tok']}"
    with pytest.raises(ConfigError, match=r"tokenize_device=cuda needs data.num_workers=0"):
        load_config(None, [f"data.sources=[{source}, tokenize_device: cuda}}]"])
    cfg = load_config(
        None, [f"data.sources=[{source}, tokenize_device: cuda}}]", "data.num_workers=0"]
    )
    assert cfg.data.sources[0].tokenize_device == "cuda"
    with pytest.raises(ConfigError, match="tokenize_device must be cpu or cuda"):
        load_config(None, [f"data.sources=[{source}, tokenize_device: tpu}}]"])
    with pytest.raises(ConfigError, match=r"needs data\.num_workers=0"):
        StreamingLoader([spec(photos, device="cuda")], settings(4), 2, num_workers=1)
    if not torch.cuda.is_available():  # the device itself is not tested on this machine
        with pytest.raises(ConfigError, match="no CUDA device"):
            StreamingLoader([spec(photos, device="cuda")], settings(4), 2)
