"""`mmfm prepare` shaping records: condition dropout and caption order drawn from the seed
(whatever the workers and shard size) and counted in the manifest; prompt / response tasks
whose prompts get no loss in the training batches."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmfm.core.errors import DataError
from mmfm.core.types import Modality
from mmfm.data.loader import StreamingLoader
from mmfm.data.shards import read_shard
from mmfm.prepare import load_prepare_recipe, prepare
from mmfm.testing import source_spec, stream_settings
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.text import BOS, EOS
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.visual.train import VisualRecipe, build, save_visual

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_prepare_tasks")

REPO = Path(__file__).resolve().parents[2]
IMAGE = {"image_size": 32, "patch": 8, "dim": 32, "heads": 2, "encoder_layers": 1,
         "qformer_layers": 1, "decoder_layers": 1, "tokens": 8, "codebook_size": 64}  # fmt: skip
MASK = {"mask_size": 32, "stem": 4, "dim": 32, "heads": 2, "encoder_layers": 1,
        "latent_layers": 1, "decoder_layers": 1, "tokens": 32, "codebook_size": 64,
        "levels": [8, 16, 32], "level_weights": [2.0, 1.0, 1.0]}  # fmt: skip
COLOURS = ("red", "green", "blue", "grey")
PHOTOS = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """300 small pictures captioned by their names, a tasks jsonl, and a tokenizer recipe with
    the base text model and tiny untrained image / mask tokenizers."""
    root = tmp_path_factory.mktemp("shaping")
    (root / "photos").mkdir()
    rgb = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "grey": (128,) * 3}
    for i in range(PHOTOS):
        colour = COLOURS[i % 4]
        Image.new("RGB", (24, 16), rgb[colour]).save(root / "photos" / f"a_{colour}_square_{i}.png")
    for kind, model in (("seed_image", IMAGE), ("himtok_mask", MASK)):
        save_visual(build(VisualRecipe(kind=kind, model=model)), root / kind)
    (root / "tok.yaml").write_text(
        f"output_dir: {REPO / 'tokenizers/base'}\nimage_tokenizer: {root / 'seed_image'}\n"
        f"mask_tokenizer: {root / 'himtok_mask'}\n"
    )
    tasks = root / "tasks"
    tasks.mkdir()
    Image.new("RGB", (32, 32), (200, 200, 200)).save(tasks / "cat.png")
    Image.fromarray(np.eye(32, dtype=np.uint8) * 255).save(tasks / "cat.mask.png")
    lines = [
        {"prompt": {"dna": "TATAAAAGGCCTTGACGT" * (1 + i % 3)}, "response": label}
        for i, label in enumerate(["promoter", "not promoter"] * 10)
    ]
    circle = '<svg viewBox="0 0 8 8"><circle r="4" fill="red"/></svg>'
    lines += [
        {"prompt": "a red circle", "response": {"svg": circle}},
        {"prompt": [{"image": "cat.png"}, "segment the cat"], "response": {"mask": "cat.mask.png"}},
    ]
    (tasks / "tasks.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def recipe(corpus: Path, out: str, seed: int = 0, shard_size: int = 100, limit: int = 0) -> Path:
    path = corpus / f"{out}.yaml"
    path.write_text(
        f"name: t\noutput: {corpus / out}\ntokenizer: {corpus / 'tok.yaml'}\n"
        f"shard_size: {shard_size}\nseed: {seed}\nsources:\n"
        f"  - {{kind: image-text, name: photos, paths: [{corpus / 'photos'}], uncond_ratio: 0.1,"
        f" order: both, reverse_ratio: 0.5, limit: {limit}}}\n"
        f"  - {{kind: prompt-response, name: sft, paths: [{corpus / 'tasks'}], label_repeat: 3}}\n"
    )
    return path


def documents(out: Path) -> dict[str, tuple]:
    """key -> (tokens, no_loss) of every document in the output's shards."""
    docs = [d for p in sorted(out.glob("t-*.tar")) for d in read_shard(str(p))]
    return {d.key: (tuple(d.tokens.tolist()), d.no_loss) for d in docs}


