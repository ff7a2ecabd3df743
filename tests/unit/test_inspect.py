"""`mmfm inspect`: the report's rows are the loader's rows, its media are the decoded spans
of every modality, its statistics are the rows' own, hostile text stays text (escaped, and
the page's CSP would stop what slipped through), and the page loads in a real headless
Chromium without console errors, showing every picture."""

import html
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmfm.cli import main
from mmfm.config import ConfigError, load_config
from mmfm.core.errors import InputNotFound
from mmfm.core.types import (
    DnaRecord,
    Document,
    ImageMaskRecord,
    Modality,
    SvgRecord,
    TextRecord,
    VideoRecord,
)
from mmfm.data.loader import StreamingLoader, source_specs, stream_settings
from mmfm.data.packing import RowBuilder, modality_weight_table
from mmfm.data.shards import write_shard
from mmfm.decoding.outputs import demo_picture
from mmfm.inspect.command import InspectArgs, run
from mmfm.inspect.report import learned
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.vocab import VOCAB_FILE

from helpers import in_ci, tiny_visual_recipe

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_inspect")

DEMO = ["data.seq_len=256"]
ICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect x="2" y="2" width="12" '
    'height="12" fill="red"/><text x="1" y="9">&lt;script&gt;alert(1)&lt;/script&gt;</text></svg>'
)
NOTES = 'notes"><svg onload="alert(3)">'
"""A document source that is markup (the shards say where each document came from)."""
ATTACK = '<script>document.body.dataset.pwned="1"</script><img src=x onerror="alert(1)">'
"""Text a hostile corpus may hold: run as markup, it would mark the page."""


def rows_of(page: str) -> list[str]:
    return page.split('<div class="row"')[1:]


