"""SVG (StarVector style): parse safely, sanitise, normalise, and tokenize as code with the
text model.

Parsing uses `defusedxml`: entity declarations (billion laughs) and external entities are
refused before anything is expanded or read, and files over `max_kb` are refused unread.
Sanitising (unless `keep_unsafe`) drops what a browser would run or fetch: `<script>` (and
SVG Tiny `<handler>` / `<listener>`), `on*` event handlers, `<foreignObject>`, animations
that set a reference or a handler, `javascript:` values, and every reference that is not a
`#fragment` of the file itself, whatever the element: `href`, `xlink:href`, `src` and the
other attributes that hold one (`data` of `<object>`, `poster`, `srcset`, `action`,
`xml:base`, ...), any attribute whose value is an absolute URL, `url(...)` and CSS
`image-set(...)` in attributes and style, `<style>` sheets with `@import` or such a
reference; `data:` URLs included: they embed
base64 blobs (or whole documents with scripts) that are no SVG code to learn from. What is
dropped is counted by kind (`removed`). Normalisation drops comments, processing
instructions, `<metadata>`, editor namespaces (Inkscape, Sodipodi, Illustrator, RDF, ...)
and ids nobody references; rounds numbers to `precision` significant digits (relative, so a
0..1 gradient box and a 500-unit canvas keep the same accuracy; beyond `precision + 3`
digits a number keeps exponent notation, so `1e308` stays 5 characters); with
`simplify_paths`, rewrites path data compactly. Elements nested deeper than `MAX_DEPTH`, or
a normalised text over `max_kb`, are refused (`SvgError`). The result is framed by the
`<svg>` ... `</svg>` delimiter tokens; decoding gives an SVG that parses.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from xml.etree.ElementTree import Element, ParseError

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from mmfm.core.errors import TokenizerError
from mmfm.core.extras import require_extra
from mmfm.tokenization.recipe import SvgRecipe

SVG_NS = "http://www.w3.org/2000/svg"
XLINK_NS = "http://www.w3.org/1999/xlink"
XML_NS = "http://www.w3.org/XML/1998/namespace"
_PREFIX = {SVG_NS: "", XLINK_NS: "xlink:", XML_NS: "xml:"}
_DROP_TAGS = {"metadata"}
_NUMERIC_ATTRS = {
    "d", "points", "transform", "viewBox", "x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r",
    "rx", "ry", "fx", "fy", "width", "height", "stroke-width", "opacity", "fill-opacity",
    "stroke-opacity", "offset", "font-size", "stroke-miterlimit", "stroke-dashoffset",
    "stroke-dasharray", "style", "gradientTransform", "patternTransform", "stop-opacity",
}  # fmt: skip
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
# A number in an attribute that is not part of a word or a colour (#2ea6b9, stop94, ...).
_FREE_NUMBER = re.compile(r"(?<![#\w.])-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_PATH_TOKEN = re.compile(r"[A-Za-z]|-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_REFERENCE = re.compile(r"#([A-Za-z_][\w.:-]*)")
MAX_DEPTH = 256
"""Deepest element nesting accepted (drawings rarely pass 30)."""
_SCRIPT_TAGS = {"script", "handler", "listener"}
_ANIMATION_TAGS = {"animate", "set", "animateColor", "animateMotion", "animateTransform"}
_URL = re.compile(r"url\(\s*(['\"]?)(.*?)\1\s*\)", re.IGNORECASE | re.DOTALL)
_SCRIPT_URL = re.compile(r"(?:java|vb)script\s*:", re.IGNORECASE)
# Attributes (of SVG, or of HTML elements a browser may meet in one) whose value is a URL.
_URL_ATTRS = {
    "href", "src", "data", "poster", "srcset", "action", "formaction", "background", "cite",
    "codebase", "archive", "classid", "longdesc", "lowsrc", "dynsrc", "usemap", "manifest",
    "icon", "ping", "profile", "base",  # xml:base
}  # fmt: skip
# A value of any other attribute that names a resource by scheme or host.
_ABSOLUTE_URL = re.compile(r"\s*(?:(?:[a-z][a-z0-9+.-]*:)?//|(?:data|file):)", re.IGNORECASE)
# CSS image-set() takes bare strings as URLs, not only url(...).
_IMAGE_SET = re.compile(r"image-set\(", re.IGNORECASE)


class SvgError(TokenizerError):
    """An SVG the tokenizer refuses (unsafe, too large, not SVG, not well-formed)."""


def parse_svg(data: str | bytes, max_kb: int = 512, origin: str = "svg") -> Element:
    """The root element, parsed with every XML attack refused."""
    try:
        raw = data.encode() if isinstance(data, str) else data
    except UnicodeEncodeError as e:  # a lone surrogate
        raise SvgError(f"{origin}: not valid Unicode ({e.reason})") from None
    if len(raw) > max_kb * 1024:
        raise SvgError(f"{origin}: {len(raw)} bytes is over svg.max_kb={max_kb} KiB; not parsed")
    try:
        root = fromstring(raw, forbid_dtd=False, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as e:
        raise SvgError(f"{origin}: refused unsafe XML ({type(e).__name__}: {e})") from None
    except ParseError as e:
        raise SvgError(f"{origin}: not well-formed XML ({e})") from None
    except LookupError as e:  # <?xml encoding="..."?> names no codec
        raise SvgError(f"{origin}: {e}") from None
    if _split(root.tag) != (SVG_NS, "svg") and root.tag != "svg":
        raise SvgError(f"{origin}: the root element is <{root.tag}>, not <svg>")
    return root


def _split(tag: str) -> tuple[str, str]:
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return ns, local
    return SVG_NS, tag  # unqualified: SVG without a namespace declaration


def _round(match: re.Match, digits: int) -> str:
    """The number with `digits` significant digits, shortest form; exponent notation only
    for numbers of more than `digits + 3` integer digits (never a 309-digit 1e308)."""
    value = float(match.group(0))
    if not math.isfinite(value):  # 1e999: left as written
        return match.group(0)
    text = f"{value:.{digits}g}"
    if "e" in text:  # tiny values become 0; big ones integers, up to digits + 3 digits
        mantissa, exponent = text.split("e")
        if abs(value) < 1:
            text = "0"
        elif int(exponent) < digits + 3:
            text = str(round(value))
        else:
            text = f"{mantissa}e{int(exponent)}"
    if text.startswith(("0.", "-0.")):
        text = text.replace("0.", ".", 1)
    return "0" if text in ("-0", "") else text


def _compact_path(d: str, precision: int) -> str:
    out: list[str] = []
    previous_number = False
    for token in _PATH_TOKEN.findall(d):
        if token[0].isalpha():
            out.append(token)
            previous_number = False
            continue
        number = _round(_NUMBER.fullmatch(token), precision)
        if previous_number and not number.startswith("-"):
            out.append(" ")
        out.append(number)
        previous_number = True
    return "".join(out)


def _escape(text: str, quote: bool = False) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace('"', "&quot;") if quote else text


def _external(value: str) -> str | None:
    """Why a reference (an href, or the target of a url()) is unsafe; None for #fragment."""
    value = value.strip()
    if value.startswith("#"):
        return None
    if _SCRIPT_URL.match(value):
        return "script"
    return "data_url" if value[:5].lower() == "data:" else "external_reference"


