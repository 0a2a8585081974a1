"""The committer on real databases: a batch in, an outcome out; bad records isolated and kept, the rest committed."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from persistence.audit.trail import AuditLog
from persistence.db.engine import Database
from persistence.errors import QueryTimeoutError
from persistence.records.models import Record
from persistence.tables.repositories import Repositories
from persistence.write.backlog import Pending
from persistence.write.committer import DEAD_LETTER_FILE, Committer, RetryPolicy
from persistence.write.faults import classify
from tests.support.factories import make_trade

NO_WAIT = RetryPolicy(attempts=1, initial_wait=0.0, max_wait=0.0)


async def no_sleep(_: float) -> None:
    return None


def pending(records: list[Record]) -> list[Pending]:
    return [Pending(seq, record, None, None, None) for seq, record in enumerate(records, start=1)]


@pytest.fixture
def committer(database: Database, tmp_path: Path) -> Committer:
    return Committer(database, Repositories(database), retry=NO_WAIT, sleep=no_sleep, dead_letter_dir=tmp_path / "j")


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_nul_that_postgresql_refuses_everywhere_is_kept_in_the_dead_letter_file_and_the_rest_commit(
    committer: Committer, repos: Repositories, tmp_path: Path
) -> None:
    # Validation refuses NUL up front; a record that got past it (an older release's journal) must not stop writing.
    bad = make_trade().model_copy(update={"trade_id": "ORD\x00NUL"})
    good = [make_trade() for _ in range(4)]
    outcome = await committer.commit(pending([good[0], good[1], bad, good[2], good[3]]))
    assert outcome.failure is None
    assert [item.record for item in outcome.committed] == good
    [dead] = outcome.dead
    assert dead.item.record is bad and dead.kept_in == "file" and dead.error_class == "DBAPIError"
    assert "0x00" in dead.error
    [line] = (tmp_path / "j" / DEAD_LETTER_FILE).read_bytes().splitlines()
    kept = json.loads(line[9:])
    assert kept["key"] == "ORD\x00NUL" and kept["data"]["trade_id"] == "ORD\x00NUL"
    assert sorted(trade.trade_id for trade in await repos.trades.get_recent_trades(10)) == sorted(
        trade.trade_id for trade in good
    )


async def test_a_clean_batch_commits_every_record_in_order(committer: Committer, repos: Repositories) -> None:
    trades = [make_trade() for _ in range(10)]
    outcome = await committer.commit(pending(list(trades)))
    assert outcome.failure is None and not outcome.dead and outcome.handled == 10
    assert [item.record for item in outcome.committed] == trades


def test_an_encoding_refusal_is_a_data_error_whatever_wraps_it() -> None:
    refusal = UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
    assert classify(sa_exc.StatementError("bind failed", "INSERT", {}, refusal)) == "data"
    wrapped = RuntimeError("driver failed")
    wrapped.__cause__ = refusal
    assert classify(wrapped) == "data"
    assert classify(RuntimeError("something else")) == "transient"


# ---------------------------------------------------------------------------------------------- SQLite: one call


ENDLESS = "SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c)"


async def sqlite_committer(tmp_path: Path, timeout_ms: int) -> tuple[Database, Committer]:
    from persistence.db.engine import create_database
    from persistence.migrations import upgrade
    from tests.support.databases import make_settings

    database = create_database(
        make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'one.db'}", query_timeout_ms=timeout_ms)
    )
    await upgrade(database)
    committer = Committer(database, Repositories(database), retry=NO_WAIT, sleep=no_sleep, dead_letter_dir=tmp_path)
    return database, committer


def endless_trigger(path: Path, table: str) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute(f"CREATE TRIGGER endless BEFORE INSERT ON {table} BEGIN {ENDLESS}; END")
    connection.close()


async def counts(database: Database) -> tuple[int, int]:
    async with database.read() as connection:
        rows = (await connection.execute(text("SELECT count(*) FROM trades"))).scalar_one()
        entries = (await connection.execute(text("SELECT count(*) FROM audit_log"))).scalar_one()
    return int(rows), int(entries)


async def test_a_sqlite_batch_is_one_call_on_the_driver_thread_and_returns_the_chain_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database, committer = await sqlite_committer(tmp_path, 5000)
    try:
        calls: list[object] = []
        queued = aiosqlite.Connection._execute

        async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(fn)
            return await queued(self, fn, *args, **kwargs)

        monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
        trades = [make_trade() for _ in range(50)]
        outcome = await committer.commit(pending(list(trades)))
        assert outcome.failure is None and len(outcome.committed) == 50
        assert len(calls) == 1, "begin, claims, entries and commit were more than one hop into the driver's thread"
        assert outcome.audit_head is not None and outcome.audit_head.seq == 50
        monkeypatch.undo()
        async with database.read() as connection:
            head = await AuditLog(database).head(connection)
        assert head == outcome.audit_head
    finally:
        await database.dispose()


async def test_a_later_statement_of_a_one_call_transaction_is_interrupted_at_the_query_timeout(tmp_path: Path) -> None:
    database, committer = await sqlite_committer(tmp_path, 300)
    try:
        endless_trigger(tmp_path / "one.db", "audit_log")  # the claims pass; appending the entries never ends
        started = time.monotonic()
        outcome = await committer.commit(pending([make_trade() for _ in range(20)]))
        assert isinstance(outcome.failure, QueryTimeoutError) and outcome.failure.timeout_ms == 300
        assert time.monotonic() - started < 5, "the statement ran on after the timeout"
        assert await counts(database) == (0, 0), "the transaction was not rolled back"
    finally:
        await database.dispose()


async def test_a_cancelled_sqlite_batch_stops_its_statement_and_leaves_the_connection_idle(tmp_path: Path) -> None:
    database, committer = await sqlite_committer(tmp_path, 60_000)
    try:
        endless_trigger(tmp_path / "one.db", "trades")
        task = asyncio.ensure_future(committer.commit(pending([make_trade()])))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 5, "the cancelled statement was not interrupted"
        with sqlite3.connect(tmp_path / "one.db") as connection:
            connection.execute("DROP TRIGGER endless")
        connection.close()
        outcome = await committer.commit(pending([make_trade()]))  # the pooled connection holds no transaction
        assert outcome.failure is None and await counts(database) == (1, 1)
    finally:
        await database.dispose()
