"""Schema migrations (Alembic, shipped inside the package) and the functions that apply them in-process.

:func:`upgrade` is safe to run twice and from two processes at once: it takes the database's write lock first
(``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped advisory lock on PostgreSQL) and runs every migration in
that one transaction, so a second migrator waits, then finds the schema current and does nothing. It never
touches logging configuration.

Two rails guard a production database. A database whose revision this release does not know (a newer release
migrated it) is never written: :class:`SchemaNewerError` is raised before any migration runs. And a SQLite database
that holds data is copied into ``backup_dir`` (when one is given; the newest 3 copies kept) before a pending migration
changes it. :func:`migrate_to` also runs downgrades, and refuses one that would drop a table or a column holding
data unless forced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

from persistence.db.backups import KEEP_BACKUPS, backup_before_migration, holds_data
from persistence.db.engine import Database, sqlite_path
from persistence.errors import DowngradeDataLossError, DowngradeTrialDone, MigrationError, SchemaNewerError
from persistence.migrations.guard import check_known_revision, is_known

__all__ = [
    "MIGRATIONS_DIR",
    "DowngradeDataLossError",
    "MigrationPlan",
    "SchemaNewerError",
    "alembic_config",
    "current_revision",
    "describe",
    "head_revision",
    "migrate_to",
    "plan_migration",
    "upgrade",
]

log = logging.getLogger("persistence.migrations")
T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).resolve().parent
_PG_MIGRATION_LOCK = 0x5EC1DECA  # arbitrary, constant: the advisory lock key all migrators share


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    """What :func:`migrate_to` will do: from which revision to which, and in which direction."""

    current: str | None
    target: str | None
    direction: Literal["none", "upgrade", "downgrade"]


def alembic_config(extra_version_locations: Sequence[Path] = ()) -> Config:
    """An Alembic configuration pointing at the packaged migrations (plus any extra version folders)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    locations = [MIGRATIONS_DIR / "versions", *extra_version_locations]
    config.set_main_option("version_locations", " ".join(str(path) for path in locations))
    config.set_main_option("path_separator", "space")
    return config


def _loaded_script(config: Config) -> ScriptDirectory:
    """The migration scripts of ``config``, every version file read and compiled (blocking: run it in a thread, so
    that the host's loop does not wait for the files)."""
    script = ScriptDirectory.from_config(config)
    script.get_heads()
    return script


def head_revision(extra_version_locations: Sequence[Path] = ()) -> str:
    """The newest revision the packaged migrations know."""
    head = ScriptDirectory.from_config(alembic_config(extra_version_locations)).get_current_head()
    if head is None:
        raise MigrationError("no migrations found")
    return head


async def current_revision(database: Database) -> str | None:
    """The revision the database is at, or ``None`` for a database never migrated."""
    async with database.read() as connection:
        return await connection.run_sync(_revision_of)


def _revision_of(sync_connection: Connection) -> str | None:
    return MigrationContext.configure(sync_connection).get_current_revision()


async def upgrade(
    database: Database,
    revision: str = "head",
    *,
    extra_version_locations: Sequence[Path] = (),
    lock_wait_seconds: float = 60.0,
    backup_dir: Path | None = None,
    keep_backups: int = KEEP_BACKUPS,
) -> str | None:
    """Bring the schema to ``revision`` under the database's write lock; return the revision reached.

    Raises :class:`SchemaNewerError`, writing nothing, when the database is at a revision this release does not
    know. With ``backup_dir`` set, a SQLite database that holds data is backed up there before a pending migration.
    """
    config = alembic_config(extra_version_locations)
    script = await asyncio.to_thread(_loaded_script, config)
    if backup_dir is not None:
        current = await _checked_revision(database, script, lock_wait_seconds)
        if _pending(script, current, revision):
            await _backup_if_holding_data(database, backup_dir, current, keep_backups)

    def run(sync_connection: Connection) -> str | None:
        current = _revision_of(sync_connection)
        check_known_revision(script, current)
        if revision in ("head", "heads") and current is not None and script.get_heads() == [current]:
            # Already there (every start but the first): Alembic's command, which loads env.py and plans on the
            # host's loop thread (6-40 ms), is not run for nothing.
            return current
        config.attributes["connection"] = sync_connection
        command.upgrade(config, revision)
        return _revision_of(sync_connection)

    return await _locked(database, run, revision, lock_wait_seconds)


def plan_migration(script: ScriptDirectory, current: str | None, revision: str) -> MigrationPlan:
    """Where ``revision`` (a revision id, ``head`` or ``base``) is from ``current``: up, down, or here already."""
    if revision in ("head", "heads"):
        target: str | None = script.get_current_head()
    elif revision == "base":
        target = None
    elif is_known(script, revision):
        target = revision
    else:
        raise MigrationError(f"unknown revision {revision!r}; this release knows {_known(script)}", revision=revision)
    if target == current:
        return MigrationPlan(current, target, "none")
    return MigrationPlan(current, target, "downgrade" if _is_ancestor(script, target, current) else "upgrade")


