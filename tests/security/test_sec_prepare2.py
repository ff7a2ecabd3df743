"""`mmfm prepare` against records that kill or crash its workers, damaged or missing visual
tokenizers, and records too large to hold: each is counted or refused in one line, and the
run neither hangs nor ends in a traceback."""

from __future__ import annotations

import json
import logging
import os
import signal
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from mmfm.cli import main
from mmfm.core.modalities import ModalitySpec, register_modality, unregister_modality
from mmfm.data.shards import read_shard
from mmfm.prepare import load_prepare_recipe, prepare
from mmfm.prepare.readers import Rejects, iter_records
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.visual.train import VisualRecipe, build, save_visual

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_sec_prepare2")

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = str(REPO / "tokenizers/base.yaml")
TINY_IMAGE = {
    "image_size": 32, "patch": 8, "dim": 32, "heads": 2, "encoder_layers": 1,
    "qformer_layers": 1, "decoder_layers": 1, "tokens": 8, "codebook_size": 64,
}  # fmt: skip


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the tokenizer recipe names tokenizers/base relative to the repo


@pytest.fixture
def mmfm_log(caplog):
    logger = logging.getLogger("mmfm")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)


# -- a record that kills its worker ---------------------------------------------------------------


def doom(value: str) -> list[int]:
    """The codes of a `doom` value; `die` kills the worker (as the OOM killer or a crash in a
    native library would), `die-once:<file>` kills it only the first time (a passing OOM)."""
    if value == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if value.startswith("die-once:"):
        marker = Path(value.split(":", 1)[1])
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
    return [0, 1]


def read_doom(path: Path):
    for line in path.read_text().splitlines():
        key, value = line.split(" ", 1)
        yield key, value


# Module level: a spawned prepare worker unpickles the spec by importing this module.
DOOM = ModalitySpec("doom", ("<doom>", "</doom>"), 2, doom, list, read_doom)


@pytest.fixture(scope="module")
def hostile_tokenizers(tmp_path_factory):
    """A tokenizer set whose tokenizer.json splits words with `(a|aa)+$` (the tokenizers
    library panics, a BaseException, on 40 a's and a b) and that knows the `doom` modality."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    register_modality(DOOM)
    root = tmp_path_factory.mktemp("hostile")
    words = ["<s>", "</s>", "[UNK]", "a", "b", "fine", " "]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("(a|aa)+$"), behavior="isolated")
    tk.save(str(root / "tokenizer.json"))
    recipe = root / "tok.yaml"
    recipe.write_text(
        f"name: hostile\noutput_dir: {root / 'tok'}\nmodalities: [doom]\n"
        f"text: {{pretrained: {root / 'tokenizer.json'}}}\ndna: {{scheme: char}}\n"
    )
    Tokenizers.train(load_recipe(recipe))
    yield recipe
    unregister_modality("doom")


@pytest.mark.slow  # prepare's worker processes, one killed and started again: 26 s on loaded cores
def test_a_panicking_tokenizer_and_a_killed_worker_cost_one_record_each(
    tmp_path, hostile_tokenizers, mmfm_log
):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "t.jsonl").write_text(
        "\n".join(json.dumps({"text": t}) for t in ("fine", "a" * 40 + " b", "b a")) + "\n"
    )
    (raw / "d.txt").write_text(f"k1 ok\nk2 die\nk3 die-once:{tmp_path / 'once'}\nk4 ok\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: h\noutput: {tmp_path / 'out'}\ntokenizer: {hostile_tokenizers}\nshard_size: 4\n"
        f"sources:\n  - {{kind: text, paths: [{raw / 't.jsonl'}]}}\n"
        f"  - {{kind: doom, paths: [{raw / 'd.txt'}]}}\n"
    )
    manifest = prepare(load_prepare_recipe(recipe), workers=1, progress=False)
    docs = [d for p in sorted((tmp_path / "out").glob("h-*.tar")) for d in read_shard(str(p))]
    assert [d.key for d in docs] == ["t:1", "t:3", "k1", "k3", "k4"]
    assert manifest["rejected"] == {"tokenizer_error": 1, "worker_died": 1}
    assert manifest["sources"]["doom"]["rejected"] == {"worker_died": 1}
    assert "PanicException" in mmfm_log.text and "t.jsonl:t:2" in mmfm_log.text
    assert f"{raw / 'd.txt'}:k2" in mmfm_log.text
    assert (tmp_path / "once").exists()  # k3 killed a worker once, and was kept on the retry


# -- visual tokenizers checked at start-up ----------------------------------------------------


def picture_recipe(tmp_path: Path, image_tokenizer: Path) -> Path:
    (tmp_path / "tok.yaml").write_text(
        f"output_dir: {REPO / 'tokenizers/base'}\nimage_tokenizer: {image_tokenizer}\n"
    )
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(photos / "red.png")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: p\noutput: {tmp_path / 'out'}\ntokenizer: {tmp_path / 'tok.yaml'}\n"
        f"sources:\n  - {{kind: image-text, paths: [{photos}]}}\n"
    )
    return recipe


def refused(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmfm: "), err
    return stop.value.code, lines[0]


@pytest.mark.parametrize("damage", ["model.safetensors", "config.json", "untrained"])
def test_a_damaged_or_untrained_visual_tokenizer_is_refused_before_any_work(
    tmp_path, capsys, damage
):
    seed = tmp_path / "seed"
    if damage != "untrained":
        save_visual(build(VisualRecipe(kind="seed_image", model=TINY_IMAGE)), seed)
        data = (seed / damage).read_bytes()
        (seed / damage).write_bytes(data[: len(data) // 2])
    code, line = refused(capsys, "prepare", picture_recipe(tmp_path, seed))
    assert code == 1 and str(seed) in line, line
    if damage == "untrained":
        assert "mmfm tokenizer train" in line, line
    else:
        assert damage in line, line
    assert not (tmp_path / "out").exists()  # refused before any output


# -- records over sources[].max_record_mb ---------------------------------------------------------


def read_all(tmp_path: Path, sources: str) -> tuple[list[str], list, Rejects]:
    """(where of every record read, the records, the rejects) of a recipe's sources, read in
    this process as `mmfm prepare` reads them."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output: {tmp_path / 'out'}\ntokenizer: {TOKENIZER}\nsources:\n{sources}")
    rejects = Rejects()
    pairs = list(iter_records(load_prepare_recipe(recipe), rejects))
    return [where for where, _ in pairs], [record for _, record in pairs], rejects


