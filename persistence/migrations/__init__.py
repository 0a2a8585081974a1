"""Schema migrations (Alembic, shipped inside the package) and the functions that apply them in-process.

:func:`upgrade` is safe to run twice and from two processes at once: it takes the database's write lock first
(``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped advisory lock on PostgreSQL) and runs every migration in
that one transaction, so a second migrator waits, then finds the schema current and does nothing. It never
touches logging configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

from persistence.db import Database
from persistence.errors import MigrationError

MIGRATIONS_DIR = Path(__file__).resolve().parent
_PG_MIGRATION_LOCK = 0x5EC1DECA  # arbitrary, constant: the advisory lock key all migrators share


def alembic_config(extra_version_locations: Sequence[Path] = ()) -> Config:
    """An Alembic configuration pointing at the packaged migrations (plus any extra version folders)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    locations = [MIGRATIONS_DIR / "versions", *extra_version_locations]
    config.set_main_option("version_locations", " ".join(str(path) for path in locations))
    config.set_main_option("path_separator", "space")
    return config


def head_revision(extra_version_locations: Sequence[Path] = ()) -> str:
    """The newest revision the packaged migrations know."""
    head = ScriptDirectory.from_config(alembic_config(extra_version_locations)).get_current_head()
    if head is None:
        raise MigrationError("no migrations found")
    return head


async def current_revision(database: Database) -> str | None:
    """The revision the database is at, or ``None`` for a database never migrated."""
    async with database.read() as connection:
        return await connection.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())


async def upgrade(
    database: Database,
    revision: str = "head",
    *,
    extra_version_locations: Sequence[Path] = (),
    lock_wait_seconds: float = 60.0,
) -> str | None:
    """Bring the schema to ``revision`` under the database's write lock; return the revision reached."""
    config = alembic_config(extra_version_locations)

    def run(sync_connection: Connection) -> str | None:
        config.attributes["connection"] = sync_connection
        command.upgrade(config, revision)
        return MigrationContext.configure(sync_connection).get_current_revision()

    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_is_locked),
            stop=stop_after_delay(lock_wait_seconds),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            reraise=True,
        ):
            with attempt:
                async with database.write() as connection:
                    if database.dialect_name == "postgresql":
                        await connection.execute(
                            text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
                        )
                    return await connection.run_sync(run)
    except Exception as exc:
        raise MigrationError(f"migration to {revision!r} failed: {exc}", revision=revision) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def _is_locked(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError) and "locked" in str(exc).lower()


def describe(database: Database) -> dict[str, Any]:
    """Static facts for status output: where migrations live and the head revision."""
    return {"migrations": str(MIGRATIONS_DIR), "head": head_revision()}