async def migrate_to(
    database: Database,
    revision: str = "head",
    *,
    force: bool = False,
    extra_version_locations: Sequence[Path] = (),
    lock_wait_seconds: float = 60.0,
    backup_dir: Path | None = None,
    keep_backups: int = KEEP_BACKUPS,
) -> MigrationPlan:
    """Upgrade or downgrade the schema to ``revision``; returns what was done.

    A downgrade that would drop a table or a column holding data raises :class:`DowngradeDataLossError` (nothing
    changed) unless ``force``. The schema guard and the backup apply as in :func:`upgrade`.
    """
    config = alembic_config(extra_version_locations)
    script = await asyncio.to_thread(_loaded_script, config)
    current = await _checked_revision(database, script, lock_wait_seconds)
    plan = plan_migration(script, current, revision)
    if plan.direction == "upgrade":
        await upgrade(
            database,
            plan.target or "head",
            extra_version_locations=extra_version_locations,
            lock_wait_seconds=lock_wait_seconds,
            backup_dir=backup_dir,
            keep_backups=keep_backups,
        )
    elif plan.direction == "downgrade":
        target = plan.target or "base"
        losses = await _downgrade_losses(database, config, target, lock_wait_seconds)
        if losses and not force:
            raise DowngradeDataLossError(target, losses)
        if backup_dir is not None:
            await _backup_if_holding_data(database, backup_dir, current, keep_backups)

        def run(sync_connection: Connection) -> str | None:
            if _revision_of(sync_connection) != current:
                raise MigrationError("the schema changed while the downgrade was being planned; run it again")
            config.attributes["connection"] = sync_connection
            command.downgrade(config, target)
            return _revision_of(sync_connection)

        await _locked(database, run, target, lock_wait_seconds)
    return plan


async def _downgrade_losses(database: Database, config: Config, target: str, lock_wait_seconds: float) -> list[str]:
    """The tables and columns a downgrade to ``target`` would drop that hold data (found by a rolled-back trial)."""

    def trial(sync_connection: Connection) -> None:
        before = _schema_of(sync_connection)
        config.attributes["connection"] = sync_connection
        command.downgrade(config, target)
        raise DowngradeTrialDone(before, _schema_of(sync_connection))

    try:
        await _locked(database, trial, target, lock_wait_seconds, passthrough=(DowngradeTrialDone,))
    except DowngradeTrialDone as outcome:
        dropped_tables = sorted(set(outcome.before) - set(outcome.after) - {"alembic_version"})
        dropped_columns = sorted(
            (table, column)
            for table in outcome.after
            if table in outcome.before
            for column in outcome.before[table] - outcome.after[table]
        )
    else:  # pragma: no cover - the trial always raises
        raise AssertionError("the trial downgrade did not roll back")
    losses: list[str] = []
    async with database.read() as connection:
        for table in dropped_tables:
            if (await connection.execute(text(f'SELECT 1 FROM "{table}" LIMIT 1'))).first():  # noqa: S608
                losses.append(table)
        for table, column in dropped_columns:
            probe = f'SELECT 1 FROM "{table}" WHERE "{column}" IS NOT NULL LIMIT 1'  # noqa: S608
            if (await connection.execute(text(probe))).first():
                losses.append(f"{table}.{column}")
    return losses


def _schema_of(sync_connection: Connection) -> dict[str, set[str]]:
    inspector = inspect(sync_connection)
    return {table: {c["name"] for c in inspector.get_columns(table)} for table in inspector.get_table_names()}


async def _checked_revision(database: Database, script: ScriptDirectory, lock_wait_seconds: float) -> str | None:
    """The database's revision, refused if this release does not know it.

    A migrator in another process may hold SQLite's lock for longer than a reader's busy timeout (creating the schema
    of a new file); the read is retried for as long as the lock itself would be waited for.
    """
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_is_locked),
            stop=stop_after_delay(lock_wait_seconds),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            reraise=True,
        ):
            with attempt:
                current = await current_revision(database)
    except Exception as exc:
        raise MigrationError(f"could not read the schema revision: {exc}") from exc
    check_known_revision(script, current)
    return current


def _pending(script: ScriptDirectory, current: str | None, revision: str) -> bool:
    try:
        return plan_migration(script, current, revision).direction != "none"
    except MigrationError:
        return True


async def _backup_if_holding_data(database: Database, backup_dir: Path, current: str | None, keep: int) -> None:
    if not database.is_sqlite:
        return
    path = sqlite_path(database.settings.url)
    if path is None:
        return
    from persistence.db.schema import TABLES

    names = [table.name for table in TABLES]
    if not await asyncio.to_thread(holds_data, path, names):
        return
    destination = await asyncio.to_thread(backup_before_migration, path, backup_dir, revision=current, keep=keep)
    log.info("backup_before_migrate: %s backed up to %s (schema revision %s)", path, destination, current)


async def _locked(
    database: Database,
    run: Callable[[Connection], T],
    revision: str,
    lock_wait_seconds: float,
    passthrough: tuple[type[BaseException], ...] = (),
) -> T:
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
        if isinstance(exc, (MigrationError, *passthrough)):
            raise
        raise MigrationError(f"migration to {revision!r} failed: {exc}", revision=revision) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def _is_locked(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError) and "locked" in str(exc).lower()


def _is_ancestor(script: ScriptDirectory, candidate: str | None, of: str | None) -> bool:
    """Whether ``candidate`` (``None`` = base) lies below ``of`` in the (linear) revision history."""
    revision = of
    while revision is not None:
        script_revision = script.get_revision(revision)
        down = script_revision.down_revision if script_revision is not None else None
        revision = down if isinstance(down, str) or down is None else (down[0] if down else None)
        if revision == candidate:
            return True
    return False


def _known(script: ScriptDirectory) -> str:
    return ", ".join(revision.revision for revision in reversed(list(script.walk_revisions())))


def describe(database: Database) -> dict[str, Any]:
    """Static facts for status output: where migrations live and the head revision."""
    return {"migrations": str(MIGRATIONS_DIR), "head": head_revision()}
