"""`mmfm generate` end to end: an exported Hugging Face folder against `transformers`'
greedy `generate`, and the command on checkpoints whose every span becomes a file that its
own library opens (PIL, Biopython, the SVG parser)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, LlamaConfig

from mmfm.cli import main
from mmfm.convert.hf import export_hf, import_hf
from mmfm.data.demo import DEMO_VOCAB_SIZE
from mmfm.decoding.engine import generate
from mmfm.decoding.sampling import Sampling
from mmfm.generate.load import load_model
from mmfm.testing import tiny_shape
from mmfm.tokenization.vocab import Vocab

import helpers
from helpers import tiny_visual_recipe

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_generate_cli")

REPO = Path(__file__).resolve().parents[2]
BASE_VOCAB = REPO / "tokenizers/base/vocab.json"
SHAPE = tiny_shape(n_layers=2, seq_len=128, max_seq_len=1024)


def random_checkpoint(path: Path, overrides: list[str], vocab: Path | None = None) -> Path:
    """An untrained model of this file's shape saved as an mmfm checkpoint."""
    return helpers.random_checkpoint(path, [*SHAPE, *overrides], vocab)


def test_greedy_on_an_exported_model_equals_transformers_generate(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    folder = export_hf(tmp_path / "ckpt", tmp_path / "export", dtype="fp32")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    mine = load_model(folder).model
    prompts = [[1, 17, 99, 250, 3], [1, 5], [1, *range(100, 140)]]
    new = generate(mine, prompts, Sampling(max_new_tokens=48))
    for prompt, ids in zip(prompts, new, strict=True):
        x = torch.tensor([prompt])
        theirs = hf.generate(x, max_new_tokens=48, do_sample=False, eos_token_id=None)
        assert ids == theirs[0, len(prompt) :].tolist()
    assert load_model(tmp_path / "ckpt").model.state_dict().keys() == mine.state_dict().keys()
    half = load_model(folder, dtype="bf16").model
    assert next(half.parameters()).dtype == torch.bfloat16
    assert len(generate(half, prompts, Sampling(max_new_tokens=8))[0]) == 8


@pytest.fixture(scope="module")
def unified(tmp_path_factory):
    """An untrained model on the base vocabulary, and a tokenizer recipe with untrained
    visual tokenizers (their codes decode to pictures of the right size)."""
    root = tmp_path_factory.mktemp("unified")
    recipe = tiny_visual_recipe(root)
    size = -(-Vocab.load(BASE_VOCAB).size // 64) * 64
    overrides = [f"model.vocab_size={size}", f"data.vocab={BASE_VOCAB}"]
    ckpt = random_checkpoint(root / "ckpt", overrides, BASE_VOCAB)
    return ckpt, recipe


@pytest.mark.parametrize(
    "modality,max_new,suffix",
    [("image", 12, ".png"), ("mask", 40, ".png"), ("video", 140, ".gif"),
     ("dna", 24, ".fasta"), ("svg", 24, ".svg.txt"), ("text", 24, ".txt")],
)  # fmt: skip
def test_generate_writes_a_file_per_span_that_opens(unified, modality, max_new, suffix, tmp_path):
    from Bio import SeqIO

    ckpt, recipe = unified
    out = tmp_path / "out"
    args = ["generate", str(ckpt), "--prompt", "a cat", "--prompt", "two dogs on grass"]
    args += ["--modality", modality, "--tokenizers", str(recipe), "--out", str(out)]
    main([*args, "--max-new-tokens", str(max_new), "--temperature", "1", "--seed", "2"])
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a cat", "two dogs on grass"]
    for row in rows:
        first = row["spans"][0]
        assert first["modality"] == modality and len(row["new_ids"]) <= max_new
        assert first["start"] == len(row["prompt_ids"]) - (modality != "text")
        path = first["path"]
        assert path and path.endswith(suffix), first
        if suffix in (".png", ".gif"):
            with Image.open(path) as im:
                assert im.size == (32, 32)
                frames = getattr(im, "n_frames", 1)
            assert modality != "video" or frames == first["length"] // 65
            if modality == "video":  # the same clip as H.264, when PyAV is installed (it is here)
                import av

                with av.open(str(Path(path).with_suffix(".mp4"))) as clip:
                    assert sum(1 for _ in clip.decode(video=0)) == frames
        elif suffix == ".fasta":
            assert len(next(SeqIO.parse(path, "fasta")).seq) > 0
        elif modality == "svg":  # an untrained model writes no SVG that parses: kept, said so
            assert "kept as text" in first["note"] and "unterminated" in first["note"]
        else:
            assert Path(path).read_text(encoding="utf-8") is not None


def test_the_demo_checkpoint_draws_a_png(tmp_path, demo_cache):
    ckpt = random_checkpoint(
        tmp_path / "ckpt",
        [f"model.vocab_size={DEMO_VOCAB_SIZE}", "data.paths=[builtin:demo]"],
    )
    out = tmp_path / "out"
    args = ["generate", str(ckpt), "--prompt", "a red cross on a blue background"]
    main([*args, "--modality", "image", "--max-new-tokens", "70", "--out", str(out)])
    row = json.loads((out / "generations.jsonl").read_text())
    image = row["spans"][0]
    assert image["closed"] and image["length"] == 64 and image["note"] is None
    with Image.open(image["path"]) as im:
        assert im.size == (128, 128)


def test_user_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tmp_path), "--prompt", "x"])
    assert e.value.code == 1
    assert "neither an mmfm checkpoint" in capsys.readouterr().err
    ckpt = random_checkpoint(tmp_path / "ckpt", [f"model.vocab_size={DEMO_VOCAB_SIZE}"])
    with pytest.raises(SystemExit) as e:
        main(["generate", str(ckpt), "--prompt", "x"])
    assert "has no vocab.json" in capsys.readouterr().err
    demo = random_checkpoint(
        tmp_path / "demo", [f"model.vocab_size={DEMO_VOCAB_SIZE}", "data.paths=[builtin:demo]"]
    )
    for bad, message in [
        (["--modality", "svg"], "no svg spans"),
        (["--top-p", "0"], "top_p in (0, 1]"),
        (["--max-new-tokens", "0"], "max_new_tokens must be positive"),
    ]:
        with pytest.raises(SystemExit):
            main(["generate", str(demo), "--prompt", "x", *bad])
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_a_second_run_into_the_same_out_continues_the_numbering(tmp_path, demo_cache):
    """Nothing a run wrote is overwritten: the next run's files continue after the highest
    index in --out, and generations.jsonl gets its lines appended."""
    ckpt = random_checkpoint(
        tmp_path / "ckpt", [f"model.vocab_size={DEMO_VOCAB_SIZE}", "data.paths=[builtin:demo]"]
    )
    out = tmp_path / "out"
    args = ["generate", str(ckpt), "--modality", "image", "--max-new-tokens", "66"]
    main([*args, "--prompt", "a red cross", "--out", str(out)])
    first = (out / "0000-0-image.png").read_bytes()
    main([*args, "--prompt", "a blue cross", "--prompt", "green", "--out", str(out), "--seed", "1"])
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red cross", "a blue cross", "green"]
    assert [r["index"] for r in rows] == [0, 1, 2]
    paths = [r["spans"][0]["path"] for r in rows]
    assert [Path(p).name for p in paths] == [f"000{i}-0-image.png" for i in range(3)]
    assert (out / "0000-0-image.png").read_bytes() == first


