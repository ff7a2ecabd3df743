"""The sources' shaping rules of a prepare recipe, and the realised shares of their draws
counted into manifest.json (`sources.<name>.shaping`). The rules themselves (condition
dropout, caption order, completion-only) are mmfm/tokenization/shaping.py's, which the
training stream applies to raw shards too."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from mmfm.tokenization.shaping import Shaping

log = logging.getLogger("mmfm")


def rules(recipe) -> dict[str, Shaping]:
    """The rule of every source that shapes its records, by source name."""
    out = {}
    for s in recipe.sources:
        rule = Shaping(s.uncond_ratio, s.order, s.reverse_ratio, s.completion_only, s.label_repeat)
        if rule.draws or rule.completion_only:
            out[s.name or s.kind] = rule
    return out


def realised(counts: Mapping[str, int]) -> dict[str, dict]:
    """{"uncond": {count, of, ratio}, "image_first": {...}} from a source's summed tags:
    uncond of the captioned documents, image_first of those that kept their caption."""
    shares = {}
    for name, of in (("uncond", "captioned"), ("image_first", "ordered")):
        n, total = int(counts.get(name, 0)), int(counts.get(of, 0))
        shares[name] = {"count": n, "of": total, "ratio": round(n / total, 4) if total else 0.0}
    return shares


def log_realised(sources: Mapping[str, dict]) -> None:
    """One line per shaped source: `photos: uncond 0.098 (49 of 500), image_first 0.51 ...`."""
    for name, counts in sources.items():
        if "shaping" in counts:
            parts = [
                f"{k} {v['ratio']:.3g} ({v['count']} of {v['of']})"
                for k, v in counts["shaping"].items()
            ]
            log.info("%s: %s", name, ", ".join(parts))
