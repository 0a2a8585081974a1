"""WAL checkpoints run in the background, not inside the writer's commits, and their failures cost nothing."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from persistence import PersistenceSidecar
from persistence.checkpoint import CHECKPOINT_INTERVAL, WalCheckpointer
from persistence.db import WAL_AUTOCHECKPOINT_PAGES, Database, create_database
from persistence.migrations import upgrade
from persistence.testing import FakeClock
from tests.conftest import make_settings
from tests.factories import make_trade
from tests.support import eventually


def wal_pages(url: str) -> int:
    path = Path(url.split(":///", 1)[1])
    wal = path.with_name(path.name + "-wal")
    with contextlib.closing(sqlite3.connect(path)) as connection:
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    return wal.stat().st_size // page_size if wal.exists() else 0


async def record_one_by_one(sidecar: PersistenceSidecar, clock: FakeClock, count: int) -> None:
    """One record per transaction, the clock moving a checkpoint interval every 50 commits."""
    for number in range(count):
        await sidecar.record_trade(make_trade())
        if number % 50 == 49:
            clock.advance(CHECKPOINT_INTERVAL * 1.2)
            await asyncio.sleep(0.01)  # a checkpoint started now runs beside the next commits


async def test_commits_only_checkpoint_as_a_backstop(sqlite_url: str) -> None:
    database = create_database(make_settings(database_url=sqlite_url))
    try:
        async with database.read() as connection:
            pages = (await connection.execute(text("PRAGMA wal_autocheckpoint"))).scalar_one()
    finally:
        await database.dispose()
    assert pages == WAL_AUTOCHECKPOINT_PAGES


async def test_committed_pages_reach_the_database_file_in_the_background(
    sqlite_url: str, sidecar_settings: Any, tmp_path: Path
) -> None:
    # 300 one-record transactions write about 2,500 log pages, well below the commit path's backstop (10,000): only
    # the background checkpoints can have copied them into the database file itself.
    path = Path(sqlite_url.split(":///", 1)[1])
    clock = FakeClock()

    def rows_in_database_file() -> int:
        alone = tmp_path / "alone.db"  # the database file without its log: what a checkpoint has copied
        shutil.copyfile(path, alone)
        with contextlib.closing(sqlite3.connect(alone)) as connection:
            return int(connection.execute("SELECT count(*) FROM trades").fetchone()[0])

    async with PersistenceSidecar(sidecar_settings(sqlite_url), clock=clock, sleep=clock.sleep) as sidecar:
        await record_one_by_one(sidecar, clock, 300)
        assert wal_pages(sqlite_url) < WAL_AUTOCHECKPOINT_PAGES
        await eventually(lambda: rows_in_database_file() >= 250)


async def test_a_failing_checkpoint_is_logged_and_every_record_is_still_written(
    sqlite_url: str, sidecar_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Database) -> tuple[int, int, int]:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Database, "checkpoint", broken)
    clock = FakeClock()
    with capture_logs() as logs:
        async with PersistenceSidecar(sidecar_settings(sqlite_url), clock=clock, sleep=clock.sleep) as sidecar:
            await record_one_by_one(sidecar, clock, 200)
            assert sidecar.health()["breaker"] == "closed"
    failures = [line for line in logs if line["event"] == "wal_checkpoint_failed"]
    assert failures and failures[0]["error"] == "disk I/O error"
    with sqlite3.connect(sqlite_url.split(":///", 1)[1]) as connection:
        assert connection.execute("SELECT count(*) FROM trades").fetchone()[0] == 200


async def test_one_checkpoint_at_a_time_at_most_once_per_interval(sqlite_url: str) -> None:
    database = create_database(make_settings(database_url=sqlite_url))
    try:
        await upgrade(database)
        checkpointer = WalCheckpointer(database, interval=1.0)
        checkpointer.after_commit(10.0)
        running = checkpointer._task
        checkpointer.after_commit(20.0)  # one is still running: no second one
        assert checkpointer._task is running
        await checkpointer.close(5.0)
        checkpointer.after_commit(10.5)  # within the interval of the last start
        assert checkpointer._task is running
        checkpointer.after_commit(11.0)
        assert checkpointer._task is not running
        await checkpointer.close(5.0)
        assert (checkpointer.runs, checkpointer.failures) == (2, 0)
        busy, log_pages, checkpointed = checkpointer.last_result or (-1, -1, -1)
        assert busy == 0 and checkpointed == log_pages
    finally:
        await database.dispose()


async def test_close_leaves_no_checkpoint_running(sqlite_url: str, sidecar_settings: Any) -> None:
    clock = FakeClock()
    async with PersistenceSidecar(sidecar_settings(sqlite_url), clock=clock, sleep=clock.sleep) as sidecar:
        await record_one_by_one(sidecar, clock, 60)
        sidecar.record_trade(make_trade())
    assert not [task for task in asyncio.all_tasks() if task.get_name() == "persistence-wal-checkpoint"]


async def test_in_memory_and_server_databases_have_no_checkpointer(sidecar_settings: Any) -> None:
    sidecar = PersistenceSidecar(sidecar_settings("sqlite+aiosqlite:///:memory:"), log_events=False)
    async with sidecar:
        await sidecar.record_trade(make_trade())
        assert not [task for task in asyncio.all_tasks() if task.get_name() == "persistence-wal-checkpoint"]
