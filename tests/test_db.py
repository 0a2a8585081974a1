"""Engine factory: SQLite pragmas, BEGIN IMMEDIATE for writers, pool settings, and statement timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import StaticPool

from persistence.db.engine import SQLITE_MAX_BUSY_MS, Database, create_database, driver_of, sqlite_path
from persistence.errors import QueryTimeoutError
from tests.support.databases import make_settings

ENDLESS_SQLITE_QUERY = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


@pytest.fixture
async def scratch(sqlite_url: str) -> AsyncIterator[tuple[Database, Path]]:
    """A SQLite database (300 ms query timeout) with one scratch table ``t`` holding one row."""
    database = create_database(make_settings(database_url=sqlite_url, query_timeout_ms=300))
    path = sqlite_path(database.engine.url)
    assert path is not None
    try:
        async with database.write() as connection:
            await connection.execute(text("CREATE TABLE t (x)"))
            await connection.execute(text("INSERT INTO t VALUES (1)"))
        yield database, path
    finally:
        await database.dispose()


@contextlib.contextmanager
def another_connection_holding(path: Path, mode: str) -> Iterator[sqlite3.Connection]:
    """Another connection holding ``BEGIN <mode>`` on the file for the block."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute(f"BEGIN {mode}")
    try:
        yield other
    finally:
        other.rollback()
        other.close()


async def test_sqlite_connections_get_wal_normal_sync_busy_timeout_foreign_keys_and_cache(sqlite_url: str) -> None:
    database = create_database(make_settings(database_url=sqlite_url, query_timeout_ms=400, sqlite_cache_mib=3))
    try:
        async with database.read() as connection:
            pragma = {
                name: (await connection.execute(text(f"PRAGMA {name}"))).scalar_one()
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys", "cache_size")
            }
    finally:
        await database.dispose()
    assert pragma == {
        "journal_mode": "wal",
        "synchronous": 1,
        "busy_timeout": 400,
        "foreign_keys": 1,
        "cache_size": -3 * 1024,  # negative: KiB
    }


async def test_busy_timeout_is_capped(sqlite_url: str) -> None:
    database = create_database(make_settings(database_url=sqlite_url, query_timeout_ms=60_000))
    try:
        async with database.read() as connection:
            assert (await connection.execute(text("PRAGMA busy_timeout"))).scalar_one() == SQLITE_MAX_BUSY_MS
    finally:
        await database.dispose()


async def test_the_folder_of_a_sqlite_file_is_created(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'deep' / 'er' / 'trading.db'}"
    database = create_database(make_settings(database_url=url))
    try:
        async with database.write() as connection:
            await connection.execute(text("CREATE TABLE t (x)"))
    finally:
        await database.dispose()
    assert (tmp_path / "deep" / "er" / "trading.db").exists()


async def test_writers_take_the_write_lock_at_begin(scratch: tuple[Database, Path]) -> None:
    """A writer holds the RESERVED lock from BEGIN on, so a second writer is refused before it reads."""
    database, path = scratch
    async with database.write() as connection:
        await connection.execute(text("SELECT 1"))  # a read only, yet the lock is already taken
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        finally:
            other.close()


async def test_readers_do_not_block_on_a_held_write_lock(scratch: tuple[Database, Path]) -> None:
    database, path = scratch
    with another_connection_holding(path, "IMMEDIATE"):
        async with database.read() as connection:
            assert (await connection.execute(text("SELECT count(*) FROM t"))).scalar_one() == 1


async def test_a_writer_facing_an_exclusive_lock_fails_after_the_busy_timeout(scratch: tuple[Database, Path]) -> None:
    database, path = scratch
    started = time.monotonic()
    with another_connection_holding(path, "EXCLUSIVE"), pytest.raises(OperationalError, match="locked"):
        async with database.write() as connection:
            await connection.execute(text("INSERT INTO t VALUES (2)"))
    assert time.monotonic() - started < 5
    async with database.write() as connection:  # and the engine still works afterwards
        await connection.execute(text("INSERT INTO t VALUES (3)"))


async def test_a_runaway_sqlite_statement_is_interrupted_at_the_query_timeout(sqlite_url: str) -> None:
    database = create_database(make_settings(database_url=sqlite_url, query_timeout_ms=300))
    try:
        started = time.monotonic()
        with pytest.raises(QueryTimeoutError) as caught:
            async with database.read() as connection:
                await connection.execute(text(ENDLESS_SQLITE_QUERY))
        elapsed = time.monotonic() - started
        assert caught.value.timeout_ms == 300
        assert elapsed < 5, "the statement kept running after the timeout"
        # The connection is usable again: a quick statement is not hit by a stale interrupt.
        async with database.read() as connection:
            assert (await connection.execute(text("SELECT 42"))).scalar_one() == 42
    finally:
        await database.dispose()


