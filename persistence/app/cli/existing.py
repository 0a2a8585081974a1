"""Commands that read never create: the check they make before connecting.

Connecting to a SQLite URL creates the file, so ``status``, ``history``, ``export`` and ``audit verify``/``versions``
call :func:`require_existing` first: a SQLite file must already be there (checked without opening it), and a
PostgreSQL database the server says does not exist (SQLSTATE ``3D000``) is one line too. Only ``migrate``, ``copy``'s
target and a starting sidecar create a database.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from persistence.config import Settings
from persistence.db.engine import create_database, sqlite_path
from persistence.errors import DatabaseMissingError

_NO_SUCH_DATABASE = "3D000"


def _sqlstate(error: BaseException | None) -> str | None:
    seen = 0
    while error is not None and seen < 8:
        state = getattr(error, "sqlstate", None)
        if isinstance(state, str):
            return state
        error = getattr(error, "orig", None) or error.__cause__
        seen += 1
    return None


async def require_existing(settings: Settings) -> None:
    """Raise :class:`DatabaseMissingError` when the database of ``settings`` does not exist; creates nothing.

    Other failures to connect are left to the command, which reports the database unreachable.
    """
    if settings.is_sqlite:
        path = sqlite_path(settings.url)
        if path is not None and not await asyncio.to_thread(path.exists):
            raise DatabaseMissingError(
                f"the database {path} does not exist ({settings.safe_database_url}); nothing was created"
                " (check the URL; `persistence-sidecar migrate` creates a new one)"
            )
        return
    database = create_database(settings)
    try:
        async with database.read() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception as exc:
        if _sqlstate(exc) == _NO_SUCH_DATABASE:
            raise DatabaseMissingError(
                f"the database {settings.url.database!r} does not exist on the server ({settings.safe_database_url})"
            ) from None
    finally:
        await database.dispose()