def test_records_over_max_record_mb_are_counted_without_reading_them_whole(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "small.txt").write_text("a small document")
    with open(raw / "huge.txt", "wb") as f:  # 1 GiB, sparse: never read
        f.truncate(1 << 30)
    with open(raw / "huge.svg", "wb") as f:
        f.truncate(1 << 30)
    big = json.dumps({"text": "x" * (32 << 20)})  # one 32 MiB line between two small ones
    (raw / "lines.jsonl").write_text(f'{{"text": "one"}}\n{big}\n{{"text": "three"}}\n')
    (raw / "tasks.jsonl").write_text(
        f'{{"prompt": "{"p" * (2 << 20)}", "response": "r"}}\n{{"prompt": "q", "response": "r"}}\n'
    )
    (raw / "chromosome.fa").write_text(">chr\n" + "ACGT" * (1 << 19) + "\n>small\nACGT\n")
    one_mib = "max_record_mb: 1"
    texts = (
        f"  - {{kind: text, {one_mib}, paths: [{raw / 'small.txt'}, {raw / 'huge.txt'}]}}\n"
        f"  - {{kind: text, {one_mib}, paths: [{raw / 'lines.jsonl'}]}}\n"
        f"  - {{kind: svg, {one_mib}, paths: [{raw / 'huge.svg'}]}}\n"
    )
    tracemalloc.start()
    read_all(tmp_path, texts)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20, peak  # the 32 MiB line and the 1 GiB files were never held
    kept, _, rejects = read_all(
        tmp_path,
        texts + f"  - {{kind: prompt-response, {one_mib}, paths: [{raw / 'tasks.jsonl'}]}}\n"
        f"  - {{kind: dna, {one_mib}, paths: [{raw / 'chromosome.fa'}]}}\n"
        f"  - {{kind: dna, name: windows, {one_mib}, max_length: 100000, "
        f"paths: [{raw / 'chromosome.fa'}]}}\n",
    )
    assert [k.rsplit("/", 1)[1] for k in kept[:6]] == [
        "small.txt:small.txt", "lines.jsonl:lines:1", "lines.jsonl:lines:3",
        "tasks.jsonl:tasks:2", "chromosome.fa:small", "chromosome.fa:chr:0",
    ]  # fmt: skip
    assert len(kept) == 6 + 21  # 2M bases in windows of 100k, and the small record
    assert rejects.counts == {"too_large": 5}
    assert rejects.by_source == {s: {"too_large": n} for s, n in [
        ("text", 2), ("svg", 1), ("prompt-response", 1), ("dna", 1)]}  # fmt: skip


def test_raw_samples_over_max_record_mb_are_counted(tmp_path, mmfm_log):
    """A small .tar.gz whose text member inflates to 8 MiB, a DNA member that inflates past
    the bound: too_large for those samples, the others kept."""
    import gzip
    import io
    import tarfile

    shard = tmp_path / "raw.tar.gz"
    members = {
        "a.txt": b"a small caption",
        "b.txt": b" " * (8 << 20),
        "c.fa.gz": gzip.compress(b">c\n" + b"ACGT" * (1 << 19) + b"\n"),
    }
    with tarfile.open(shard, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert shard.stat().st_size < 64 << 10
    text = "fields: {record: text}"
    kept, _, rejects = read_all(
        tmp_path, f"  - {{kind: webdataset, max_record_mb: 1, {text}, paths: [{shard}]}}\n"
    )
    assert kept == [f"{shard}:a", f"{shard}:c"]  # c: no txt member, rejected by the decoder
    assert rejects.counts == {"too_large": 1}
    assert f"{shard}:b: member txt: 8.0 MiB, over sources[].max_record_mb" in mmfm_log.text
    dna = "fields: {record: dna, dna: [fa.gz]}"
    _, samples, _ = read_all(
        tmp_path, f"  - {{kind: webdataset, max_record_mb: 1, {dna}, paths: [{shard}]}}\n"
    )
    notes = []
    assert list(samples[2].records(lambda *note: notes.append(note))) == []
    assert [n[:2] for n in notes] == [("too_large", f"{shard}:c")]  # decompressed: 2 MiB
