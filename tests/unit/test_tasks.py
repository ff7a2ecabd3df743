"""mmfm/tasks: examples read as `mmfm prepare` reads their source, prompts laid out as
training tasks' prompts, and the scorers on answers whose scores are known (the target's
own tokens, an empty answer, known labels); bad task configs and sources refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmfm.config import load_config
from mmfm.config.schema import TaskConfig
from mmfm.core.errors import ConfigError, DataError
from mmfm.core.types import Modality
from mmfm.decoding.outputs import Span
from mmfm.model import build_model, init_weights
from mmfm.tasks import metrics, scoring
from mmfm.tasks.examples import read_examples
from mmfm.tasks.run import PreparedTask, answer_span, prompt_ids, task_layout
from mmfm.testing import tiny_shape, voc_export
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.visual import data as vdata

from helpers import tiny_visual_recipe

REPO = Path(__file__).resolve().parents[2]
BASE = str(REPO / "tokenizers/base.yaml")


@pytest.fixture(scope="module")
def base():
    """The base tokenizer set (text, DNA, SVG; no visual tokenizers) and its layout."""
    tokenizers = Tokenizers.load(load_recipe(BASE))
    return tokenizers, task_layout(tokenizers)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task(name: str, path: Path, **fields) -> TaskConfig:
    return TaskConfig(name=name, paths=[str(path)], tokenizers=BASE, **fields)


def test_task_configs_say_what_to_change():
    for fields, words in [
        ({"name": "segmentaton"}, "eval.tasks[].name='segmentaton' is not one of"),
        ({"name": "svg", "kind": "voc"}, "eval.tasks[svg].kind='voc' is not one of svg"),
        ({"name": "svg", "paths": []}, "eval.tasks[svg].paths"),
        ({"name": "svg", "tokenizers": ""}, "eval.tasks[svg].tokenizers"),
        ({"name": "text", "examples": 0}, "examples must be positive"),
        ({"name": "text", "options": {"label_repeat": 3}}, "for dna-classify only"),
        ({"name": "segmentation", "prefixes": [0, 4]}, "each >= 1"),
    ]:
        kwargs = {"paths": ["x"], "tokenizers": BASE, **fields}
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            TaskConfig(**kwargs)
    assert TaskConfig(name="segmentation", paths=["x"], tokenizers=BASE).kind == "voc"


def test_examples_are_the_first_records_and_prompts_end_as_training_rows(tmp_path, base):
    """A text answer follows `<sep>`, a framed one its opening delimiter, as in the
    `<s> prompt [<sep>] response </s>` rows of prompt-response tasks."""
    tokenizers, layout = base
    rows = [{"prompt": f"what is {i} + {i}?", "response": str(2 * i)} for i in range(5)]
    examples = read_examples(task("text", _jsonl(tmp_path / "t.jsonl", rows), examples=3))
    assert [e.target.value for e in examples] == ["0", "2", "4"]
    ids = prompt_ids(examples[1], tokenizers, layout)
    text = tokenizers.text
    assert ids == [text.bos_id, *text.encode("what is 1 + 1?"), layout.specials["<sep>"]]
    circle = '<svg viewBox="0 0 8 8"><circle r="4" fill="red"/></svg>'
    path = _jsonl(tmp_path / "s.jsonl", [{"prompt": "a red circle", "response": {"svg": circle}}])
    (svg,) = read_examples(task("svg", path, kind="prompt-response"))
    assert prompt_ids(svg, tokenizers, layout)[-1] == layout.delimiters[Modality.SVG][0]  # <svg>


def test_svg_files_prompt_with_their_names_words(tmp_path, real_data):
    """kind svg: the caption is the file name's words, as completion_only makes it."""
    examples = read_examples(task("svg", real_data("svg"), examples=2))
    assert [e.prompt[0].value for e in examples] == ["back symbolic", "back"]
    assert all(e.target.value.lstrip().startswith("<") for e in examples)


def test_sources_without_the_needed_fields_are_refused(tmp_path):
    mask_answers = _jsonl(tmp_path / "svg.jsonl", [{"prompt": "x", "response": {"svg": "<svg/>"}}])
    with pytest.raises(DataError, match=r"svg.jsonl:svg:1: a response of svg; the task scores one"):
        read_examples(task("text", mask_answers))
    no_dna = _jsonl(tmp_path / "l.jsonl", [{"prompt": "ACGT", "response": "promoter"}])
    with pytest.raises(DataError, match="a prompt without DNA"):
        read_examples(task("dna-classify", no_dna))
    empty = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    with pytest.raises(DataError, match=r"holds no example \(1 missing_field\)"):
        read_examples(task("text", empty))
    with pytest.raises(ConfigError, match=r"options.phrasee: not an option of a source"):
        read_examples(task("text", empty, options={"phrasee": "x"}))
    with pytest.raises(ConfigError, match=r"options.paths"):
        read_examples(task("text", empty, options={"paths": ["y"]}))


