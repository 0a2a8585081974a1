"""WAL checkpoints run in the background, not inside the writer's commits, and their failures cost nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

from persistence import PersistenceSidecar
from persistence.db.engine import WAL_AUTOCHECKPOINT_PAGES, Database, create_database, sqlite_path
from persistence.db.wal_checkpoint import CHECKPOINT_INTERVAL, WalCheckpointer
from persistence.errors import QueryTimeoutError
from persistence.migrations import upgrade
from persistence.testing import FakeClock
from persistence.write.committer import RetryPolicy
from tests.support import eventually
from tests.support.databases import make_settings
from tests.support.factories import make_trade


def database_file(url: str) -> Path:
    """The file of a SQLite URL (the project's own reading of it)."""
    path = sqlite_path(make_url(url))
    assert path is not None
    return path


def wal_pages(url: str) -> int:
    path = database_file(url)
    wal = path.with_name(path.name + "-wal")
    with contextlib.closing(sqlite3.connect(path)) as connection:
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    return wal.stat().st_size // page_size if wal.exists() else 0


def rows_in_database_file(url: str, folder: Path) -> int:
    """The trades in the SQLite file of ``url`` without its log: what checkpoints have copied into it."""
    alone = folder / "alone.db"
    shutil.copyfile(database_file(url), alone)
    try:
        with contextlib.closing(sqlite3.connect(alone)) as connection:
            return int(connection.execute("SELECT count(*) FROM trades").fetchone()[0])
    except sqlite3.DatabaseError:  # copied while a checkpoint was writing it: try again
        return -1


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
    clock = FakeClock()

    async with PersistenceSidecar(sidecar_settings(sqlite_url), clock=clock, sleep=clock.sleep) as sidecar:
        await record_one_by_one(sidecar, clock, 300)
        assert wal_pages(sqlite_url) < WAL_AUTOCHECKPOINT_PAGES
        await eventually(lambda: rows_in_database_file(sqlite_url, tmp_path) >= 250)


async def test_the_last_commit_of_a_burst_reaches_the_database_file_once_its_interval_is_up(
    sqlite_url: str, sidecar_settings: Any, tmp_path: Path
) -> None:
    # With synchronous=NORMAL a commit reaches the disk itself when a checkpoint syncs the log: a commit that came
    # within the interval of the last checkpoint must still get one, or it waits for the next commit (or close()).
    clock = FakeClock()

    async with PersistenceSidecar(sidecar_settings(sqlite_url), clock=clock, sleep=clock.sleep) as sidecar:
        await sidecar.record_trade(make_trade())
        # the first commit's checkpoint, at once
        await eventually(lambda: rows_in_database_file(sqlite_url, tmp_path) == 1)
        await sidecar.record_trade(make_trade())  # within the interval: owed one
        await asyncio.sleep(0.2)
        assert rows_in_database_file(sqlite_url, tmp_path) == 1
        clock.advance(CHECKPOINT_INTERVAL)
        await eventually(lambda: rows_in_database_file(sqlite_url, tmp_path) == 2)


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
            assert sidecar.health().breaker == "closed"
    failures = [line for line in logs if line["event"] == "wal_checkpoint_failed"]
    assert len(failures) == 1 and failures[0]["error"] == "disk I/O error"  # four failed; one streak, one line
    with sqlite3.connect(database_file(sqlite_url)) as connection:
        assert connection.execute("SELECT count(*) FROM trades").fetchone()[0] == 200


async def test_a_checkpoint_that_outlasts_the_query_timeout_is_logged_at_info_other_failures_warn(
    sqlite_url: str, sidecar_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PASSIVE checkpoint stopped by the query timeout (a busy machine) has only stopped early: INFO, so a host that
    alerts on warnings is not woken for it. A disk error, in the next streak, stays a WARNING."""
    failures = iter([QueryTimeoutError(150, "PRAGMA wal_checkpoint(PASSIVE)"), None, sqlite3.OperationalError("disk")])

    async def slow_then_broken(self: Database) -> tuple[int, int, int]:
        failure = next(failures, None)
        if failure is None:
            return (0, 0, 0)
        raise failure

    monkeypatch.setattr(Database, "checkpoint", slow_then_broken)
    clock = FakeClock()
    with capture_logs() as logs:
        async with PersistenceSidecar(sidecar_settings(sqlite_url), clock=clock, sleep=clock.sleep) as sidecar:
            await record_one_by_one(sidecar, clock, 200)
    failed = [(line["log_level"], line["error_class"]) for line in logs if line["event"] == "wal_checkpoint_failed"]
    assert failed == [("info", "QueryTimeoutError"), ("warning", "OperationalError")]


async def test_after_a_streak_of_failures_the_recovery_is_logged(
    sqlite_url: str, sidecar_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Database.checkpoint
    broken = {"on": True}

    async def flaky(self: Database) -> tuple[int, int, int]:
        if broken["on"]:
            raise sqlite3.OperationalError("database or disk is full")
        return await real(self)

    monkeypatch.setattr(Database, "checkpoint", flaky)
    clock = FakeClock()
    with capture_logs() as logs:
        async with PersistenceSidecar(sidecar_settings(sqlite_url), clock=clock, sleep=clock.sleep) as sidecar:
            await record_one_by_one(sidecar, clock, 150)
            broken["on"] = False
            await record_one_by_one(sidecar, clock, 100)
    events = [line["event"] for line in logs if line["event"].startswith("wal_checkpoint")]
    assert events == ["wal_checkpoint_failed", "wal_checkpoint_recovered"]
    [recovered] = [line for line in logs if line["event"] == "wal_checkpoint_recovered"]
    assert recovered["failed_before"] >= 3


async def test_one_checkpoint_at_a_time_at_most_once_per_interval_and_none_owed_is_forgotten(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = create_database(make_settings(database_url=sqlite_url))
    waits: list[float] = []
    release = asyncio.Event()
    inside = asyncio.Event()
    leave = asyncio.Event()
    leave.set()
    real = Database.checkpoint

    async def gated(self: Database) -> tuple[int, int, int]:  # a checkpoint the test holds open while it commits
        inside.set()
        await leave.wait()
        return await real(self)

    monkeypatch.setattr(Database, "checkpoint", gated)

    async def sleep(seconds: float) -> None:  # the writer's injected clock: the test says when the wait is over
        waits.append(seconds)
        await release.wait()
        release.clear()

    try:
        await upgrade(database)
        checkpointer = WalCheckpointer(database, interval=1.0, sleep=sleep)
        leave.clear()
        checkpointer.after_commit(10.0)  # none ran yet: at once
        running = checkpointer._task
        await inside.wait()
        checkpointer.after_commit(10.2)  # one is running: this commit is owed one, after the interval
        leave.set()
        assert checkpointer._task is running
        await eventually(lambda: waits == [1.0])
        assert checkpointer.runs == 1
        release.set()
        await eventually(lambda: running is not None and running.done())
        assert checkpointer.runs == 2
        checkpointer.after_commit(11.5)  # within the interval of the last start (11.0): owed, after 0.5
        owed = checkpointer._task
        assert owed is not running
        await eventually(lambda: waits == [1.0, 0.5])
        assert checkpointer.runs == 2
        release.set()
        await eventually(lambda: owed is not None and owed.done())
        assert (checkpointer.runs, checkpointer.failures) == (3, 0)
        checkpointer.after_commit(20.0)  # long after: at once, no wait
        await eventually(lambda: checkpointer.runs == 4)
        await checkpointer.close(5.0)
        assert waits == [1.0, 0.5]
        busy, log_pages, checkpointed = checkpointer.last_result or (-1, -1, -1)
        assert busy == 0 and checkpointed == log_pages
        # One that waits for its interval is cancelled at once by close(): the last connection's close checkpoints.
        checkpointer.after_commit(20.5)
        await eventually(lambda: len(waits) == 3)
        waiting = checkpointer._task
        # Given an hour, close() still ends at once (the outer bound only keeps a failure from hanging the suite).
        await asyncio.wait_for(checkpointer.close(3600.0), 60.0)
        assert waiting is not None and waiting.cancelled() and checkpointer.runs == 4
    finally:
        await database.dispose()


def slowed_checkpoints(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[str]:
    """Make every background checkpoint take ``seconds`` longer; the list records how each ended."""
    ends: list[str] = []
    real = Database.checkpoint

    async def slow(self: Database) -> tuple[int, int, int]:
        try:
            await asyncio.sleep(seconds)
            result = await real(self)
        except asyncio.CancelledError:
            ends.append("cancelled")
            raise
        ends.append("finished")
        return result

    monkeypatch.setattr(Database, "checkpoint", slow)
    return ends


def open_files_under(folder: Path) -> list[str]:
    """Files under ``folder`` this process still has open (deleted ones included)."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(str(folder)):
                found.append(target)
    return found


async def test_close_waits_for_a_running_checkpoint(
    sqlite_url: str, sidecar_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ends = slowed_checkpoints(monkeypatch, 0.2)
    clock = FakeClock()
    async with PersistenceSidecar(sidecar_settings(sqlite_url), clock=clock, sleep=clock.sleep) as sidecar:
        await sidecar.record_trade(make_trade())  # the first commit starts a checkpoint
        assert ends == []
    assert ends == ["finished"]
    assert not [task for task in asyncio.all_tasks() if task.get_name() == "persistence-wal-checkpoint"]


async def test_a_vanished_file_leaves_no_connection_open_behind_a_running_checkpoint(
    sqlite_url: str, sidecar_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ends = slowed_checkpoints(monkeypatch, 0.2)
    path = database_file(sqlite_url)
    clock = FakeClock()
    retry = RetryPolicy(attempts=2, initial_wait=0.0, max_wait=0.0)
    async with PersistenceSidecar(sidecar_settings(sqlite_url), clock=clock, sleep=clock.sleep, retry=retry) as sidecar:
        await sidecar.record_trade(make_trade())  # starts a checkpoint that holds a pooled connection for 0.2 s
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        assert await asyncio.wait_for(sidecar.record_trade(make_trade()), 10) == "persisted"
        assert ends[0] == "finished"  # the pool was reset only after it
    assert [name for name in open_files_under(path.parent) if "deleted" in name] == []


async def test_an_in_memory_database_has_no_checkpointer(sidecar_settings: Any) -> None:
    async with PersistenceSidecar(sidecar_settings("sqlite+aiosqlite:///:memory:"), log_events=False) as sidecar:
        await sidecar.record_trade(make_trade())
        assert sidecar.runtime is not None and sidecar.runtime.checkpointer is None


@pytest.mark.postgres
async def test_postgresql_has_no_checkpointer(postgres_url: str, sidecar_settings: Any) -> None:
    async with PersistenceSidecar(sidecar_settings(postgres_url), log_events=False) as sidecar:
        await sidecar.record_trade(make_trade())
        assert sidecar.runtime is not None and sidecar.runtime.checkpointer is None


async def test_a_sqlite_file_has_one(sqlite_url: str, sidecar_settings: Any) -> None:
    async with PersistenceSidecar(sidecar_settings(sqlite_url), log_events=False) as sidecar:
        assert sidecar.runtime is not None and sidecar.runtime.checkpointer is not None
