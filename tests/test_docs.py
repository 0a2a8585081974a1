"""The documentation: the site builds with ``mkdocs build --strict`` and no internet, and it teaches only public names.

``docs/`` is built into a temporary folder (a broken link, anchor, snippet or API reference fails the build). The
README and every page import only names in ``persistence.__all__`` or ``persistence.testing``, their prose names no
module inside the package (except the logger names a host configures), the API reference covers every public name,
and the README's links into ``docs/`` lead to a page and a heading that exist.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import persistence
import persistence.testing
from tests.support import REPO_ROOT
from tests.support.docs import BLOCK, DOCS, README, pages, python_blocks

MKDOCS_CONFIG = REPO_ROOT / "mkdocs.yml"
# Logger names a host sets levels on, and the fault kit: the module paths a user has to know.
PUBLIC_MODULES = {"persistence.testing", "persistence.api", "persistence.migrations"}
MODULE_MENTION = re.compile(r"(?<![\w./-])persistence((?:\.[A-Za-z_]\w*)+)")
PATH_MENTION = re.compile(r"(?<![\w./-])persistence/[\w/]+")
REFERENCE = re.compile(r"^::: (\S+)", re.MULTILINE)
README_LINK = re.compile(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)")


def prose(page: Path) -> str:
    """The page without its Python blocks (those are checked by parsing them)."""
    return BLOCK.sub("", page.read_text())


def mkdocs_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("mkdocs", "material", "mkdocstrings_handlers"))


@pytest.mark.skipif(not mkdocs_available(), reason="the docs extra is not installed: pip install -e '.[docs]'")
def test_the_site_builds_strictly_without_the_internet(tmp_path: Path) -> None:
    site = tmp_path / "site"
    # Any attempt to fetch something goes to a closed local port and fails: the build must not need the internet.
    offline = {
        name: "http://127.0.0.1:9" for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")
    }
    environment = {**os.environ, **offline, "NO_PROXY": "", "no_proxy": "", "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(MKDOCS_CONFIG), "--site-dir", site],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    html = "\n".join(page.read_text() for page in site.rglob("*.html"))
    assert "fonts.googleapis.com" not in html and "fonts.gstatic.com" not in html, "web fonts would need the internet"
    reference = (site / "reference" / "sidecar" / "index.html").read_text()
    assert "record_trade" in reference, "the API reference was not generated from the docstrings"
    assert not re.search(r":(class|meth|func|mod|attr):<code>", html), "docs/hooks/roles.py left a Sphinx role"
    guarantees = (site / "guarantees" / "index.html").read_text()
    assert "PERSISTENCE_JOURNAL_SYNC_SECONDS" in guarantees, "the README's guarantees were not included"


@pytest.mark.parametrize("item", python_blocks(), ids=lambda item: f"{item[0]}:{python_blocks().index(item)}")
def test_examples_import_only_public_names(item: tuple[str, str]) -> None:
    page, block = item
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name in ("persistence", "persistence.testing") or not alias.name.startswith(
                    "persistence."
                ), f"{page}: import {alias.name}"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "persistence":
            names = {alias.name for alias in node.names}
            if node.module == "persistence":
                assert names <= set(persistence.__all__), f"{page}: not public: {names - set(persistence.__all__)}"
            else:
                assert node.module == "persistence.testing", f"{page}: from {node.module} import …"
                assert names <= set(persistence.testing.__all__), f"{page}: {names - set(persistence.testing.__all__)}"


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_prose_names_no_module_inside_the_package(page: Path) -> None:
    text = prose(page)
    for match in MODULE_MENTION.finditer(text):
        dotted = "persistence" + match.group(1)
        first = dotted.split(".")[1]
        assert first in persistence.__all__ or any(
            dotted == module or dotted.startswith(module + ".") for module in PUBLIC_MODULES
        ), f"{page.name} names an inner module: {dotted}"
    assert not PATH_MENTION.findall(text), f"{page.name} names a path inside the package"


def test_the_api_reference_covers_every_public_name_and_only_public_names() -> None:
    targets = {target for page in (DOCS / "reference").glob("*.md") for target in REFERENCE.findall(page.read_text())}
    public = {f"persistence.{name}" for name in persistence.__all__} | {
        f"persistence.testing.{name}" for name in persistence.testing.__all__
    }
    assert public - targets == set(), "add these to docs/reference/"
    assert targets - public == set(), "the reference documents names that are not public"


def slug(heading: str) -> str:
    """The anchor MkDocs' toc extension gives a heading."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[-\s]+", "-", text).strip("-")


def test_the_readmes_links_into_the_docs_lead_somewhere() -> None:
    links = README_LINK.findall(README.read_text())
    assert len(links) >= 10
    for target, anchor in links:
        page = REPO_ROOT / target
        assert page.is_file(), target
        if anchor:
            headings = {slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}
            assert anchor in headings, f"{target}#{anchor}"


def test_every_page_is_in_the_navigation() -> None:
    config = MKDOCS_CONFIG.read_text()
    for page in DOCS.rglob("*.md"):
        assert f": {page.relative_to(DOCS).as_posix()}" in config, f"{page} is not in mkdocs.yml's nav"