async def test_fast_statements_are_never_interrupted(sqlite_url: str) -> None:
    database = create_database(make_settings(database_url=sqlite_url, query_timeout_ms=50))
    try:
        for _ in range(200):
            async with database.read() as connection:
                assert (await connection.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await database.dispose()


async def test_in_memory_sqlite_uses_one_static_connection_without_pool_arguments() -> None:
    database = create_database(make_settings(database_url="sqlite+aiosqlite:///:memory:", pool_size=3))
    try:
        assert isinstance(database.engine.pool, StaticPool)
        async with database.write() as connection:
            await connection.execute(text("CREATE TABLE t (x)"))
        async with database.read() as connection:
            assert (await connection.execute(text("SELECT count(*) FROM t"))).scalar_one() == 0
    finally:
        await database.dispose()


@pytest.mark.postgres
async def test_postgres_pool_settings_and_statement_timeout(postgres_url: str) -> None:
    database = create_database(
        make_settings(database_url=postgres_url, pool_size=3, max_overflow=2, query_timeout_ms=300)
    )
    try:
        assert database.engine.pool.size() == 3  # type: ignore[attr-defined]
        started = time.monotonic()
        with pytest.raises(QueryTimeoutError):
            async with database.read() as connection:
                await connection.execute(text("SELECT pg_sleep(10)"))
        assert time.monotonic() - started < 5
        async with database.read() as connection:
            assert (await connection.execute(text("SHOW statement_timeout"))).scalar_one() == "300ms"
    finally:
        await database.dispose()


async def test_a_read_connection_returned_to_the_pool_holds_no_transaction(scratch: tuple[Database, Path]) -> None:
    """The pool does not roll back on return: closing a connection must end its read transaction itself."""
    database, path = scratch
    async with database.read() as connection:
        assert (await connection.execute(text("SELECT count(*) FROM t"))).scalar_one() == 1
    # A read snapshot left open would block a checkpoint that truncates the WAL.
    with sqlite3.connect(path, isolation_level=None) as other:
        other.execute("INSERT INTO t VALUES (2)")
        busy, _, _ = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0
    async with database.read() as connection:
        assert (await connection.execute(text("SELECT count(*) FROM t"))).scalar_one() == 2


async def test_a_runaway_batch_write_on_the_driver_fast_path_is_interrupted_at_the_query_timeout(
    sqlite_url: str,
) -> None:
    from persistence.migrations import upgrade
    from persistence.tables.repositories import Repositories
    from tests.support.factories import make_trade

    database = create_database(make_settings(database_url=sqlite_url, query_timeout_ms=300))
    path = sqlite_path(database.engine.url)
    assert path is not None
    try:
        await upgrade(database)
        with sqlite3.connect(path) as connection:  # every insert now runs forever
            connection.execute(
                "CREATE TRIGGER endless BEFORE INSERT ON trades BEGIN SELECT count(*) FROM "
                "(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c); END"
            )
        started = time.monotonic()
        with pytest.raises(QueryTimeoutError):
            async with database.write() as connection:
                await Repositories(database).trades.upsert(connection, [make_trade()])
        assert time.monotonic() - started < 5
        async with database.read() as connection:  # the connection is fine afterwards
            assert (await connection.execute(text("SELECT count(*) FROM trades"))).scalar_one() == 0
    finally:
        await database.dispose()


async def test_a_cancelled_bounded_statement_is_interrupted_and_ended_before_the_cancellation_goes_on(
    sqlite_url: str,
) -> None:
    """A background checkpoint cancelled at ``close()`` must not leave its statement running in the driver's thread,
    to finish later on a loop that may be closed by then: the cancellation interrupts it and waits for its end."""
    database = create_database(make_settings(database_url=sqlite_url, query_timeout_ms=120_000))
    running = threading.Event()

    def mark(value: int) -> int:
        running.set()
        return value

    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(mark(x)) FROM c"
    try:
        async with database.read() as connection:
            driver = await driver_of(connection)
            await driver.create_function("mark", 1, mark)
            task = asyncio.ensure_future(database._bounded(driver, endless, lambda: driver.execute_fetchall(endless)))
            assert await asyncio.to_thread(running.wait, 60), "the statement never started"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 60)  # not the query timeout (120 s): the cancellation interrupted it
            # The driver's thread is free: the next statement is not queued behind the endless one.
            try:
                assert await asyncio.wait_for(driver.execute_fetchall("SELECT 42"), 10) == [(42,)]
            finally:
                await driver.interrupt()  # if it still runs (the test failing), it must not hold the pool forever
    finally:
        await database.dispose()
