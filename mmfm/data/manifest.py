"""The shard manifest: the `manifest.json` that `mmfm prepare` writes beside its shards.

It says what the shards were made from (`fingerprint`), with which vocabulary
(`vocab_fingerprint`), and, per shard, how many samples and tokens it holds and its
documents' length digits; the stream sizes its deal by it (sizing.py), counts the documents a
cut shard lost by it (units.py) and draws the natural curriculum's odds from it (odds.py).
One writer (`write_manifest`, atomic), one reader (`read_manifest`) with one cache (by path
and modification time; a remote manifest is read once per process), and the lookups of a
shard's entry (`shard_record`, `held_samples`).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import shlex
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfm.data.shards import ShardError, file_kind

log = logging.getLogger("mmfm.data")

MANIFEST = "manifest.json"
"""Its file name, in the shards' directory."""
FORMAT = "mmfm-shards/1"


@dataclass(frozen=True)
class Manifest:
    """A manifest as read: the fields the loader and `mmfm prepare` look up, and the whole
    JSON object (`data`: prepare's statistics of sources, rejects, shaping, ...)."""

    shards: dict[str, dict] = field(default_factory=dict)
    """Each shard's entry (file, samples, tokens, tokens_by_modality, length_digits, ...) by
    its file name."""
    vocab_fingerprint: str | None = None
    fingerprint: dict | None = None
    """What the shards were made from (prepare/fingerprint.py)."""
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """ValueError where `data` is not a manifest's JSON object."""
        if not isinstance(data, dict):
            raise ValueError(f"a manifest is a JSON object, not {type(data).__name__}")
        shards = data.get("shards", [])
        if not isinstance(shards, list):
            raise ValueError("its shards must be a list")
        fingerprint = data.get("fingerprint")
        return cls(
            shards={s["file"]: s for s in shards if isinstance(s, dict) and "file" in s},
            vocab_fingerprint=data.get("vocab_fingerprint"),
            fingerprint=fingerprint if isinstance(fingerprint, dict) else None,
            data=data,
        )

    def as_dict(self) -> dict[str, Any]:
        """A copy of the JSON object, to change and write again."""
        return copy.deepcopy(self.data)


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest` as `<directory>/manifest.json`, whole or not at all (a temporary file
    per process, then a rename); return its path."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)
    return path


def read_manifest(where: str | Path) -> Manifest:
    """The manifest at `where` (a local path or an http(s) URL); ShardError naming it where it
    cannot be read or is not a manifest."""
    where = str(where)
    remote = where.startswith(("http://", "https://"))
    try:
        version = 0 if remote else os.stat(where).st_mtime_ns
    except OSError as e:
        raise ShardError(f"{where}: {e}") from e
    found = _read(where, version)
    if isinstance(found, ShardError):
        raise type(found)(str(found))
    return found


@functools.lru_cache(maxsize=256)
def _read(where: str, version: int) -> Manifest | ShardError:
    """`read_manifest`'s manifest, or its error, once per (where, version: its mtime; 0 for a
    URL): a shard's lookups do not read it again, nor ask a server again for one it lacks."""
    try:
        if where.startswith(("http://", "https://")):
            with urllib.request.urlopen(where, timeout=10) as response:
                raw = response.read(1 << 24)
        else:
            raw = Path(where).read_bytes()
        return Manifest.from_json(json.loads(raw))
    except urllib.error.HTTPError as e:
        return _Absent(f"{where}: {e}")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        return ShardError(f"{where}: {e}")


class _Absent(ShardError):
    """A remote manifest the server does not have (shards made elsewhere): nothing to warn of."""


def shard_record(url: str) -> dict | None:
    """The shard's entry in the `manifest.json` beside it, or None where there is none: local
    and http(s) shards, and `pipe:` commands whose last argument is a local file
    (`pipe:cat x.tar`)."""
    base, _, name = url.rpartition("/")
    if url.startswith(("http://", "https://")):
        return _entry(base + "/" + MANIFEST, name)
    if url.startswith("pipe:"):
        try:
            url = shlex.split(url[len("pipe:") :])[-1]
        except (ValueError, IndexError):
            return None
    path = Path(url)
    manifest = path.parent / MANIFEST
    kind = file_kind(str(manifest))
    if kind:  # none, or a FIFO or device: reading it would block or never end
        if kind != "missing":
            _warn_once(f"cannot use {manifest} to count documents: it is {kind}")
        return None
    return _entry(str(manifest), path.name)


def _entry(where: str, name: str) -> dict | None:
    try:
        return read_manifest(where).shards.get(name)
    except _Absent:
        return None
    except ShardError as e:
        _warn_once(f"cannot use it to count documents: {e}")
        return None


@functools.lru_cache(maxsize=64)
def _warn_once(message: str) -> None:
    log.warning("%s", message)


def held_samples(url: str) -> int | None:
    """How many samples the shard holds by the `manifest.json` beside it, or None."""
    try:
        return int(shard_record(url)["samples"])
    except (KeyError, TypeError, ValueError):
        return None