def ids_shown(row_html: str) -> list[int]:
    return [int(i) for i in re.findall(r'title="[\w-]+ id (\d+),', row_html)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    args = ["--stream", "1", "--step", "1", "--rows", "3", "--out", str(out), "--no-progress"]
    main(["inspect", "builtin:demo", *DEMO, *args])  # the command line, as a user runs it
    return out


def test_demo_rows_are_the_loaders_rows_of_that_stream_and_step(demo):
    """Stream 1 from step 1: the ids shown are the rows the trainer's loader gives (its
    stream 1 is row 1 of every global batch), document by document, padding left out."""
    cfg = load_config(None, ["data.paths=[builtin:demo]", *DEMO, "data.num_workers=0"])
    loader = StreamingLoader(source_specs(cfg), stream_settings(cfg), 8)
    batches = [loader.next_step()[0] for _ in range(4)][1:]
    page = (demo / "index.html").read_text()
    shown = rows_of(page)
    assert len(shown) == 3
    for row_html, batch in zip(shown, batches, strict=True):
        tokens, labels = batch.tokens[1].tolist(), batch.labels[1].tolist()
        found = re.search(r"\+ (\d+) padding tokens", row_html)
        pad = int(found[1]) if found else 0
        assert ids_shown(row_html) + [0] * pad == tokens
        assert labels[len(tokens) - pad :] == [-100] * pad
        assert "step " in row_html and "stream 1<" in row_html


def test_demo_pictures_are_the_decoded_image_spans(demo):
    page = (demo / "index.html").read_text()
    sources = re.findall(r'<img src="media/([^"]+)"', page)
    assert sources, "the demo's rows hold image documents"
    for name in sources:
        picture = np.asarray(Image.open(demo / "media" / name).convert("RGB"))
        codes = np.array(ids_of_image(page, name))
        assert np.array_equal(picture, demo_picture(codes))
    assert re.search(r'<pre class="dna">[ACGT]{40,}</pre>', page)  # DNA as its sequence


def ids_of_image(page: str, name: str) -> list[int]:
    """The 64 codes shown between <img> and </img> in the document holding `name`."""
    from mmfm.data import demo as d

    doc = page[: page.index(f'media/{name}"')].rsplit('<div class="doc', 1)[1]
    ids = [int(i) for i in re.findall(r'title="image id (\d+),', doc)]
    return [i - d.IMAGE_OFFSET for i in ids if d.IMAGE_OFFSET <= i < d.DNA_OFFSET]


def test_demo_statistics_count_the_rows(demo):
    page = (demo / "index.html").read_text()
    for row_html in rows_of(page):
        found = re.search(r"\+ (\d+) padding tokens", row_html)
        pad = int(found[1]) if found else 0
        docs = row_html.count('<div class="doc')
        assert f"{docs} document piece(s)" in row_html
        assert f"padding {pad} of 256 ({pad / 256:.1%})" in row_html
    total_pad = sum(int(n) for n in re.findall(r"\+ (\d+) padding tokens", page))
    assert f"<td>{total_pad}</td><td>{total_pad / 768:.1%}</td>" in page
    shown = sum(len(ids_shown(r)) for r in rows_of(page))
    assert shown + total_pad == 3 * 256
    assert re.search(r"<th>data</th><td>(\d+)</td><td>100.0%</td>", page)[1] == str(shown)


def test_a_document_split_across_rows_is_shown_in_pieces(tmp_path):
    """Rows of 48 tokens split the demo's documents (up to 200 tokens): each piece says which
    of its document's tokens it holds, in a dashed box, and a span cut by the row's end is
    not decoded but said to continue."""
    out = tmp_path / "out"
    run(InspectArgs("builtin:demo", ["data.seq_len=48"], str(out), rows=4, progress=False))
    page = (out / "index.html").read_text()
    pieces = re.findall(r"its tokens (\d+)\.\.(\d+) of (\d+), at (\d+)\.\.(\d+) of the row", page)
    assert pieces and page.count('<div class="doc cut">') == len(pieces)
    for start, end, length, a, b in (map(int, p) for p in pieces):
        assert end - start == b - a <= 47 and (start > 0 or end < length - 1)
    assert "continues in the next row (not decoded)" in page
    with pytest.raises(ConfigError, match="builtin:demo has its own small vocabulary"):
        run(InspectArgs("builtin:demo", out=str(tmp_path / "v"), vocab="vocab.json"))


def test_learned_weights_of_a_hand_packed_row():
    """A token is learned with the weight of the target the token before it makes: none for
    a piece's first token, 0 inside a no-loss prompt, the modality's weight elsewhere."""
    weights = modality_weight_table({"text": 0.5})

    def doc(n: int, no_loss=()) -> Document:
        tokens = np.arange(10, 10 + n, dtype=np.int32)
        return Document(tokens, np.full(n, Modality.TEXT, np.uint8), "k", "", no_loss)

    for attention in ("document", "row"):
        row = RowBuilder(16, weights, attention)
        row.add(doc(5, no_loss=((0, 3),)), 0, 5)
        row.add(doc(9), 0, 3)  # the first 3 tokens of a document split across rows
        arrays = row.finish()
        first = learned(arrays, 0, 5)
        assert np.isnan(first[0]) and first[1:].tolist() == [0, 0, 0.5, 0.5], attention
        assert learned(arrays, 5, 8)[1:].tolist() == [0.5, 0.5]


# -- prepared multimodal shards ---------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, real_data):
    """Shards of every modality as `mmfm prepare` writes them (its tokenizers, with tiny
    untrained visual ones whose codes decode to pictures of the right size, in this process:
    prepare's spawned worker would cost seconds), next to their vocab.json; hostile text in
    a caption, a text document and an SVG's text; and the report of their first rows."""
    root = tmp_path_factory.mktemp("prepared")
    tokenizers = tiny_visual_recipe(root / "tok")
    tok = Tokenizers.load(load_recipe(tokenizers))
    cat = Image.open(real_data("photos") / "chelsea.png").convert("RGB").resize((32, 32))
    photo = np.asarray(cat)
    frames = np.stack([photo, photo[::-1]])
    records = [
        ImageMaskRecord("cat", photo, (photo.mean(-1) > 100).astype(np.uint8), ATTACK, "masks"),
        VideoRecord("clip", frames, "a cat upside down", "clips"),
        SvgRecord("icon", ICON, "icons"),
        DnaRecord("seq", "ACGTTGCA" * 12, None, "genome"),
        TextRecord("notes", ATTACK, NOTES),
    ]
    shards = root / "shards"
    shards.mkdir()
    write_shard(shards / "t-000000.tar", [tok.encode(r) for r in records])
    tok.vocab.save(shards / VOCAB_FILE)
    out = root / "report"
    overrides = ["train.global_batch_size=1", "data.seq_len=512"]
    run(InspectArgs(str(shards), overrides, str(out), rows=2, tokenizers=str(tokenizers)))
    return root, out


def test_prepared_shards_show_every_modality_decoded(prepared):
    _, out = prepared
    page = (out / "index.html").read_text()
    media = {p.name: p for p in (out / "media").iterdir()}
    for modality, suffix, size in (
        ("image", ".png", 32),
        ("mask", ".png", 32),
        ("video", ".gif", 32),
    ):
        names = [n for n in media if n.endswith(f"-{modality}{suffix}")]
        assert names, f"no {modality} picture in {sorted(media)}"
        assert Image.open(media[names[0]]).size == (size, size)
        assert f'src="media/{names[0]}"' in page
    renders = [n for n in media if n.endswith(".svg.png")]
    assert renders and f'src="media/{renders[0]}"' in page  # the SVG shown as its render
    assert Image.open(media[renders[0]]).getpixel((64, 64))[:3] == (255, 0, 0)
    assert "<svg" not in page  # its markup only as escaped text
    assert "&lt;svg xmlns=" in page
    assert f'<pre class="dna">{"ACGTTGCA" * 12}</pre>' in page
    for kind in ("image", "mask", "video", "dna", "svg", "text"):
        assert re.search(rf'<th class="k-{kind}">{kind}</th><td>[1-9]', page), kind
    for source in ("masks", "clips", "icons", "genome", NOTES):  # the documents' sources
        shown = re.escape(html.escape(source))
        assert re.search(rf"<th>{shown}</th>(<td>\d+</td>)+</tr>", page), source


def test_hostile_text_in_the_data_is_escaped(prepared):
    _, out = prepared
    page = (out / "index.html").read_text()
    assert page.count("<script") == 1  # the page's own
    assert "<img src=x" not in page and "<script>document" not in page
    assert "<svg onload" not in page  # a document source
    text = html.unescape(re.sub(r"<[^>]+>", "", page))  # what a reader sees
    assert 'document.body.dataset.pwned="1"' in text
    assert 'onerror="alert(1)"' in text


def test_an_output_folder_in_use_is_refused_before_the_work(prepared, tmp_path):
    root, out = prepared
    shards = str(root / "shards")
    with pytest.raises(ConfigError, match=r"holds an earlier report.*--overwrite"):
        run(InspectArgs(shards, out=str(out)))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match=r"is not empty: choose an empty or new folder"):
        run(InspectArgs(shards, out=str(tmp_path / "busy")))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"--out .*file is a file"):
        run(InspectArgs(shards, out=str(tmp_path / "file")))


