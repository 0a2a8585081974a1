"""MkDocs hook: the docstrings' Sphinx cross-reference roles read as plain code in the generated API reference.

The package's docstrings write ``:class:`~persistence.tables.queries.SignalQuery``` (Sphinx style); mkdocstrings
renders that as the role's name followed by the code. This turns ``:class:<code>~a.b.C</code>`` into ``<code>C</code>``
and ``:meth:<code>a.b</code>`` into ``<code>a.b</code>``, as Sphinx would show them.
"""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:class|meth|func|mod|attr|data|exc|obj):<code>(~?)([^<]*)</code>")


def _plain(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if short else target}</code>"


def on_page_content(html: str, **_: Any) -> str:
    return ROLE.sub(_plain, html)
