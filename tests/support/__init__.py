"""Real faults and small waiting helpers for the write-path tests.

``DatabaseLock`` and ``DiskLimit`` are re-exported from the public fault kit (:mod:`persistence.testing`), so the
project's own tests exercise exactly what users run in their CI."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import make_url

from persistence.db.columns import to_scaled_int, to_sqlite_datetime
from persistence.db.engine import Database
from persistence.observe.events import Event, EventBus
from persistence.records.models import Trade
from persistence.testing import DatabaseLock, DiskLimit

__all__ = [
    "DatabaseLock",
    "DiskLimit",
    "Recorder",
    "StatementCounter",
    "add_poison_trigger_postgres",
    "add_poison_trigger_sqlite",
    "drop_poison_trigger_postgres",
    "eventually",
    "save_trade_before_the_trail",
    "sqlite_file",
    "start_recorder_until_killed",
]


async def background_checkpoints_done() -> None:
    """Wait for the writer's background WAL checkpoint, if one runs (it holds a pooled SQLite connection)."""
    running = [task for task in asyncio.all_tasks() if task.get_name() == "persistence-wal-checkpoint"]
    if running:
        await asyncio.wait(running)


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


class StatementCounter:
    """Counts statements a database's engine sends (to prove that none are sent)."""

    def __init__(self, database: Database) -> None:
        self.count = 0
        event.listen(database.engine.sync_engine, "before_cursor_execute", self._seen)

    def _seen(self, *_: object) -> None:
        self.count += 1


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


def save_trade_before_the_trail(path: Path, trade: Trade) -> None:
    """Write ``trade`` into a SQLite database at a revision before the audit trail (0001, 0002), as it stored them.

    The repositories write this release's schema (``instance_id``, the trail), which an older database lacks.
    """
    values = [
        None
        if value is None
        else to_sqlite_datetime(value)
        if isinstance(value, datetime)
        else to_scaled_int(value)
        if isinstance(value, Decimal)
        else value
        for value in trade.__dict__.values()
    ]
    names = ", ".join(trade.__dict__)
    marks = ", ".join("?" for _ in values)
    with sqlite3.connect(path) as connection:
        connection.execute(f"INSERT INTO trades ({names}) VALUES ({marks})", values)


REPO_ROOT = Path(__file__).resolve().parents[2]


def start_recorder_until_killed(*arguments: str) -> subprocess.Popen[str]:
    """``python -m tests.children.record_until_killed ARGUMENTS``, started and READY: it prints each key persisted."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.children.record_until_killed", *arguments],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "READY"
    return child