def test_mistakes_name_the_input_and_the_fix(prepared, tmp_path, capsys):
    root, _ = prepared
    with pytest.raises(InputNotFound, match=r"nowhere: no such shards.*run directory"):
        run(InspectArgs(str(tmp_path / "nowhere"), out=str(tmp_path / "a")))
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(next((root / "shards").glob("*.tar")), lone)
    with pytest.raises(ConfigError, match=r"no vocabulary.*--vocab VOCAB.json"):
        run(InspectArgs(str(lone), out=str(tmp_path / "b")))
    with pytest.raises(ConfigError, match=r"--source 'x': .* it has data"):
        run(InspectArgs(str(root / "shards"), out=str(tmp_path / "c"), source="x"))
    with pytest.raises(ConfigError, match=r"--stream 8: .*choose 0..7"):
        run(InspectArgs("builtin:demo", out=str(tmp_path / "d"), stream=8))
    with pytest.raises(SystemExit) as exit_code:
        main(
            ["inspect", "builtin:demo", "--rank", "1", "--ranks", "3", "--out", str(tmp_path / "e")]
        )
    assert exit_code.value.code == 2
    assert "ranks divides train.global_batch_size=8" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


def test_a_run_directory_gives_its_data_and_vocabulary(prepared, tmp_path):
    """A run directory (config.yaml and vocab.json, as mmfm train leaves them) is inspected
    with its own data settings; --rank R --ranks D shows that rank's streams."""
    from mmfm.config import save_config

    root, _ = prepared
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    overrides = [f"data.paths=[{root / 'shards'}]", "data.seq_len=300", "model.vocab_size=44992"]
    save_config(
        load_config(None, [*overrides, "train.global_batch_size=4", "train.micro_batch_size=2"]),
        run_dir / "config.yaml",
    )
    shutil.copy(root / "shards" / "vocab.json", run_dir / "vocab.json")
    out = tmp_path / "out"
    run(InspectArgs(str(run_dir), out=str(out), rank=1, ranks=2, rows=2, progress=False))
    page = (out / "index.html").read_text()
    assert f"the data of the run {run_dir}" in page and "seq_len 300" in page
    shown = re.findall(r"<h2>row \d+: step (\d+), stream (\d+)</h2>", page)
    assert shown == [("0", "2"), ("0", "3"), ("1", "2"), ("1", "3")]  # step by step


