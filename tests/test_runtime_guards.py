"""What the runtime guards at start-up, on a real sidecar: a schema from a newer release is never written, a SQLite
database holding data is backed up before a migration, and a running sidecar holds the lock a restore respects."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from persistence import PersistenceSidecar
from persistence.db.engine import create_database
from persistence.errors import (
    ConfigurationError,
    DatabaseInUseError,
    JournalDirectoryInUseError,
    JournalNotWritableError,
)
from persistence.migrations import head_revision, upgrade
from persistence.observe.events import EventBus, JournalUnwritable, RecordsDropped, SchemaNewerThanRelease
from persistence.tools.restore import restore_sqlite
from tests.support import Recorder, save_trade_before_the_trail, sqlite_file
from tests.support.databases import make_settings
from tests.support.factories import make_trade
from tests.support.filesystems import read_only_file_system

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


async def test_a_start_with_a_short_query_timeout_waits_a_second_for_another_migrators_lock(
    sqlite_url: str, sidecar_settings: Any
) -> None:
    """The lock wait has a floor (``DatabaseLink.min_lock_wait``, 1 s) above a 50 ms query timeout: a migrator in
    another process holding the file for 0.4 s does not send the sidecar into an outage at start."""
    database = create_database(make_settings(database_url=sqlite_url))
    await upgrade(database)
    await database.dispose()
    holder = sqlite3.connect(sqlite_url.split("///", 1)[1], isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    asyncio.get_running_loop().call_later(0.4, holder.rollback)
    sidecar = PersistenceSidecar(sidecar_settings(sqlite_url, query_timeout_ms=50))
    try:
        await sidecar.start()
        assert sidecar.health().db.reachable is True
    finally:
        await sidecar.close()
        holder.close()


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


# ---------------------------------------------------------------------------------------------- the journal directory


async def test_a_second_sidecar_on_one_journal_directory_refuses_to_start_and_nothing_is_lost(
    clean_database_url: str, sidecar_settings: Any, tmp_path: Path
) -> None:
    """Two bots started from one folder: the second refuses (naming the directory and the holder) before it touches
    anything; its records made before ``start()`` stay in RAM, and a later ``start()`` persists them."""
    first_url, second_url = (
        (clean_database_url, f"sqlite+aiosqlite:///{tmp_path / 'second.db'}")
        if clean_database_url.startswith("sqlite")
        else (clean_database_url, clean_database_url)  # PostgreSQL: two orchestrators on one database
    )
    first = PersistenceSidecar(sidecar_settings(first_url, instance_id="bot-a"), log_events=False)
    await first.start()
    (tmp_path / "shared").symlink_to(tmp_path / "journal")
    second = PersistenceSidecar(
        sidecar_settings(second_url, instance_id="bot-b", journal_dir=tmp_path / "shared"), log_events=False
    )
    try:
        first_receipts = [first.record_trade(make_trade(trade_id=f"A-{i}")) for i in range(200)]
        second_receipts = [second.record_trade(make_trade(trade_id=f"B-{i}")) for i in range(300)]
        with pytest.raises(JournalDirectoryInUseError) as refused:
            await second.start()
        error = refused.value
        assert error.directory == (tmp_path / "journal").resolve()
        assert (error.holder_pid, error.holder_instance) == (os.getpid(), "bot-a")
        assert second.runtime is None and second.queue_depth() == 300 and len(second.trade_history) == 300
        await first.flush(10.0)
        await first.close()
        await second.start()  # the directory is free now: the records kept in RAM are written
        await second.flush(10.0)
    finally:
        await first.close()
        await second.close()
    assert {receipt.status for receipt in first_receipts + second_receipts} == {"persisted"}
    database = create_database(make_settings(database_url=second_url))
    try:
        async with database.read() as connection:
            stored = set((await connection.execute(text("SELECT trade_id FROM trades"))).scalars())
    finally:
        await database.dispose()
    assert {f"B-{i}" for i in range(300)} <= stored


async def test_a_refused_sidecar_closed_without_starting_never_writes_into_the_owners_journal(
    sqlite_url: str, sidecar_settings: Any, tmp_path: Path
) -> None:
    bus = EventBus()
    events = Recorder(bus)
    first = PersistenceSidecar(sidecar_settings(sqlite_url, instance_id="bot-a"), log_events=False)
    await first.start()
    try:
        second = PersistenceSidecar(
            sidecar_settings(f"sqlite+aiosqlite:///{tmp_path / 'second.db'}", instance_id="bot-b"), bus=bus
        )
        receipts = [second.record_trade(make_trade()) for _ in range(20)]
        with pytest.raises(JournalDirectoryInUseError):
            await second.start()
        before = sorted(os.listdir(tmp_path / "journal"))
        await second.close()
        assert sorted(os.listdir(tmp_path / "journal")) == before  # the owner's files, untouched
        # Not silent: each record counted and logged as dropped, its receipt says so.
        assert {receipt.status for receipt in receipts} == {"dropped"}
        assert sum(event.count for event in events.of(RecordsDropped)) == 20
        assert not (tmp_path / "second.db").exists()
    finally:
        await first.close()


def test_a_sidecar_refuses_a_journal_directory_a_sidecar_in_another_process_owns(
    sidecar_settings: Any, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.children.hold_database_open",
            f"sqlite+aiosqlite:///{tmp_path / 'a.db'}",
            str(journal),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )

    async def start_second() -> None:
        sidecar = PersistenceSidecar(
            sidecar_settings(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", journal_dir=journal), log_events=False
        )
        try:
            await sidecar.start()
        finally:
            await sidecar.close()

    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "READY"
        with pytest.raises(JournalDirectoryInUseError, match=f"{journal}.*pid {child.pid}, instance ") as refused:
            asyncio.run(start_second())
        assert refused.value.holder_pid == child.pid and refused.value.holder_instance
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    asyncio.run(start_second())  # kill -9 leaves no stale owner: the kernel dropped the lock


@pytest.mark.parametrize("where", ["parent_is_a_file", "read_only_file_system"])
async def test_start_fails_naming_a_journal_directory_it_cannot_write(
    where: str, sqlite_url: str, sidecar_settings: Any, tmp_path: Path
) -> None:
    with contextlib.ExitStack() as stack:
        if where == "parent_is_a_file":
            (tmp_path / "file").write_text("x")
            journal = tmp_path / "file" / "journal"
        else:
            journal = stack.enter_context(read_only_file_system(tmp_path / "ro"))
        sidecar = PersistenceSidecar(sidecar_settings(sqlite_url, journal_dir=journal), log_events=False)
        with pytest.raises(JournalNotWritableError, match=f"{journal} is not writable") as refused:
            await sidecar.start()
        assert refused.value.directory == journal
        assert not sqlite_file(sqlite_url).exists()  # refused before the database was touched
        await sidecar.close()


@pytest.mark.parametrize("where", ["parent_is_a_file", "read_only_file_system"])
async def test_journal_not_required_starts_degraded_saying_so(
    where: str, database_url: str, sidecar_settings: Any, tmp_path: Path
) -> None:
    with contextlib.ExitStack() as stack:
        if where == "parent_is_a_file":
            (tmp_path / "file").write_text("x")
            journal = tmp_path / "file" / "journal"
        else:
            journal = stack.enter_context(read_only_file_system(tmp_path / "ro"))
        bus = EventBus()
        events = Recorder(bus)
        sidecar = PersistenceSidecar(
            sidecar_settings(database_url, journal_dir=journal, journal_required=False), bus=bus
        )
        with capture_logs() as logs:
            await sidecar.start()
        try:
            [event] = events.of(JournalUnwritable)
            assert event.directory == str(journal)
            [line] = [entry for entry in logs if entry["event"] == "journal_unwritable"]
            assert line["log_level"] == "critical" and line["directory"] == str(journal)
            health = sidecar.health()
            assert health.journal_error is not None and str(journal) in health.journal_error
            assert health.to_dict()["journal_error"] == health.journal_error
            receipt = sidecar.record_trade(make_trade())
            await sidecar.flush(10.0)  # the database still takes records
            assert receipt.status == "persisted"
        finally:
            await sidecar.close()


def test_journal_required_is_a_strict_flag_defaulting_to_true() -> None:
    assert make_settings().journal_required is True
    assert make_settings(journal_required="no").journal_required is False
    with pytest.raises(ConfigurationError, match="PERSISTENCE_JOURNAL_REQUIRED"):
        make_settings(journal_required="maybe")