# -- prompts with files ---------------------------------------------------------------------------


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


def _span(ids: list[int], pair: tuple[int, int]) -> list[int]:
    """The first framed span (delimiters included) of `pair` in `ids`."""
    start = ids.index(pair[0])
    return ids[start : ids.index(pair[1], start) + 1]


def test_a_picture_in_a_prompt_is_the_span_of_its_training_rows(unified, real_data, tmp_path):
    """HiMTok's task: `{image} segment the cat` with a real photo; the prompt's image span is
    the one `mmfm prepare` writes into a row for that photo (same reading, crop, codes and
    framing tokens), the text after it is the phrase, and `<mask>` opens the answer."""
    from mmfm.core.types import Modality
    from mmfm.tokenization.recipe import load_recipe
    from mmfm.tokenization.tokenizers import Tokenizers
    from mmfm.tokenization.visual.records import visual_records

    ckpt, recipe = unified
    photo = real_data("photos") / "chelsea.png"
    out = tmp_path / "out"
    args = ["generate", str(ckpt), "--prompt", "{image} segment the cat", "--image", str(photo)]
    args += ["--modality", "mask", "--tokenizers", str(recipe), "--max-new-tokens", "4"]
    main([*args, "--out", str(out)])
    (row,) = _rows(out)
    tok = Tokenizers.load(load_recipe(recipe))
    (record,) = visual_records(photo, "image-text")  # as `mmfm prepare` reads the photo
    image = _span(tok.encode(record).tokens.tolist(), tok.vocab.delimiters(Modality.IMAGE))
    assert len(image) == 2 + tok.visual.model("image").tokens_per_item
    phrase = tok.text.encode("segment the cat")
    mask = tok.vocab.delimiters(Modality.MASK)[0]
    assert row["prompt_ids"] == [tok.text.bos_id, *image, *phrase, mask]
    assert row["files"] == {"image": str(photo)} and row["modality"] == "mask"
    assert row["spans"][0]["modality"] == "mask"