def _answer(ids: list[int], modality: str, layout) -> Span:
    """The span a generation of `ids` (then its closer or </s>) makes."""
    opener, closer = layout.delimiters[Modality.SVG]
    if modality == "text":
        opener, closer = layout.specials["<sep>"], layout.eos
    prompt = [layout.bos, opener]
    return answer_span(prompt, [*ids, closer], modality, layout)


def test_an_svg_answer_of_its_target_scores_ssim_1_and_an_empty_one_does_not(real_data, base):
    tokenizers, layout = base
    cfg = task("svg", real_data("svg"), examples=3, render_size=64)
    examples = read_examples(cfg)
    own = [_answer(tokenizers.text.encode(e.target.value), "svg", layout) for e in examples]
    assert [layout.decode_text(a.body) for a in own] == [e.target.value for e in examples]
    perfect = scoring.svg(cfg, examples, own, tokenizers, layout)
    assert perfect == {"parse_rate": 1.0, "render_rate": 1.0, "mse": 0.0, "ssim": 1.0}
    # the target as the SVG tokenizer writes it (numbers rounded): drawn all but the same
    own = [_answer(tokenizers.svg.encode(e.target.value, e.where), "svg", layout) for e in examples]
    rounded = scoring.svg(cfg, examples, own, tokenizers, layout)
    assert rounded["render_rate"] == 1.0 and rounded["ssim"] > 0.999 and rounded["mse"] < 1e-4
    blank = scoring.svg(cfg, examples, [None, *own[1:]], tokenizers, layout)
    assert blank["parse_rate"] == blank["render_rate"] == pytest.approx(2 / 3)
    assert blank["ssim"] < perfect["ssim"] and blank["mse"] > 0


def test_labels_and_text_answers_score_what_they_match(tmp_path, base):
    tokenizers, layout = base
    rows = [
        {"prompt": {"dna": "ACGTACGTAA" * (i + 1)}, "response": label}
        for i, label in enumerate(["promoter", "enhancer", "promoter", "enhancer"])
    ]
    cfg = task("dna-classify", _jsonl(tmp_path / "dna.jsonl", rows), options={"label_repeat": 3})
    examples = read_examples(cfg)
    assert [e.target.value for e in examples] == ["promoter", "enhancer"] * 2  # one label each
    said = ["promoter promoter promoter", "promoter enhancer enhancer", "enhancer", "junk"]
    answers = [_answer(tokenizers.text.encode(s), "text", layout) for s in said]
    scores = scoring.dna_classify(cfg, examples, answers, tokenizers, layout)
    assert scores == {"accuracy": 0.5, "mcc": pytest.approx(scores["mcc"]), "valid": 0.75}
    assert -1 <= scores["mcc"] < 1
    text = task("text", tmp_path / "dna.jsonl", kind="prompt-response")
    exact = scoring.text(text, examples[:2], [*answers[:1], None], tokenizers, layout)
    assert exact["exact_match"] == 0.0  # "promoter promoter promoter" is not "promoter"
    assert 0 < exact["token_accuracy"] < 1


def test_a_mask_answer_of_its_targets_codes_scores_the_tokenizers_own_iou(tmp_path, real_data):
    """Segmentation on a VOC export of real photos, each answer the target mask's own codes:
    every IoU is the mask tokenizer's reconstruction of the target at its resolution, and
    miou@k the reconstruction from the first k codes; a missing answer is an empty mask."""

    recipe = tiny_visual_recipe(tmp_path)
    voc = voc_export(tmp_path / "voc", real_data("photos"))
    cfg = TaskConfig(name="segmentation", paths=[str(voc)], tokenizers=str(recipe), examples=3)
    tokenizers = Tokenizers.load(load_recipe(recipe))
    layout = task_layout(tokenizers)
    examples = read_examples(cfg)
    # astronaut, camera, chelsea: the first three label maps; the phrase first, as trained
    assert [e.prompt[0].value for e in examples] == [
        "segment the person", "segment the camera", "segment the cat"
    ]  # fmt: skip
    own = []
    for e in examples:
        ids, _ = tokenizers.visual.span("mask", e.target.value)
        own.append(answer_span([layout.bos, ids[0]], ids[1:], "mask", layout))
    scores = scoring.segmentation(cfg, examples, own, tokenizers, layout)
    assert sorted(scores) == sorted(
        ["miou", "ciou", "valid", *(f"miou@{k}" for k in (1, 2, 4, 8, 16, 32))]
    )
    size = tokenizers.visual.model("mask").cfg.mask_size
    targets = [vdata.square(e.target.value, size) for e in examples]

    def iou(k: int) -> float:
        pairs = [
            metrics.overlap(tokenizers.visual.decode(Modality.MASK, a.body[:k]), t)
            for a, t in zip(own, targets, strict=True)
        ]
        return metrics.mask_ious(pairs)["miou"]

    assert scores["valid"] == 1.0 and scores["miou"] == pytest.approx(iou(32))
    assert scores["miou@4"] == pytest.approx(iou(4)) and scores["miou@32"] == scores["miou"]
    missing = scoring.segmentation(cfg, examples, [None, *own[1:]], tokenizers, layout)
    assert missing["valid"] == pytest.approx(2 / 3)
    first = metrics.overlap(tokenizers.visual.decode(Modality.MASK, own[0].body), targets[0])
    assert missing["miou"] == pytest.approx(scores["miou"] - first[0] / first[1] / 3)


