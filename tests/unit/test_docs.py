"""The documentation: the MkDocs site builds with every link and anchor between its pages
resolved (and a broken anchor does fail the build), the generated configuration reference is
current, and the README's links and status agree with the repository and the site."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mmfm.cli import config_reference_markdown

REPO = Path(__file__).resolve().parents[2]
REFRESH = "mmfm config --doc-markdown > docs/reference/configuration.md"


def build_site(root: Path, site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of `root`/mkdocs.yml. Never with -q: quiet drops the warnings
    before strict mode counts them, and a build with broken anchors then passes."""
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml")]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # material's banner about its successor
    return subprocess.run(
        [*cmd, "-d", str(site)], capture_output=True, text=True, timeout=120, env=env
    )


def test_the_site_builds_with_every_link_and_anchor_resolved(tmp_path):
    out = build_site(REPO, tmp_path / "site")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").is_file()


def test_a_broken_anchor_fails_the_strict_build(tmp_path):
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path)
    with (tmp_path / "docs" / "index.md").open("a") as f:
        f.write("\nSee [the loss](configuration.md#no-such-section).\n")
    out = build_site(tmp_path, tmp_path / "site")
    assert out.returncode != 0 and "no-such-section" in out.stderr, out.stderr


def test_the_configuration_reference_is_current():
    page = (REPO / "docs" / "reference" / "configuration.md").read_text()
    assert page == config_reference_markdown(), f"the page is out of date: run {REFRESH}"


def readme_section(text: str, name: str) -> str:
    return text.split(f"\n## {name}\n", 1)[1].split("\n## ")[0]


def test_the_readme_links_resolve_inside_the_clone():
    """Every link of README.md is a path of this repository (relative, so it reads on a forge
    and in a clone alike); its anchors are left to the pages the site checks."""
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert targets
    for target in targets:
        assert not target.startswith(("/", "..", "http")), target
        assert (REPO / target).exists(), target


def test_the_readme_and_the_site_show_the_same_status():
    readme = (REPO / "README.md").read_text()
    index = (REPO / "docs" / "index.md").read_text()
    assert readme_section(readme, "Status") == readme_section(index, "Status")