def test_a_jsonl_of_prompts_with_files_is_one_batch(unified, real_data, tmp_path):
    """`--prompts`: each line its own files (relative to the JSONL's folder) and modality:
    image -> mask, video -> caption (SEED), DNA -> text, image -> SVG (StarVector)."""
    import shutil

    from Bio import SeqIO

    from mmfm.core.types import Modality
    from mmfm.tokenization.recipe import load_recipe
    from mmfm.tokenization.tokenizers import Tokenizers
    from mmfm.tokenization.visual.records import visual_records

    ckpt, recipe = unified
    shutil.copy(real_data("photos") / "coffee.png", tmp_path / "coffee.png")
    clip = real_data("gif") / "no_time_for_that_tiny.gif"  # 4 frames at 2 fps
    genome = next(SeqIO.parse(_gunzip(real_data("fasta") / "KK037166.single.fna.gz"), "fasta"))
    (tmp_path / "gene.fa").write_text(f">gene\n{genome.seq[:120]}\n")
    icon = real_data("svg") / "back.svg"
    lines = [
        {"prompt": "{image} segment the cup", "image": "coffee.png", "modality": "mask"},
        {"prompt": "{video}", "video": str(clip)},
        {"prompt": "{dna} what does it code for?", "dna": "gene.fa"},
        {"prompt": "draw {image} as code, like {svg}", "image": "coffee.png", "svg": str(icon),
         "modality": "svg"},
    ]  # fmt: skip
    (tmp_path / "prompts.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    out = tmp_path / "out"
    args = ["generate", str(ckpt), "--prompts", str(tmp_path / "prompts.jsonl")]
    args += ["--tokenizers", str(recipe), "--batch-size", "2", "--max-new-tokens", "4"]
    main([*args, "--out", str(out)])
    rows = _rows(out)
    assert [r["modality"] for r in rows] == ["mask", "text", "text", "svg"]
    assert rows[0]["files"] == {"image": str(tmp_path / "coffee.png")}

    tok = Tokenizers.load(load_recipe(recipe))
    v, bos, text = tok.vocab, tok.text.bos_id, tok.text.encode
    (photo,) = visual_records(tmp_path / "coffee.png", "image-text")
    image = _span(tok.encode(photo).tokens.tolist(), v.delimiters(Modality.IMAGE))
    (movie,) = visual_records(clip, "video")
    video = _span(tok.encode(movie).tokens.tolist(), v.delimiters(Modality.VIDEO))
    dna = tok.dna.encode(str(genome.seq[:120]), v)
    svg = tok.svg.encode(icon.read_bytes().decode())
    expected = [
        [bos, *image, *text("segment the cup"), v.delimiters(Modality.MASK)[0]],
        [bos, *video],
        [bos, v.delimiters(Modality.DNA)[0], *dna, v.delimiters(Modality.DNA)[1],
         *text("what does it code for?")],
        [bos, *text("draw"), *image, *text("as code, like"), v.delimiters(Modality.SVG)[0],
         *svg, v.delimiters(Modality.SVG)[1], v.delimiters(Modality.SVG)[0]],
    ]  # fmt: skip
    assert [r["prompt_ids"] for r in rows] == expected


def _gunzip(path: Path):
    import gzip
    import io

    return io.StringIO(gzip.decompress(path.read_bytes()).decode())


def test_prompt_files_are_checked_before_the_model_is_loaded(unified, tmp_path, capsys):
    """One line and the exit status, for a model folder that does not even exist: nothing
    about the prompt's files waits for the model."""
    _, recipe = unified
    no_images = tmp_path / "text-only.yaml"
    no_images.write_text(f"output_dir: {REPO / 'tokenizers/base'}\n")
    photo = tmp_path / "cat.png"
    Image.new("RGB", (40, 30), (200, 100, 0)).save(photo)
    (tmp_path / "not.png").write_text("no picture")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "{image} x", "images": "cat.png"}\n')
    (tmp_path / "cut.jsonl").write_text('{"prompt": "{image} x", "image": "cat.png"}\n{"prom')
    ask = ["--tokenizers", str(recipe)]
    for args, code, words in [
        (["--prompt", "{image} segment the cat", *ask], 2, "{image} but no image file"),
        (["--prompt", "a cat", "--image", photo, *ask], 2, "but no {image} in the prompt"),
        (["--prompt", "{image} x", "--prompt", "y", "--image", photo, *ask], 2, "--prompt 2"),
        (["--prompt", "{image} x", "--image", tmp_path / "no.png", *ask], 1, "no such file"),
        (["--prompt", "{image} x", "--image", photo], 2, "needs --tokenizers"),
        (["--prompt", "{image} x", "--image", photo, "--tokenizers", no_images], 2,
         "has no image_tokenizer"),
        (["--prompt", "{image} x", "--image", tmp_path / "not.png", *ask], 1, "not.png"),
        (["--image", photo, *ask], 2, "--image goes into --prompt"),
        (["--prompts", tmp_path / "bad.jsonl", *ask], 2, "unknown field 'images'"),
        (["--prompts", tmp_path / "cut.jsonl", *ask], 2, "cut.jsonl:2: not a line of JSON"),
        (["--prompts", tmp_path / "none.jsonl"], 1, "no such file"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            main(["generate", str(tmp_path / "no-model"), *map(str, args)])
        err = capsys.readouterr().err
        assert stop.value.code == code and words in err and err.count("\n") == 1, (args, err)
        assert "neither an mmfm checkpoint" not in err


def test_files_tokenized_by_another_vocabulary_are_refused(unified, tmp_path, capsys):
    """A recipe whose vocabulary is not the model's (one task token more) would put the
    image codes at other ids: refused, naming both."""
    import shutil

    from mmfm.tokenization.recipe import load_recipe
    from mmfm.tokenization.tokenizers import Tokenizers, build_vocab

    ckpt, recipe = unified
    mine = Tokenizers.load(load_recipe(recipe))
    (tmp_path / "other").mkdir()
    shutil.copy(REPO / "tokenizers/base/text.model", tmp_path / "other/text.model")
    other = tmp_path / "other.yaml"
    other.write_text(
        recipe.read_text().replace(str(REPO / "tokenizers/base"), str(tmp_path / "other"))
        + "task_tokens: ['<caption>']\n"
    )
    build_vocab(load_recipe(other), mine.text, mine.dna).save(tmp_path / "other/vocab.json")
    photo = tmp_path / "cat.png"
    Image.new("RGB", (40, 30), (200, 100, 0)).save(photo)
    args = ["generate", str(ckpt), "--prompt", "{image} x", "--image", str(photo)]
    with pytest.raises(SystemExit) as stop:
        main([*args, "--tokenizers", str(other), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert "the tokenizer recipe its data was prepared with" in err and str(ckpt) in err