def _unsafe_urls(value: str) -> str | None:
    """Why a value holding url(...) or image-set(...) is unsafe (the first reason), None if
    none is."""
    if _IMAGE_SET.search(value):
        return "external_reference"
    return next(filter(None, (_external(m.group(2)) for m in _URL.finditer(value))), None)


class _Writer:
    def __init__(self, recipe: SvgRecipe, referenced: set[str], origin: str):
        self.recipe, self.referenced, self.origin = recipe, referenced, origin
        self.uses_xlink = False
        self.removed: Counter = Counter()

    def element(self, el: Element, depth: int = 0) -> str:
        if depth > MAX_DEPTH:
            raise SvgError(f"{self.origin}: elements nested deeper than {MAX_DEPTH}; refused")
        ns, local = _split(el.tag)
        attrs = []
        for name, value in el.attrib.items():
            a_ns, a_local = _split(name) if name.startswith("{") else ("", name)
            if a_ns and a_ns not in _PREFIX:
                continue  # editor namespaces (inkscape:, sodipodi:, ...)
            if a_local == "id" and value not in self.referenced:
                continue
            if not self.recipe.keep_unsafe:
                value = self._safe(a_local, value)
                if value is None:
                    continue
            if a_local in _NUMERIC_ATTRS:
                value = self._numbers(a_local, value)
            self.uses_xlink |= a_ns == XLINK_NS
            attrs.append(f' {_PREFIX.get(a_ns, "")}{a_local}="{_escape(value.strip(), True)}"')
        body = [] if el.text is None or not el.text.strip() else [_escape(el.text)]
        for child in el:
            c_ns, c_local = _split(child.tag) if isinstance(child.tag, str) else ("", "")
            known = c_ns in _PREFIX and c_local not in _DROP_TAGS  # not comments, PIs, editors
            if known and (self.recipe.keep_unsafe or not self._drop(child, c_local)):
                body.append(self.element(child, depth + 1))
            if child.tail and child.tail.strip():
                body.append(_escape(child.tail))
        tag = f"{_PREFIX[ns]}{local}"
        inner = "".join(body)
        return f"<{tag}{''.join(attrs)}>{inner}</{tag}>" if inner else f"<{tag}{''.join(attrs)}/>"

    def _drop(self, el: Element, local: str) -> bool:
        """Whether a child element is unsafe as a whole (counted)."""
        target = el.get("attributeName", "").split(":")[-1].lower()
        if local in _SCRIPT_TAGS or (
            local in _ANIMATION_TAGS and (target in _URL_ATTRS or target.startswith("on"))
        ):
            why = "script"
        elif local == "foreignObject":
            why = "foreign_object"
        elif local == "style" and (
            "@import" in (css := (el.text or "").lower()) or _unsafe_urls(css)
        ):
            why = _unsafe_urls(css) or "external_reference"
        else:
            return False
        self.removed[why] += 1
        return True

    def _safe(self, name: str, value: str) -> str | None:
        """The attribute value without what is unsafe in it (counted); None to drop it."""
        if name.lower().startswith("on"):
            why = "event_handler"
        elif name.lower() in _URL_ATTRS:
            why = _external(value)
        elif _SCRIPT_URL.search(value):
            why = "script"
        elif name == "style" and _unsafe_urls(value):
            kept = []
            for declaration in value.split(";"):
                if why := _unsafe_urls(declaration):
                    self.removed[why] += 1
                else:
                    kept.append(declaration)
            return ";".join(kept) if any(d.strip() for d in kept) else None
        else:
            why = _unsafe_urls(value) or (_external(value) if _ABSOLUTE_URL.match(value) else None)
        if why:
            self.removed[why] += 1
            return None
        return value

    def _numbers(self, name: str, value: str) -> str:
        precision = self.recipe.precision
        if name == "d" and self.recipe.simplify_paths:
            return _compact_path(value, precision)
        pattern = _NUMBER if name in ("d", "points") else _FREE_NUMBER
        return pattern.sub(lambda m: _round(m, precision), " ".join(value.split()))


