"""`mmfm eval CKPT --task NAME` end to end: every task on its own kind of source (a VOC
export of real photos, real SVG icons, DNA and text tasks in jsonl, captioned photos, a
captioned clip), scored in one process into eval.json, the same for the same seed; bad input
refused in one line. The checkpoint is untrained (as tests/e2e/test_generate_cli.py's):
these check the command, not the scores; tests/unit/test_tasks.py checks the scores on
known answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmfm.cli import main
from mmfm.testing import tiny_shape, voc_export
from mmfm.tokenization.vocab import Vocab

import helpers
from helpers import tiny_visual_recipe

# One worker runs this file (make test: --dist loadgroup), so its module fixture is built once.
pytestmark = pytest.mark.xdist_group("test_eval_tasks")

REPO = Path(__file__).resolve().parents[2]
BASE_VOCAB = REPO / "tokenizers/base/vocab.json"
METRICS = {
    "segmentation": {"miou", "ciou", "valid", *(f"miou@{k}" for k in (1, 2, 4, 8, 16, 32))},
    "svg": {"parse_rate", "render_rate", "mse", "ssim"},
    "dna-classify": {"accuracy", "mcc", "valid"},
    "image": {"psnr", "ssim", "valid"},
    "video": {"psnr", "ssim", "valid"},
    "text": {"exact_match", "token_accuracy"},
}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, real_data):
    """(checkpoint, the eval.tasks override of the five tasks, the folder)."""
    root = tmp_path_factory.mktemp("tasks")
    recipe = tiny_visual_recipe(root)
    size = -(-Vocab.load(BASE_VOCAB).size // 64) * 64
    shape = tiny_shape(n_layers=2, seq_len=128, max_seq_len=1024)
    overrides = [*shape, f"model.vocab_size={size}", f"data.vocab={BASE_VOCAB}"]
    ckpt = helpers.random_checkpoint(root / "ckpt", overrides, BASE_VOCAB)
    voc = voc_export(root / "voc", real_data("photos"))
    labels = ["promoter", "other"] * 2
    dna = _jsonl(
        root / "dna.jsonl",
        [{"prompt": {"dna": "TATAAAAGGC" * (1 + i)}, "response": s} for i, s in enumerate(labels)],
    )
    text = _jsonl(
        root / "text.jsonl",
        [{"prompt": f"what is {i} + {i}?", "response": str(2 * i)} for i in range(3)],
    )
    (root / "pics").mkdir()
    for stem in ("coffee", "chelsea"):
        shutil.copy(real_data("photos") / f"{stem}.png", root / "pics" / f"{stem}.png")
        (root / "pics" / f"{stem}.txt").write_text(f"a photo of {stem}")
    (root / "clips").mkdir()
    shutil.copy(real_data("gif") / "no_time_for_that_tiny.gif", root / "clips/cat.gif")
    (root / "clips/cat.txt").write_text("a cat turns its head")
    tasks = [
        f"{{name: segmentation, paths: [{voc}], examples: 3, batch_size: 2}}",
        f"{{name: svg, paths: [{real_data('svg')}], examples: 2, max_new_tokens: 24}}",
        f"{{name: dna-classify, paths: [{dna}], temperature: 1.0, seed: 3}}",
        f"{{name: image, paths: [{root / 'pics'}]}}",
        f"{{name: video, paths: [{root / 'clips'}], max_new_tokens: 70}}",  # a frame
        f"{{name: text, paths: [{text}]}}",
    ]
    tasks = [t.replace("}", f", tokenizers: {recipe}}}") for t in tasks]
    return ckpt, f"eval.tasks=[{', '.join(tasks)}]", root


@pytest.mark.slow
def test_every_task_is_scored_into_eval_json_the_same_for_a_seed(setup, tmp_path, capsys):
    ckpt, tasks, _ = setup
    names = list(METRICS)
    args = ["eval", str(ckpt), *(a for n in names for a in ("--task", n)), tasks]
    main([*args, "--json", str(tmp_path / "a.json")])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "a.json").read_text())
    assert result["tasks"] == names and result["checkpoint"] == str(ckpt)
    metrics = result["metrics"]
    assert set(metrics) == {f"task/{n}/{m}" for n in names for m in METRICS[n]}
    for name, value in metrics.items():
        assert name in printed
        if not name.endswith(("psnr", "mcc")):
            assert 0 <= value <= 1, (name, value)
    assert metrics["task/segmentation/valid"] == 1.0  # the grammar makes every mask decodable
    assert metrics["task/image/valid"] == 1.0
    assert metrics["task/video/valid"] == 1.0  # cut after a frame: its whole frame scored
    assert metrics["task/segmentation/miou@32"] == metrics["task/segmentation/miou"]
    # the same seed, the same sampled labels; in the default eval.json of the working folder
    again = ["eval", str(ckpt), "--task", "dna-classify", tasks]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        main(again)
    second = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert second == {k: v for k, v in metrics.items() if k.startswith("task/dna-classify/")}


def test_bad_tasks_are_one_line_errors(setup, tmp_path, capsys):
    ckpt, tasks, root = setup
    svg_answers = _jsonl(tmp_path / "svg.jsonl", [{"prompt": "x", "response": {"svg": "<svg/>"}}])
    wrong = f"eval.tasks=[{{name: text, paths: [{svg_answers}], tokenizers: {root / 'tok.yaml'}}}]"
    for args, code, words in [
        (["--task", "segmentaton", tasks], 2, "--task 'segmentaton' is not a task"),
        (["--task", "svg"], 2, "no eval.tasks entry named svg"),
        ([str(root / "text.jsonl"), "--task", "text", tasks], 2, "not held-out data"),
        (["--task", "text", "--nproc", "2", tasks], 2, "drop --nproc"),
        (["--task", "text", wrong], 1, "a response of svg; the task scores one text answer"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(["eval", str(ckpt), *args, "--json", str(tmp_path / "x.json")])
        err = capsys.readouterr().err
        assert stop.value.code == code and words in err and err.count("\n") == 1, (args, err)
