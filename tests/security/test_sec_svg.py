"""Attacks on the SVG tokenizer: nesting, numeric amplification, active content, fuzzing.

Each case must end as an `SvgError` (a counted `svg_error` reject in `mmfm prepare`) or as a
bounded, sanitised, well-formed result; never another exception, never a blow-up.
"""

import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmfm.tokenization.recipe import SvgRecipe
from mmfm.tokenization.svg import MAX_DEPTH, SvgError, normalize_svg, parse_svg

NS = 'xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"'
REPO = Path(__file__).resolve().parents[2]


def nested(depth: int, inner: str = '<rect width="1"/>') -> str:
    return f"<svg {NS}>" + "<g>" * depth + inner + "</g>" * depth + "</svg>"


def test_deep_nesting_is_an_svg_error_not_a_recursion_error():
    assert "<rect" in normalize_svg(nested(MAX_DEPTH - 2), SvgRecipe())
    for depth in (MAX_DEPTH + 1, 1000, 50_000):
        with pytest.raises(SvgError, match=f"nested deeper than {MAX_DEPTH}"):
            normalize_svg(nested(depth), SvgRecipe(max_kb=1024), origin="deep.svg")


def test_huge_exponents_keep_exponent_notation():
    out = normalize_svg(f'<svg {NS}><path d="M1e308 0L-2.5e300 1e-300"/></svg>', SvgRecipe())
    assert 'd="M1e308 0L-2.5e300 0"' in out
    assert normalize_svg(out, SvgRecipe()) == out  # idempotent
    # ordinary big and small numbers are written as before
    out = normalize_svg(
        f'<svg {NS} width="123456" height="1e5"><path d="M.00001 3"/></svg>', SvgRecipe()
    )
    assert 'width="123456" height="100000"' in out and 'd="M0 3"' in out


def test_a_file_of_huge_numbers_does_not_amplify():
    """469 KiB of `1e308` used to become a 24.8M-token document (309 digits each)."""
    body = " ".join(["1e308"] * 82_000)
    svg = f'<svg {NS}><path d="M{body}"/></svg>'
    assert len(svg) > 469 * 1024
    out = normalize_svg(svg, SvgRecipe(max_kb=512))
    assert len(out) <= len(svg) + 100


def test_normalised_output_over_max_kb_is_refused():
    # 1e6 -> 1000000 grows each number; an input just under max_kb exceeds it once normalised
    body = " ".join(["1e6"] * 200)
    with pytest.raises(SvgError, match=r"normalised to \d+ bytes, over svg\.max_kb=1 KiB"):
        normalize_svg(f'<svg {NS}><path d="M{body}"/></svg>', SvgRecipe(max_kb=1))


UNSAFE = f"""<svg {NS} onload="alert(1)">
<script>alert(document.cookie)</script>
<script xlink:href="https://evil.example/x.js"/>
<foreignObject width="10" height="10"><p xmlns="http://www.w3.org/1999/xhtml">hi</p></foreignObject>
<defs><linearGradient id="g"><stop offset="0"/></linearGradient><rect id="r" width="2"/></defs>
<a href="javascript:alert(1)"><rect width="1" onclick="steal()" fill="url(#g)"/></a>
<a xlink:href="https://evil.example/"><circle r="1"/></a>
<image href="file:///etc/passwd" width="1" height="1"/>
<image xlink:href="data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=" width="1" height="1"/>
<use href="#r"/><use xlink:href="#r"/>
<rect width="1" style="fill:url(https://evil.example/f.svg#p);stroke:red"/>
<rect width="1" filter="url('http://evil.example/f.svg#blur')"/>
<style>@import url(https://evil.example/s.css); rect {{fill: red}}</style>
<set attributeName="href" to="javascript:alert(1)"/>
<animate attributeName="onclick" to="alert(1)"/>
</svg>"""


def test_active_content_and_external_references_are_dropped_and_counted():
    removed: Counter = Counter()
    out = normalize_svg(UNSAFE, SvgRecipe(), origin="unsafe.svg", removed=removed)
    parse_svg(out)
    low = out.lower()
    for bad in ("script", "alert", "onload", "onclick", "foreignobject", "evil", "file:", "data:"):
        assert bad not in low, (bad, out)
    # fragment references and ordinary style survive
    assert '<use href="#r"/>' in out and '<use xlink:href="#r"/>' in out
    assert 'fill="url(#g)"' in out and 'style="stroke:red"' in out and 'id="g"' in out
    assert removed == {
        "script": 5,  # 2 <script>, javascript: href, <set href>, <animate onclick>
        "event_handler": 2,
        "foreign_object": 1,
        "external_reference": 5,  # a, image file:, style url(), filter url(), <style> @import
        "data_url": 1,
    }
    assert normalize_svg(out, SvgRecipe(), removed=(again := Counter())) == out and not again


def test_keep_unsafe_keeps_them_verbatim():
    out = normalize_svg(UNSAFE, SvgRecipe(keep_unsafe=True), removed=(removed := Counter()))
    assert not removed
    kept = ["<script>alert(document.cookie)</script>", 'onload="alert(1)"', "<foreignObject"]
    kept += ['href="javascript:alert(1)"', 'href="file:///etc/passwd"']
    assert all(k in out for k in kept), out