@pytest.fixture(scope="module")
def prepared(corpus) -> dict:
    """The manifest of the recipe prepared into `a`, with 2 workers."""
    return prepare(load_prepare_recipe(recipe(corpus, "a")), workers=2, progress=False)


def test_condition_dropout_and_order_come_from_the_seed_and_are_counted(corpus, prepared):
    manifest = prepared
    shaping = manifest["sources"]["photos"]["shaping"]
    print("realised on", PHOTOS, "pictures:", shaping)
    assert shaping["uncond"]["of"] == PHOTOS and 0.05 <= shaping["uncond"]["ratio"] <= 0.15
    assert shaping["image_first"]["of"] == PHOTOS - shaping["uncond"]["count"]
    assert 0.4 <= shaping["image_first"]["ratio"] <= 0.6
    assert "shaping" not in manifest["sources"]["sft"] and manifest["rejected"] == {}

    docs = documents(corpus / "a")
    again = prepare(
        load_prepare_recipe(recipe(corpus, "b", shard_size=70)), workers=3, progress=False
    )
    assert documents(corpus / "b") == docs  # other workers and shards: the same choices
    assert again["sources"]["photos"]["shaping"] == shaping
    prepare(load_prepare_recipe(recipe(corpus, "c", seed=1, limit=60)), workers=2, progress=False)
    other = {k: v for k, v in documents(corpus / "c").items() if k.startswith("a_")}
    assert len(other) == 60 and sum(docs[k] != v for k, v in other.items()) >= 10

    toks = Tokenizers.load(load_recipe(str(corpus / "tok.yaml")))
    img_open, img_close = toks.vocab.delimiters(Modality.IMAGE)
    kinds = Counter()
    for key, (tokens, _) in docs.items():
        if not key.startswith("a_"):
            continue
        caption = toks.text.encode(key.replace("_", " "))
        close = tokens.index(img_close)
        if tokens[1] == img_open and tokens[close + 1 :] == (*caption, EOS):
            kinds["image_first"] += 1
        elif tokens[1 : 1 + len(caption)] == tuple(caption) and tokens[-2] == img_close:
            kinds["text_first"] += 1
        elif tokens[:2] == (BOS, img_open) and tokens[close + 1 :] == (EOS,):
            kinds["uncond"] += 1
    assert kinds["uncond"] == shaping["uncond"]["count"]
    assert kinds["image_first"] == shaping["image_first"]["count"]
    assert sum(kinds.values()) == PHOTOS


def test_task_prompts_get_no_loss_in_training_batches(corpus, prepared):
    assert prepared["sources"]["sft"]["documents"] == 22
    docs = {k: v for k, v in documents(corpus / "a").items() if k.startswith("tasks:")}
    assert len(docs) == 22
    toks = Tokenizers.load(load_recipe(str(corpus / "tok.yaml")))
    spans = toks.decode(docs["tasks:1"][0])
    assert spans[-1] == ("text", "promoter promoter promoter")  # replicated 3 times
    assert [s[0] for s in toks.decode(docs["tasks:22"][0])] == ["image", "text", "mask"]

    urls = tuple(str(p) for p in sorted((corpus / "a").glob("t-*.tar")))
    settings = stream_settings(1, seq_len=256, shuffle_buffer=8, pack_buffer=8)
    loader = StreamingLoader([source_spec("t", urls, max_epochs=1)], settings, 1)
    seen = Counter()
    with pytest.raises(DataError, match="max_epochs"):
        while True:
            batch = loader.next_step()[0]
            tokens, doc_ids = batch.tokens[0].tolist(), batch.doc_ids[0]
            for d in doc_ids.unique().tolist():
                at = (doc_ids == d).nonzero().flatten().tolist()
                body = tuple(tokens[at[0] : at[-1] + 1])
                if body not in {t for t, _ in docs.values()}:
                    continue  # a picture document, or padding
                ((_, n),) = next(nl for t, nl in docs.values() if t == body)
                weights = batch.loss_weights[0, at].tolist()  # of targets body[1:]
                assert weights[: n - 1] == [0.0] * (n - 1), "a prompt token is a target"
                assert weights[n - 1 : -1] == [1.0] * (len(body) - n)
                seen["tasks"] += 1
    assert seen["tasks"] == 22
