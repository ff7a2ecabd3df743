"""Skip counting: documents lost to bad data, by reason, with a limit on their rate.

Bad data never stops a stream silently: an undecodable sample (or one whose CRC, segments or
token ids are wrong), a missing member, an empty document, a corrupt, truncated or stalled
shard is skipped, counted by reason in documents lost, and logged once with its shard and
key; past `max_error_rate` the stream raises `DataError`.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from mmfm.core.errors import DataError

log = logging.getLogger("mmfm.data")

SKIP_REASONS = (
    "corrupt_shard",
    "truncated_shard",
    "timeout_shard",
    "bad_sample",
    "missing_field",
    "empty",
    "too_large",
)
"""Why documents were lost; each counts documents (a damaged shard: those it lost, at least one)."""


class Skips:
    """Counts documents lost by reason; logs the first of each (reason, shard)."""

    def __init__(self, max_error_rate: float):
        self.max_error_rate = max_error_rate
        self.counts: dict[str, int] = defaultdict(int)
        self.good = 0
        self._logged: set[tuple[str, str]] = set()

    def skip(self, reason: str, url: str, key: str, detail: str, n: int = 1) -> None:
        """Count `n` documents lost for `reason`."""
        self.counts[reason] += n
        if (reason, url) not in self._logged:
            self._logged.add((reason, url))
            lost = f" ({n} documents)" if n != 1 else ""
            log.warning("skipped (%s)%s in %s, sample %s: %s", reason, lost, url, key, detail)
        bad = sum(self.counts.values())
        seen = bad + self.good
        if seen >= 100 and bad > self.max_error_rate * seen:
            raise DataError(
                f"{bad} of {seen} documents were bad ({dict(self.counts)}), over "
                f"data.max_error_rate={self.max_error_rate}; last: {url}, sample {key}: "
                f"{detail}. Fix the shards or raise data.max_error_rate"
            )