def test_one_source_of_a_mix(prepared, tmp_path):
    """The mix of data.sources is shown source by source; --source keeps one of them: the
    rows hold only its tokens."""
    root, _ = prepared
    shards = root / "shards"
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        f"data:\n  vocab: {shards / VOCAB_FILE}\n  seq_len: 2048\n  sources:\n"
        f"    - {{name: first, paths: ['{shards}']}}\n"
        f"    - {{name: second, paths: ['{shards}']}}\n"
        "model:\n  vocab_size: 44992\n  max_seq_len: 2048\ntrain:\n  global_batch_size: 1\n"
    )
    both, one = tmp_path / "both", tmp_path / "one"
    run(InspectArgs(str(recipe), out=str(both), rows=1, progress=False))
    run(InspectArgs(str(recipe), out=str(one), rows=1, source="second", progress=False))
    mix = re.findall(
        r"<tr><th>(first|second)</th><td>(\d+)</td>", (both / "index.html").read_text()
    )
    assert sorted(name for name, _ in mix) == ["first", "second"]
    alone = re.findall(
        r"<tr><th>(first|second)</th><td>(\d+)</td>", (one / "index.html").read_text()
    )
    assert [name for name, _ in alone] == ["second"] and int(alone[0][1]) > 0


# -- in a real browser ------------------------------------------------------------------------


def chromium() -> str:
    """Debian's chromium, or skip (fail under CI=true, where .ci/run installs it)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if in_ci():
        raise AssertionError("chromium is missing under CI=true: apt-get install -y chromium")
    pytest.skip("chromium is not installed: apt-get install -y chromium")


def headless(page: Path, shot: Path) -> subprocess.CompletedProcess:
    """One headless run: the DOM after load on stdout, the console on stderr, a screenshot."""
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    args += ["--enable-logging=stderr", "--v=0", "--dump-dom", f"--screenshot={shot}"]
    args += ["--window-size=1000,1400", page.as_uri()]
    args.insert(1, f"--user-data-dir={shot.parent / 'profile'}")
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)


def console(done: subprocess.CompletedProcess) -> list[str]:
    """The page's console messages (errors, CSP violations, logs) that chromium logged."""
    return [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def test_the_page_in_headless_chromium_loads_clean_and_shows_every_picture(prepared, tmp_path):
    """The DOM after load: the page's script marked every <img> with its naturalWidth (0 for
    one that did not load) and nothing of the data ran; the console has no line at all (no
    error, no CSP violation); the screenshot is drawn."""
    _, out = prepared
    page = out / "index.html"
    done = headless(page, tmp_path / "shot.png")
    body = re.search(r"<body[^>]*>", done.stdout)[0]
    pictures = len(re.findall(r"<img ", page.read_text()))
    assert f'data-pictures="{pictures}"' in body and 'data-broken="0"' in body, body
    widths = re.findall(r'data-width="(\d+)"', done.stdout)
    assert len(widths) == pictures >= 4 and all(int(w) > 0 for w in widths)
    assert "data-pwned" not in done.stdout
    assert console(done) == []
    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB"))
    colours = np.unique(shot.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1]))
    assert shot.shape == (1400, 1000, 3) and len(colours) > 20  # drawn: text, colours, pictures


def test_the_browser_checks_can_fail(prepared, tmp_path):
    """The control: the same page with a picture that is not there and an injected script
    is seen as one broken picture, the script does not run, and the console says why."""
    _, out = prepared
    control = tmp_path / "control.html"
    shutil.copytree(out / "media", tmp_path / "media")
    injected = '<img src="media/missing.png"><script>document.body.dataset.pwned = "1"</script>'
    control.write_text((out / "index.html").read_text().replace("</body>", injected + "</body>"))
    done = headless(control, tmp_path / "control.png")
    assert 'data-broken="1"' in done.stdout and "data-pwned" not in done.stdout
    assert any("Content Security Policy" in line for line in console(done))
