"""The documentation's pages and their Python blocks, for the README and docs tests."""

from __future__ import annotations

import re
from pathlib import Path

from tests.support import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def pages() -> list[Path]:
    """The README and every Markdown page of the documentation, in a stable order."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def python_blocks() -> list[tuple[str, str]]:
    """Every ```python block as (page relative to the repository, block)."""
    return [(str(page.relative_to(REPO_ROOT)), block) for page in pages() for block in BLOCK.findall(page.read_text())]
