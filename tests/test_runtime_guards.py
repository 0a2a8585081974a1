"""What the runtime guards at start-up, on a real sidecar: a schema from a newer release is never written, a SQLite
database holding data is backed up before a migration, and a running sidecar holds the lock a restore respects."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from persistence import PersistenceSidecar
from persistence.db.engine import create_database
from persistence.errors import DatabaseInUseError
from persistence.migrations import head_revision, upgrade
from persistence.observe.events import EventBus, SchemaNewerThanRelease
from persistence.tools.restore import restore_sqlite
from tests.support import Recorder, save_trade_before_the_trail, sqlite_file
from tests.support.databases import make_settings
from tests.support.factories import make_trade

REPO_ROOT = Path(__file__).resolve().parent.parent
NEWER = "f00dfeed9999"


async def test_a_database_migrated_by_a_newer_release_is_never_written_and_nothing_is_lost(
    sqlite_url: str, sidecar_settings: Any, tmp_path: Path
) -> None:
    database = create_database(make_settings(database_url=sqlite_url))
    await upgrade(database)
    async with database.write() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": NEWER})
    await database.dispose()
    bus = EventBus()
    events = Recorder(bus)
    sidecar = PersistenceSidecar(sidecar_settings(sqlite_url), bus=bus)
    await sidecar.start()
    receipts = [sidecar.record_trade(make_trade()) for _ in range(5)]
    assert sidecar.health().db.reachable is False
    await sidecar.close()
    [newer] = events.of(SchemaNewerThanRelease)
    assert newer.database_revision == NEWER and newer.release_revision == head_revision()
    assert {receipt.status for receipt in receipts} == {"journaled"}  # kept for the newer release to write
    with sqlite3.connect(sqlite_url.split("///", 1)[1]) as connection:
        assert connection.execute("SELECT count(*) FROM trades").fetchone() == (0,)
        assert connection.execute("SELECT version_num FROM alembic_version").fetchone() == (NEWER,)


async def test_starting_on_an_older_database_holding_data_backs_it_up_before_migrating(
    sqlite_url: str, sidecar_settings: Any, tmp_path: Path
) -> None:
    database = create_database(make_settings(database_url=sqlite_url))
    await upgrade(database, "0001")
    save_trade_before_the_trail(sqlite_file(sqlite_url), make_trade(trade_id="BEFORE-MIGRATION"))
    await database.dispose()
    backups = tmp_path / "backups"
    async with PersistenceSidecar(sidecar_settings(sqlite_url, backup_dir=backups), log_events=False) as sidecar:
        assert sidecar.health().schema_revision == head_revision()
    [backup] = list(backups.iterdir())
    with sqlite3.connect(backup) as connection:
        assert connection.execute("SELECT trade_id FROM trades").fetchall() == [("BEFORE-MIGRATION",)]
        assert connection.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)


def test_a_restore_is_refused_while_a_sidecar_in_another_process_has_the_database_open(tmp_path: Path) -> None:
    database = tmp_path / "bot.db"
    url = f"sqlite+aiosqlite:///{database}"
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.children.hold_database_open", url, str(tmp_path / "journal")],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "READY"
        backup = tmp_path / "backup.db"
        with sqlite3.connect(database) as source, sqlite3.connect(backup) as target:
            source.backup(target)
        with pytest.raises(DatabaseInUseError, match="in use"):
            restore_sqlite(backup, database)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    restore_sqlite(backup, database)  # the kernel dropped the killed sidecar's lock: the restore goes through now
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT trade_id FROM trades").fetchall() == [("HELD-1",)]