ELSEWHERE = f"""<svg {NS}>
<defs><rect id="r" width="2"/></defs>
<object data="http://evil.example/o.swf" width="1"/><object data="#r"/>
<video poster="https://evil.example/p.png"/><img srcset="https://evil.example/a.png 1x"/>
<form action="http://evil.example/f"><button formaction="https://evil.example/b"/></form>
<g xml:base="http://evil.example/"><use href="#r"/></g>
<body background="http://evil.example/b.png"/><q cite="http://evil.example/c"/>
<rect width="1" custom="https://evil.example/c"/><rect width="1" other=" //evil.example/c"/>
<rect width="1" style="fill:image-set('http://evil.example/i.png' 1x);stroke:red"/>
<style>rect {{background: image-set("https://evil.example/i.png" 1x)}}</style>
<style>@import "https://evil.example/s.css";</style>
<set attributeName="data" to="http://evil.example/o"/>
<object DATA="data:text/html;base64,PHNjcmlwdD4="/>
</svg>"""


def test_external_references_in_any_attribute_are_dropped_and_counted():
    """Not only href / src / url(): data=, poster, srcset, action, xml:base, any attribute
    holding a URL, CSS image-set() strings and @import of a bare string."""
    out = normalize_svg(ELSEWHERE, SvgRecipe(), removed=(removed := Counter()))
    parse_svg(out)
    assert "evil" not in out and "data:" not in out, out
    assert '<object data="#r"/>' in out and '<use href="#r"/>' in out and 'id="r"' in out
    assert 'style="stroke:red"' in out
    assert removed == {"external_reference": 13, "script": 1, "data_url": 1}
    assert normalize_svg(out, SvgRecipe(), removed=(again := Counter())) == out and not again


def test_prepare_counts_svg_rejects_and_removals(tmp_path, monkeypatch):
    from mmfm.data.shards import read_shard
    from mmfm.prepare import load_prepare_recipe, prepare

    monkeypatch.chdir(REPO)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "deep.svg").write_text(nested(1000))
    (raw / "unsafe.svg").write_text(UNSAFE)
    (raw / "huge.svg").write_text(f'<svg {NS}><path d="M{" ".join(["1e308"] * 82_000)}"/></svg>')
    (raw / "ok.svg").write_text(f'<svg {NS}><rect width="1"/></svg>')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: t\noutput: {tmp_path / 'out'}\ntokenizer: {REPO / 'tokenizers/base.yaml'}\n"
        f'sources:\n  - {{kind: svg, paths: ["{raw}/*.svg"]}}\n'
    )
    manifest = prepare(load_prepare_recipe(recipe), progress=False)
    assert manifest["samples"] == 3
    assert manifest["rejected"] == {"svg_error": 1}  # deep.svg
    assert manifest["removed"] == {
        "svg_script": 5,
        "svg_event_handler": 2,
        "svg_foreign_object": 1,
        "svg_external_reference": 5,
        "svg_data_url": 1,
    }
    docs = {d.key: d for p in (tmp_path / "out").glob("t-*.tar") for d in read_shard(str(p))}
    assert sorted(docs) == ["huge", "ok", "unsafe"]
    assert len(docs["huge"].tokens) < 500_000  # was 24.8M


# -- fuzz -------------------------------------------------------------------------------------


@st.composite
def damaged_icons(draw, icons: list[bytes]) -> bytes:
    """A real icon, maybe nested in groups, maybe with unsafe content inserted anywhere,
    maybe with bytes flipped, maybe truncated."""
    data = bytearray(draw(st.sampled_from(icons)))
    depth = draw(st.sampled_from([0, 0, 1, 30, MAX_DEPTH - 3, MAX_DEPTH + 5, 3000]))
    if depth:  # wrap the icon's content in nested groups
        start = data.index(b">", data.index(b"<svg")) + 1
        end = data.rindex(b"</svg>")
        data[start:end] = b"<g>" * depth + data[start:end] + b"</g>" * depth
    if draw(st.booleans()):
        snippet = draw(st.sampled_from([b'<script>x()</script>', b'<g onload="x()"/>',
                                        b'<image href="file:///etc/passwd"/>', b"1e308 ",
                                        b"<foreignObject><div/></foreignObject>"]))  # fmt: skip
        at = draw(st.integers(0, len(data)))
        data[at:at] = snippet
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(draw=st.data())
def test_fuzzed_icons_normalise_or_raise_svg_error(real_data, draw):
    icons = [p.read_bytes() for p in sorted(real_data("svg").glob("*.svg"))]
    data = draw.draw(damaged_icons(icons))
    recipe = SvgRecipe()
    try:
        out = normalize_svg(data, recipe, origin="fuzz.svg", removed=Counter())
    except SvgError:
        return
    parse_svg(out, max_kb=recipe.max_kb)
    assert len(out.encode()) <= min(recipe.max_kb * 1024, 6 * len(data) + 128)
    assert not re.search(r"<script|\son\w+=|foreignObject|file:", out, re.I)
    assert normalize_svg(out, recipe) == out
