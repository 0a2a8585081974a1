"""Real faults and small waiting helpers for the write-path tests."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import make_url

from persistence.db import Database
from persistence.events import Event, EventBus


async def eventually(predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.01) -> None:
    """Wait (really) until ``predicate()`` holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


class Recorder:
    """Collects every event published on a bus."""

    def __init__(self, bus: EventBus) -> None:
        self.events: list[Event] = []
        bus.subscribe(self.events.append)

    def of(self, kind: type[Any]) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]


class DatabaseLock:
    """Another connection holding the database's write lock (SQLite ``BEGIN EXCLUSIVE``; PostgreSQL table locks)."""

    TABLES = "trades, signals, performance_snapshots, parameter_history, dead_letters"

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._sqlite: sqlite3.Connection | None = None
        self._pg: Any = None

    async def acquire(self) -> None:
        url = make_url(self._url)
        if url.get_backend_name() == "sqlite":
            self._sqlite = sqlite3.connect(url.database or "", isolation_level=None, timeout=10)
            self._sqlite.execute("BEGIN EXCLUSIVE")
        else:
            self._pg = await asyncpg.connect(
                host=url.host, port=url.port or 5432, user=url.username, password=url.password, database=url.database
            )
            await self._pg.execute("BEGIN")
            await self._pg.execute(f"LOCK TABLE {self.TABLES} IN ACCESS EXCLUSIVE MODE")

    async def release(self) -> None:
        if self._sqlite is not None:
            self._sqlite.rollback()
            self._sqlite.close()
            self._sqlite = None
        if self._pg is not None:
            await self._pg.execute("ROLLBACK")
            await self._pg.close()
            self._pg = None

    async def __aenter__(self) -> DatabaseLock:
        await self.acquire()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.release()


class StatementCounter:
    """Counts statements a database's engine sends (to prove that none are sent)."""

    def __init__(self, database: Database) -> None:
        self.count = 0
        event.listen(database.engine.sync_engine, "before_cursor_execute", self._seen)

    def _seen(self, *_: object) -> None:
        self.count += 1


class DiskLimit:
    """A full disk for a SQLite database: ``PRAGMA max_page_count`` on every connection the engine hands out."""

    def __init__(self, database: Database) -> None:
        self.max_pages: int | None = None
        event.listen(database.engine.sync_engine.pool, "checkout", self._apply)

    def _apply(self, dbapi_connection: Any, *_: Any) -> None:
        limit = self.max_pages if self.max_pages is not None else 1_073_741_823
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA max_page_count = {limit}")
        finally:
            cursor.close()

    def fill(self, path: Path) -> None:
        """Allow no more pages than the file has now."""
        with sqlite3.connect(path) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.max_pages = connection.execute("PRAGMA page_count").fetchone()[0]

    def free(self) -> None:
        self.max_pages = None


def sqlite_file(database_url: str) -> Path:
    return Path(make_url(database_url).database or "")


def add_poison_trigger_sqlite(path: Path, poison_id: str) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute(
            f"CREATE TRIGGER poison BEFORE INSERT ON trades WHEN NEW.trade_id = '{poison_id}' "
            "BEGIN SELECT RAISE(ABORT, 'poison record refused by trigger'); END"
        )


async def add_poison_trigger_postgres(database_url: str, poison_id: str) -> None:
    url = make_url(database_url)
    connection = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, password=url.password, database=url.database
    )
    try:
        await connection.execute(
            f"""
            CREATE OR REPLACE FUNCTION refuse_poison() RETURNS trigger AS $$
            BEGIN
              IF NEW.trade_id = '{poison_id}' THEN RAISE EXCEPTION 'poison record refused by trigger'; END IF;
              RETURN NEW;
            END $$ LANGUAGE plpgsql;
            DROP TRIGGER IF EXISTS poison ON trades;
            CREATE TRIGGER poison BEFORE INSERT ON trades FOR EACH ROW EXECUTE FUNCTION refuse_poison();
            """
        )
    finally:
        await connection.close()


async def drop_poison_trigger_postgres(database_url: str) -> None:
    url = make_url(database_url)
    connection = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, password=url.password, database=url.database
    )
    try:
        await connection.execute("DROP TRIGGER IF EXISTS poison ON trades")
    finally:
        await connection.close()