def test_an_image_answer_of_its_targets_codes_is_its_reconstruction(tmp_path, real_data):
    """caption -> picture scored against the target's reconstruction: the target's own codes
    give PSNR at its maximum and SSIM 1; an undecodable answer is a black picture."""

    recipe = tiny_visual_recipe(tmp_path)
    (tmp_path / "pics").mkdir()
    for stem in ("coffee", "chelsea"):
        shutil.copy(real_data("photos") / f"{stem}.png", tmp_path / "pics" / f"{stem}.png")
        (tmp_path / "pics" / f"{stem}.txt").write_text(f"a photo of {stem}")
    cfg = TaskConfig(name="image", paths=[str(tmp_path / "pics")], tokenizers=str(recipe))
    tokenizers = Tokenizers.load(load_recipe(recipe))
    layout = task_layout(tokenizers)
    examples = read_examples(cfg)
    assert [e.prompt[0].value for e in examples] == ["a photo of chelsea", "a photo of coffee"]
    own = []
    for e in examples:
        ids, _ = tokenizers.visual.span("image", e.target.value)
        own.append(answer_span([layout.bos, ids[0]], ids[1:], "image", layout))
    scores = scoring.image(cfg, examples, own, tokenizers, layout)
    assert scores == {"psnr": metrics.MAX_PSNR, "ssim": 1.0, "valid": 1.0}
    cut = own[1].body[:3]  # an image span cut short does not decode
    short = answer_span([layout.bos, layout.delimiters[Modality.IMAGE][0]], cut, "image", layout)
    scores = scoring.image(cfg, examples, [own[0], short], tokenizers, layout)
    assert scores["valid"] == 0.5 and scores["psnr"] < metrics.MAX_PSNR and scores["ssim"] < 1


def test_a_video_answer_of_its_targets_codes_is_its_reconstruction(tmp_path, real_data):
    """caption -> clip scored frame by frame against the target clip's reconstruction; an
    answer cut after its first frame is that frame, the missing ones black."""
    recipe = tiny_visual_recipe(tmp_path)
    (tmp_path / "clips").mkdir()
    shutil.copy(real_data("gif") / "no_time_for_that_tiny.gif", tmp_path / "clips/cat.gif")
    (tmp_path / "clips/cat.txt").write_text("a cat turns its head")
    cfg = TaskConfig(name="video", paths=[str(tmp_path / "clips")], tokenizers=str(recipe))
    tokenizers = Tokenizers.load(load_recipe(recipe))
    layout = task_layout(tokenizers)
    (example,) = read_examples(cfg)
    assert example.prompt[0].value == "a cat turns its head" and len(example.target.value) == 4
    ids, _ = tokenizers.visual.span("video", example.target.value)
    opener = layout.delimiters[Modality.VIDEO][0]
    own = answer_span([layout.bos, opener], ids[1:], "video", layout)
    scores = scoring.video(cfg, [example], [own], tokenizers, layout)
    assert scores == {"psnr": metrics.MAX_PSNR, "ssim": 1.0, "valid": 1.0}
    frame = layout.tokens_per_item["video"]
    cut = answer_span([layout.bos, opener], ids[1 : 1 + frame + 5], "video", layout)
    scores = scoring.video(cfg, [example], [cut], tokenizers, layout)
    assert scores["valid"] == 1.0 and scores["psnr"] < metrics.MAX_PSNR
    reference = tokenizers.visual.decode(Modality.VIDEO, ids[1:-1])
    black = np.zeros_like(reference[0])
    expected = np.mean([1.0, *(metrics.ssim(black, f) for f in reference[1:])])
    assert scores["ssim"] == pytest.approx(expected)


def test_a_prepared_task_scores_a_model_in_memory_the_same_each_time(tmp_path, base):
    """The training loop's use: examples read once, a model in training mode scored twice
    with sampling on (the same seed, the same metrics) and left in training mode."""
    tokenizers, layout = base
    size = -(-tokenizers.vocab.size // 64) * 64
    cfg = load_config(None, [*tiny_shape(n_layers=1, max_seq_len=256), f"model.vocab_size={size}"])
    model = build_model(cfg.model)
    model.to_empty(device="cpu")
    init_weights(model, cfg.model, 0)
    rows = [{"prompt": f"what is {i} + {i}?", "response": str(2 * i)} for i in range(3)]
    path = _jsonl(tmp_path / "t.jsonl", rows)
    prepared = PreparedTask(task("text", path, temperature=1.0, batch_size=2), tokenizers, layout)
    assert prepared.sampling.max_new_tokens == 1 + 1 + 8  # the longest answer, </s>, slack
    first = prepared.run(model)
    assert set(first) == {"task/text/exact_match", "task/text/token_accuracy"}
    assert model.training and prepared.run(model) == first
