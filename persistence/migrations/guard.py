"""The schema guard: a database whose revision this release does not know is never written.

A database migrated by a newer release carries a revision that is not among the packaged migrations. Writing to it
would write rows in a shape this release does not understand, so :func:`check_known_revision` refuses with
:class:`SchemaNewerError` naming both revisions, before anything is written; the caller decides what to do (the
sidecar runs memory-only with its journal, ``migrate`` exits non-zero).
"""

from __future__ import annotations

from alembic.script import ScriptDirectory
from alembic.util import CommandError

from persistence.errors import SchemaNewerError


def is_known(script: ScriptDirectory, revision: str) -> bool:
    """Whether ``revision`` is one of the migrations in ``script``."""
    try:
        return script.get_revision(revision) is not None
    except CommandError:
        return False


def check_known_revision(script: ScriptDirectory, database_revision: str | None) -> None:
    """Raise :class:`SchemaNewerError` when ``database_revision`` is set and unknown to ``script``."""
    if database_revision is not None and not is_known(script, database_revision):
        raise SchemaNewerError(database_revision, script.get_current_head() or "base")