def normalize_svg(
    data: str | bytes, recipe: SvgRecipe, origin: str = "svg", removed: Counter | None = None
) -> str:
    """The sanitised, normalised SVG text (see the module docstring); what sanitising
    dropped is added to `removed` by kind (script, event_handler, foreign_object,
    external_reference, data_url)."""
    root = parse_svg(data, recipe.max_kb, origin)
    values = [v for el in root.iter() for v in el.attrib.values()]
    values += [el.text or "" for el in root.iter() if isinstance(el.tag, str)]
    referenced = {m.group(1) for v in values for m in _REFERENCE.finditer(v)}
    writer = _Writer(recipe, referenced, origin)
    body = writer.element(root)
    xmlns = f' xmlns="{SVG_NS}"' + (f' xmlns:xlink="{XLINK_NS}"' if writer.uses_xlink else "")
    out = body.replace("<svg", f"<svg{xmlns}", 1)
    size = len(out.encode())
    if size > recipe.max_kb * 1024:
        raise SvgError(f"{origin}: normalised to {size} bytes, over svg.max_kb={recipe.max_kb} KiB")
    if removed is not None:
        removed.update(writer.removed)
    return out


class SvgTokenizer:
    def __init__(self, recipe: SvgRecipe, text_tokenizer):
        self.recipe, self.text = recipe, text_tokenizer
        self.removed: Counter = Counter()
        """What sanitising dropped from the SVGs encoded so far, by kind."""

    def encode(self, svg: str | bytes, origin: str = "svg") -> list[int]:
        """Text ids of the normalised SVG code (not framed)."""
        return self.text.encode(normalize_svg(svg, self.recipe, origin, self.removed))

    def take_removed(self) -> dict[str, int]:
        """`svg_<kind>` counts of what sanitising dropped since the last call."""
        counts = {f"svg_{kind}": n for kind, n in sorted(self.removed.items())}
        self.removed.clear()
        return counts

    def decode(self, ids: Iterable[int]) -> str:
        """SVG text from ids; raises SvgError if it is not a well-formed SVG."""
        svg = self.text.decode(ids)
        parse_svg(svg, max_kb=1 << 20, origin="decoded SVG")
        return svg


def render_svg(svg: str, size: int = 128) -> np.ndarray:
    """`[size, size, 3]` uint8 RGB rendering on white (cairosvg: `pip install 'mmfm[svg]'`)."""
    cairosvg = require_extra("cairosvg", "svg", "rendering SVG")
    from io import BytesIO

    from PIL import Image

    png = cairosvg.svg2png(
        bytestring=svg.encode(), output_width=size, output_height=size, background_color="white"
    )
    return np.asarray(Image.open(BytesIO(png)).convert("RGB"))
