"""The schema guard and the backup before a migration: a newer schema is never written; data is copied first."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from persistence.db.backups import automatic_backups, backup_before_migration, backup_dir_for
from persistence.db.engine import Database, create_database
from persistence.errors import MigrationError, PersistenceError, SchemaNewerError
from persistence.migrations import current_revision, head_revision, migrate_to, upgrade
from persistence.tables.repositories import Repositories
from tests.support import save_trade_before_the_trail
from tests.support.cli import run_in_process
from tests.support.databases import make_settings
from tests.support.factories import make_trade

REPO_ROOT = Path(__file__).resolve().parent.parent
NEWER = "f00dfeed9999"


async def _state(database: Database) -> tuple[object, ...]:
    """Everything a write could change: the revision, the tables and their contents."""
    async with database.read() as connection:
        revision = (await connection.execute(text("SELECT version_num FROM alembic_version"))).all()
        trades = (await connection.execute(text("SELECT * FROM trades ORDER BY id"))).all()
        if database.is_sqlite:
            schema = (await connection.execute(text("SELECT type, name, sql FROM sqlite_master ORDER BY name"))).all()
        else:
            schema = (
                await connection.execute(
                    text(
                        "SELECT table_name, column_name, data_type FROM information_schema.columns"
                        " WHERE table_schema = 'public' ORDER BY table_name, column_name"
                    )
                )
            ).all()
    return tuple(revision), tuple(trades), tuple(schema)


async def _stamp(database: Database, revision: str) -> None:
    async with database.write() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": revision})


async def test_upgrade_refuses_a_database_stamped_by_a_newer_release_and_writes_nothing(
    fresh_url: str, tmp_path: Path
) -> None:
    database = create_database(make_settings(database_url=fresh_url))
    try:
        await upgrade(database)
        await Repositories(database).trades.save_trade(make_trade(pnl="-1.00000001"))
        await _stamp(database, NEWER)
        before = await _state(database)
        backups = tmp_path / "backups"
        with pytest.raises(SchemaNewerError):
            await upgrade(database)  # how the sidecar calls it at start-up
        with pytest.raises(SchemaNewerError) as raised:
            await upgrade(database, backup_dir=backups)
        assert raised.value.database_revision == NEWER
        assert raised.value.release_revision == head_revision()
        assert isinstance(raised.value, PersistenceError)
        assert NEWER in str(raised.value) and head_revision() in str(raised.value)
        with pytest.raises(SchemaNewerError):
            await migrate_to(database, "0001", force=True)
        assert await _state(database) == before
        assert await current_revision(database) == NEWER
        assert not backups.exists()
    finally:
        await database.dispose()


def test_the_migrate_command_refuses_a_newer_schema_naming_both_revisions(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    env = {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{path}"}
    migrate = ["migrate"]  # by its main() in this process (tests.support.cli); test_migrations runs it in processes
    assert run_in_process(*migrate, cwd=tmp_path, env=env).returncode == 0
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = ?", (NEWER,))
    size = path.stat().st_size
    for command in (migrate, [*migrate, "--to", "0001", "--force"]):
        done = run_in_process(*command, cwd=tmp_path, env=env)
        assert done.returncode == 1
        assert NEWER in done.stderr and f"'{head_revision()}'" in done.stderr and "newer release" in done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [(NEWER,)]
    assert path.stat().st_size == size


async def _at_first_revision_with_a_trade(path: Path) -> Database:
    database = create_database(make_settings(database_url=f"sqlite+aiosqlite:///{path}"))
    await upgrade(database, "0001")
    save_trade_before_the_trail(path, make_trade(trade_id="KEEP-ME", pnl="-0.00000001"))
    return database


async def test_a_sqlite_database_holding_data_is_backed_up_before_a_pending_migration(tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    database = await _at_first_revision_with_a_trade(tmp_path / "bot.db")
    try:
        assert await upgrade(database, backup_dir=backups) == head_revision()
        (backup,) = automatic_backups(backups, "bot")
        assert backup.name.startswith("bot-") and backup.name.endswith("-rev0001.db")
        with sqlite3.connect(backup) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert connection.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)
            assert connection.execute("SELECT trade_id, pnl FROM trades").fetchall() == [("KEEP-ME", -1)]
        await upgrade(database, backup_dir=backups)  # nothing pending: no second copy
        assert automatic_backups(backups, "bot") == [backup]
    finally:
        await database.dispose()


async def test_no_backup_of_a_database_without_data(tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    database = create_database(make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"))
    try:
        await upgrade(database, "0001", backup_dir=backups)
        await upgrade(database, backup_dir=backups)
        assert automatic_backups(backups, "empty") == []
    finally:
        await database.dispose()


def test_only_the_newest_three_automatic_backups_are_kept(tmp_path: Path) -> None:
    source = tmp_path / "bot.db"
    with sqlite3.connect(source) as connection:
        connection.execute("CREATE TABLE trades (id INTEGER PRIMARY KEY)")
        connection.execute("INSERT INTO trades VALUES (1)")
    backups = tmp_path / "backups"
    backups.mkdir()
    unrelated = backups / "bot-my-own-copy.db"
    unrelated.write_bytes(b"mine")
    start = datetime(2026, 12, 1, tzinfo=UTC)
    made = [
        backup_before_migration(source, backups, revision="0001", now=start + timedelta(hours=hour))
        for hour in range(5)
    ]
    assert automatic_backups(backups, "bot") == made[-3:]
    assert not made[0].exists() and not made[1].exists()
    assert unrelated.read_bytes() == b"mine"


def test_the_backup_settings_and_turning_the_backup_off(tmp_path: Path) -> None:
    settings = make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    assert settings.backup_dir == Path("./data/backups") and settings.backup_before_migrate is True
    assert backup_dir_for(settings) == Path("./data/backups")
    off = make_settings(database_url=settings.database_url, backup_before_migrate="false", backup_dir=tmp_path)
    assert backup_dir_for(off) is None
    assert backup_dir_for(make_settings(database_url="postgresql+asyncpg://u@h/db")) is None
    with pytest.raises(PersistenceError, match="PERSISTENCE_BACKUP_BEFORE_MIGRATE"):
        make_settings(database_url=settings.database_url, backup_before_migrate="maybe")


@pytest.mark.parametrize("enabled", [True, False])
def test_the_migrate_command_backs_up_first_unless_turned_off(tmp_path: Path, enabled: bool) -> None:
    async def prepare() -> None:
        database = await _at_first_revision_with_a_trade(tmp_path / "bot.db")
        await database.dispose()

    asyncio.run(prepare())
    backups = tmp_path / "backups"
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
        "PERSISTENCE_BACKUP_DIR": str(backups),
        "PERSISTENCE_BACKUP_BEFORE_MIGRATE": "true" if enabled else "false",
    }
    done = run_in_process("migrate", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert f"schema at revision {head_revision()}" in done.stdout
    found = automatic_backups(backups, "bot")
    if enabled:
        assert len(found) == 1 and f"backed up the database to {found[0]}" in done.stdout
    else:
        assert found == [] and "backed up" not in done.stdout


async def test_an_unknown_target_revision_is_a_clear_error(tmp_path: Path) -> None:
    database = create_database(make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"))
    try:
        await upgrade(database)
        with pytest.raises(MigrationError, match="unknown revision 'nope'; this release knows 0001, 0002, 0003, 0004"):
            await migrate_to(database, "nope")
    finally:
        await database.dispose()
