"""Copy between databases: SQLite ↔ PostgreSQL value by value, idempotent, resumable after SIGKILL, tampering caught."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from persistence.db.engine import Database, create_database
from persistence.db.schema import TABLES
from persistence.errors import CopyMismatchError, CopyRefusedError, MigrationError
from persistence.migrations import upgrade
from persistence.records.models import Trade
from persistence.sidecar import PersistenceSidecar
from persistence.tables.repositories import AMENDMENT_RULES, Repositories
from persistence.tools.copy import copy_database, table_checksum
from tests.support.cli import run_in_process
from tests.support.databases import create_postgres_database, drop_postgres_database, make_settings
from tests.support.portability import record_everything, varied_trades

REPO_ROOT = Path(__file__).resolve().parent.parent
# Two full chunks of the default 2,000 and a partial one: the chunk boundaries and the last short chunk are crossed.
TRADE_COUNT = 4_100
KILLED_AT = 2_000  # the copy killed half way has committed four chunks of 500
BUMP = "UPDATE trades SET entry_price = entry_price"  # + 1 on SQLite's stored integer: one unit of 10**-8


@pytest.fixture
def postgres_target() -> Iterator[str]:
    url = create_postgres_database("persistence_copy")
    yield url
    drop_postgres_database(url)


def _sqlite(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def _db(url: str) -> Database:
    return create_database(make_settings(database_url=url))


async def _source(path: Path, count: int = TRADE_COUNT) -> None:
    database = _db(_sqlite(path))
    try:
        await upgrade(database)
        await record_everything(database, varied_trades(count))
    finally:
        await database.dispose()


async def _everything(url: str) -> dict[str, Any]:
    """Every record of every table, read back through the repositories (decoded values)."""
    database = _db(url)
    try:
        repos = Repositories(database)
        trades = await repos.trades.get_latest_trades(1_000_000)
        signals = (await repos.signals.query(limit=1000)).items
        letters = await repos.dead_letters.list(limit=1000)
        return {
            "trades": {trade.trade_id: dict(trade.__dict__) for trade in trades},
            "signals": {signal.signal_id: dict(signal.__dict__) for signal in signals},
            "snapshots": {s.id: dict(s.__dict__) for s in await repos.snapshots.get_snapshots(limit=1000)},
            "parameters": {p.id: dict(p.__dict__) for p in await repos.parameters.get_changes(limit=1000)},
            "dead_letters": [(d.entity, d.natural_key, d.payload, d.error, d.created_at) for d in letters],
        }
    finally:
        await database.dispose()


async def _copy(source_url: str, target_url: str, **options: Any) -> Any:
    source, target = _db(source_url), _db(target_url)
    try:
        return await copy_database(source, target, rules=AMENDMENT_RULES, **options)
    finally:
        await source.dispose()
        await target.dispose()


@pytest.mark.postgres
async def test_sqlite_to_postgresql_and_back_keeps_every_value_and_a_second_run_adds_nothing(
    tmp_path: Path, postgres_target: str
) -> None:
    await _source(tmp_path / "bot.db")
    original = await _everything(_sqlite(tmp_path / "bot.db"))
    assert len(original["trades"]) == TRADE_COUNT

    seen: list[tuple[str, int, int]] = []
    report = await _copy(_sqlite(tmp_path / "bot.db"), postgres_target, progress=lambda *p: seen.append(p))
    assert report.mismatched == [] and [entry.table for entry in report.tables] == [t.name for t in TABLES]
    assert {entry.table: entry.added for entry in report.tables}["trades"] == TRADE_COUNT
    assert ("trades", TRADE_COUNT, TRADE_COUNT) in seen
    assert await _everything(postgres_target) == original

    again = await _copy(_sqlite(tmp_path / "bot.db"), postgres_target)
    assert [entry.added for entry in again.tables] == [0] * len(TABLES)

    back = _sqlite(tmp_path / "back.db")
    report_back = await _copy(postgres_target, back)
    assert report_back.mismatched == [] and await _everything(back) == original

    # Rows the sidecar writes into the target afterwards get fresh ids (the sequences were moved on).
    target = _db(postgres_target)
    try:
        await Repositories(target).trades.save_trade(varied_trades(1, prefix="NEW")[0])
        await Repositories(target).dead_letters.add(varied_trades(1, prefix="DL")[0], "later")
    finally:
        await target.dispose()


async def test_sqlite_to_sqlite_copy_matches_and_the_cli_reports_each_table(tmp_path: Path) -> None:
    await _source(tmp_path / "bot.db", 2_000)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DATABASE_URL": _sqlite(tmp_path / "bot.db")}
    command = [sys.executable, "-m", "persistence", "copy", "--to", _sqlite(tmp_path / "copy.db")]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0] == "trades: 2,000 rows, 2,000 added, counts and checksums match"
    assert lines[-1].endswith("every table's count and checksum match") and err.decode() == ""
    assert await _everything(_sqlite(tmp_path / "copy.db")) == await _everything(_sqlite(tmp_path / "bot.db"))


async def _pg_connect(url: str) -> asyncpg.Connection:
    parsed = make_url(url)
    return await asyncpg.connect(host=parsed.host, port=parsed.port, user=parsed.username, database=parsed.database)


# A snapshot is never amended (the writer keeps its first version), so the copy leaves a changed one as it is.
TAMPER = (
    "UPDATE performance_snapshots SET total_pnl = total_pnl + 1 WHERE id = (SELECT MIN(id) FROM performance_snapshots)"
)


def _tamper(url: str) -> None:
    if url.startswith("sqlite"):
        with sqlite3.connect(make_url(url).database or "") as connection:
            connection.execute(TAMPER)
        return

    async def update() -> None:
        parsed = make_url(url)
        connection = await asyncpg.connect(
            host=parsed.host, port=parsed.port, user=parsed.username, database=parsed.database
        )
        try:
            await connection.execute(TAMPER)
        finally:
            await connection.close()

    asyncio.run(update())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def target_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield _sqlite(tmp_path / "target.db")
        return
    yield request.getfixturevalue("postgres_target")


def test_a_row_tampered_in_the_target_fails_the_copy_naming_the_table(tmp_path: Path, target_url: str) -> None:
    asyncio.run(_source(tmp_path / "bot.db", 1_000))
    env = {**os.environ, "DATABASE_URL": _sqlite(tmp_path / "bot.db")}
    first = run_in_process("copy", "--to", target_url, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    _tamper(target_url)
    second = run_in_process("copy", "--to", target_url, cwd=tmp_path, env=env)
    assert second.returncode == 1
    assert "the copy differs from the source in performance_snapshots" in second.stderr
    assert "performance_snapshots: 7 rows, 0 added, DIFFERS: same row count, different checksum" in second.stdout
    assert "trades: 1,000 rows, 0 added, counts and checksums match" in second.stdout


async def test_the_checksum_sees_a_one_unit_change_in_the_last_decimal_place(tmp_path: Path) -> None:
    await _source(tmp_path / "bot.db", 50)
    database = _db(_sqlite(tmp_path / "bot.db"))
    try:
        trades = next(t for t in TABLES if t.name == "trades")
        before = await table_checksum(database, trades)
        async with database.write() as connection:
            await connection.execute(
                text("UPDATE trades SET entry_price = entry_price + 1 WHERE trade_id = 'X-0000003'")
            )
        changed = await table_checksum(database, trades)
        async with database.write() as connection:
            await connection.execute(
                text("UPDATE trades SET entry_price = entry_price - 1 WHERE trade_id = 'X-0000003'")
            )
        assert changed != before and await table_checksum(database, trades) == before
    finally:
        await database.dispose()


async def test_copy_refuses_a_source_that_is_not_at_this_releases_head(tmp_path: Path) -> None:
    source = _db(_sqlite(tmp_path / "old.db"))
    try:
        await upgrade(source, "0001")
    finally:
        await source.dispose()
    with pytest.raises(MigrationError, match="run `persistence-sidecar migrate` on the source"):
        await _copy(_sqlite(tmp_path / "old.db"), _sqlite(tmp_path / "new.db"))
    assert not (tmp_path / "new.db").exists()


async def _blocking_row(url: str, source: Path, trade_id: str) -> asyncpg.Connection:
    """Insert, in a transaction left open, the very row the copy will reach: its insert waits on ours."""
    with sqlite3.connect(source) as connection:
        connection.row_factory = sqlite3.Row
        row = dict(connection.execute("SELECT * FROM trades WHERE trade_id = ?", (trade_id,)).fetchone())
    blocker = await _pg_connect(url)
    await blocker.execute("BEGIN")
    await blocker.execute(
        "INSERT INTO trades (id, trade_id, symbol, direction, entry_time, entry_price, position_size, created_at,"
        " updated_at) VALUES ($1, $2, 'EURUSD', 'BUY', now(), 1, 1, now(), now())",
        row["id"],
        row["trade_id"],
    )
    return blocker


async def _count(url: str) -> int:
    database = _db(url)
    try:
        return await Repositories(database).trades.count()
    finally:
        await database.dispose()


@pytest.mark.postgres
async def test_a_copy_killed_half_way_resumes_and_ends_identical_without_duplicates(
    tmp_path: Path, postgres_target: str
) -> None:
    source_path = tmp_path / "bot.db"
    await _source(source_path)
    target = _db(postgres_target)
    try:
        await upgrade(target)
    finally:
        await target.dispose()
    blocker = await _blocking_row(postgres_target, source_path, f"X-{KILLED_AT:07d}")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DATABASE_URL": _sqlite(source_path)}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "persistence", "copy", "--to", postgres_target, "--chunk-size", "500",
        cwd=tmp_path, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # Chunks of 500 commit until the one holding X-0002000 (the 2,001st row) waits on the open transaction.
        deadline = time.monotonic() + 120
        while await _count(postgres_target) < KILLED_AT:
            assert child.returncode is None and time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await _count(postgres_target) == KILLED_AT
        child.send_signal(signal.SIGKILL)
        assert await child.wait() == -signal.SIGKILL
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await blocker.execute("ROLLBACK")
        await blocker.close()
    assert await _count(postgres_target) == KILLED_AT

    report = await _copy(_sqlite(source_path), postgres_target, chunk_rows=500)
    assert report.mismatched == []
    assert {entry.table: entry.added for entry in report.tables}["trades"] == TRADE_COUNT - KILLED_AT
    assert await _count(postgres_target) == TRADE_COUNT
    assert await _everything(postgres_target) == await _everything(_sqlite(source_path))


async def test_a_row_missing_from_the_target_is_copied_again_and_an_extra_one_is_reported(tmp_path: Path) -> None:
    await _source(tmp_path / "bot.db", 100)
    source, copy = _sqlite(tmp_path / "bot.db"), _sqlite(tmp_path / "copy.db")
    await _copy(source, copy)
    with sqlite3.connect(tmp_path / "copy.db") as connection:
        connection.execute("DELETE FROM dead_letters")
    repaired = await _copy(source, copy)
    assert {entry.table: entry.added for entry in repaired.tables}["dead_letters"] == 1
    with sqlite3.connect(tmp_path / "copy.db") as connection:
        connection.execute(
            "INSERT INTO trades (trade_id, symbol, direction, entry_time, entry_price, position_size, created_at,"
            " updated_at) SELECT 'EXTRA', symbol, direction, entry_time, entry_price, position_size, created_at,"
            " updated_at FROM trades LIMIT 1"
        )
    with pytest.raises(CopyMismatchError) as differs:
        await _copy(source, copy)
    assert differs.value.tables == ["trades"]
    (line,) = [line for line in differs.value.report.lines() if line.startswith("trades")]
    assert line == "trades: 100 rows, 0 added, DIFFERS: 100 rows in the source, 101 in the target"


# ---------------------------------------------------------------------------------------------- the documented move


def _amended(trade: Trade, round_number: int) -> Trade:
    """The bot's next version of ``trade``: closed, with a later ``updated_at``."""
    return trade.model_copy(
        update={
            "exit_time": trade.entry_time + timedelta(minutes=round_number),
            "exit_price": Decimal("1.00000005") + Decimal("0.0000001") * round_number,
            "updated_at": trade.updated_at + timedelta(seconds=round_number),
        }
    )


async def _cli(*args: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """``persistence-sidecar ARGS`` by its ``main()`` in this process (``tests.support.cli``); ``copy`` runs in a real
    subprocess in the tests above (the report, a kill half way)."""
    done = run_in_process(*args, cwd=cwd, env={**os.environ, **env})
    return done.returncode, done.stdout, done.stderr


async def test_the_documented_move_with_a_bot_amending_during_the_first_run_ends_equal_and_verified(
    tmp_path: Path, target_url: str, sidecar_settings: Any
) -> None:
    """README: copy while the bot runs, stop the bot, copy once more. The bot amends every trade in rounds while the
    first run is under way (it starts once the first run has copied 1,000 trades), so the first run leaves stale
    trades behind; the last run must amend them and bring their audit entries, and both trails must verify."""
    source_url = _sqlite(tmp_path / "bot.db")
    trades = varied_trades(3_000, prefix="MOVE")
    bot = PersistenceSidecar(sidecar_settings(source_url))
    await bot.start()
    try:
        for trade in trades:
            bot.record_trade(trade)
        await bot.flush(timeout=30)
        copied_enough = asyncio.Event()

        def progress(table: str, done: int, _total: int) -> None:
            if table == "trades" and done >= 1_000:
                copied_enough.set()

        async def amend_in_rounds() -> None:
            await copied_enough.wait()
            for round_number in (1, 2, 3):
                for trade in trades:
                    bot.record_trade(_amended(trade, round_number))
                await bot.flush(timeout=30)

        with contextlib.suppress(CopyMismatchError):  # the source moved under the first run
            await asyncio.gather(_copy(source_url, target_url, chunk_rows=500, progress=progress), amend_in_rounds())
    finally:
        await bot.close()  # stop the bot
    stale = [
        key
        for key, trade in (await _everything(target_url))["trades"].items()
        if trade["exit_price"] != Decimal("1.00000035")
    ]
    assert stale, "the bot's amendments should have outrun the first run"

    status, out, err = await _cli("copy", "--to", target_url, cwd=tmp_path, env={"DATABASE_URL": source_url})
    assert status == 0, out + err
    assert f"{len(stale):,} amended" in out or "amended" in out
    assert await _everything(target_url) == await _everything(source_url)
    for url in (source_url, target_url):
        status, out, err = await _cli("audit", "verify", cwd=tmp_path, env={"DATABASE_URL": url})
        assert status == 0, out + err

    again = await _copy(source_url, target_url)
    assert [(entry.added, entry.amended) for entry in again.tables] == [(0, 0)] * len(TABLES)


# ---------------------------------------------------------------------------------------------- refused targets


async def _another_desks_database(url: str) -> None:
    database = create_database(make_settings(database_url=url, instance_id="other-desk"))
    try:
        await upgrade(database)
        repos = Repositories(database)
        for trade in varied_trades(5, prefix="DESK"):
            await repos.trades.save_trade(trade)
    finally:
        await database.dispose()


async def _table_counts(url: str) -> dict[str, int]:
    database = _db(url)
    try:
        return await Repositories(database).table_counts()
    finally:
        await database.dispose()


async def test_a_copy_into_a_database_holding_other_data_is_refused_before_writing_anything(
    tmp_path: Path, target_url: str
) -> None:
    await _source(tmp_path / "bot.db", 20)
    await _another_desks_database(target_url)
    before = await _table_counts(target_url)
    with pytest.raises(CopyRefusedError, match=r"not a copy of this source: trades \(5 rows\), audit_log \(5 rows\)"):
        await _copy(_sqlite(tmp_path / "bot.db"), target_url)
    assert await _table_counts(target_url) == before

    status, out, err = await _cli(
        "copy", "--to", target_url, cwd=tmp_path, env={"DATABASE_URL": _sqlite(tmp_path / "bot.db")}
    )
    assert (status, out) == (1, "") and len(err.splitlines()) == 1 and "nothing was written" in err
    assert await _table_counts(target_url) == before
    status, out, err = await _cli("audit", "verify", cwd=tmp_path, env={"DATABASE_URL": target_url})
    assert status == 0, out + err


async def test_a_copy_of_another_source_into_an_earlier_copy_is_refused_naming_where_it_came_from(
    tmp_path: Path,
) -> None:
    await _source(tmp_path / "a.db", 10)
    await _source(tmp_path / "b.db", 10)
    await _copy(_sqlite(tmp_path / "a.db"), _sqlite(tmp_path / "copy.db"))
    with pytest.raises(CopyRefusedError, match=f"copied from sqlite:{tmp_path / 'a.db'}"):
        await _copy(_sqlite(tmp_path / "b.db"), _sqlite(tmp_path / "copy.db"))


async def test_rows_are_matched_by_natural_key_not_by_id(tmp_path: Path) -> None:
    """Each database numbers its rows itself: the copy leaves the source's ids behind (here the source's are 1001 on,
    the target's 1 on), and a later run still finds its rows by natural key, amending one and adding one."""
    source_url, target_url = _sqlite(tmp_path / "bot.db"), _sqlite(tmp_path / "copy.db")
    await _source(tmp_path / "bot.db", 50)
    with sqlite3.connect(tmp_path / "bot.db") as connection:
        connection.execute("UPDATE trades SET id = id + 1000")
    await _copy(source_url, target_url)
    with sqlite3.connect(tmp_path / "copy.db") as connection:
        assert connection.execute("SELECT MIN(id), MAX(id) FROM trades").fetchone() == (1, 50)
    source = _db(source_url)
    try:
        repos = Repositories(source)
        await repos.trades.save_trade(_amended(varied_trades(50)[7], 1))
        await repos.trades.save_trade(varied_trades(1, prefix="LATER")[0])
    finally:
        await source.dispose()
    report = await _copy(source_url, target_url)
    assert {entry.table: (entry.added, entry.amended) for entry in report.tables}["trades"] == (1, 1)
    assert await _everything(target_url) == await _everything(source_url)


# ---------------------------------------------------------------------------------------------- a copy onto itself


async def test_a_copy_onto_itself_is_refused_however_the_path_is_spelled(tmp_path: Path) -> None:
    await _source(tmp_path / "bot.db", 10)
    (tmp_path / "link.db").symlink_to(tmp_path / "bot.db")
    before = (tmp_path / "bot.db").read_bytes()
    for source, target in (
        ("sqlite+aiosqlite:///bot.db", _sqlite(tmp_path / "bot.db")),  # relative and absolute
        (_sqlite(tmp_path / "bot.db"), _sqlite(tmp_path / "link.db")),  # a symlink
        (_sqlite(tmp_path / "bot.db"), _sqlite(tmp_path / "sub" / ".." / "bot.db")),
    ):
        status, out, err = await _cli("copy", "--from", source, "--to", target, cwd=tmp_path, env={})
        assert (status, out) == (1, ""), err
        assert (
            err
            == f"persistence-sidecar: the source and the target are the same database (sqlite:{tmp_path / 'bot.db'})\n"
        )
    assert (tmp_path / "bot.db").read_bytes() == before


@pytest.mark.postgres
async def test_a_copy_onto_the_same_postgresql_database_by_another_host_name_is_refused(postgres_target: str) -> None:
    database = _db(postgres_target)
    try:
        await upgrade(database)
        await record_everything(database, varied_trades(10))
    finally:
        await database.dispose()
    other = make_url(postgres_target).set(host="localhost").render_as_string(hide_password=False)
    assert other != postgres_target
    with pytest.raises(CopyRefusedError, match="the source and the target are the same database"):
        await _copy(postgres_target, other)
    assert (await _table_counts(postgres_target))["trades"] == 10


async def test_a_source_from_a_newer_release_advises_a_newer_release(tmp_path: Path) -> None:
    await _source(tmp_path / "bot.db", 5)
    with sqlite3.connect(tmp_path / "bot.db") as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(MigrationError, match="copy it with a newer release of persistence-sidecar") as refused:
        await _copy(_sqlite(tmp_path / "bot.db"), _sqlite(tmp_path / "new.db"))
    assert "migrate" not in str(refused.value)
    assert not (tmp_path / "new.db").exists()


async def test_a_missing_source_is_refused_and_not_created(tmp_path: Path) -> None:
    with pytest.raises(CopyRefusedError, match=f"the source database {tmp_path / 'typo.db'} does not exist"):
        await _copy(_sqlite(tmp_path / "typo.db"), _sqlite(tmp_path / "new.db"))
    assert not (tmp_path / "typo.db").exists() and not (tmp_path / "new.db").exists()


@pytest.mark.postgres
async def test_a_copy_to_a_postgresql_database_that_does_not_exist_is_one_line_without_resume_advice(
    tmp_path: Path, postgres_target: str
) -> None:
    await _source(tmp_path / "bot.db", 5)
    missing = make_url(postgres_target).set(database="persistence_no_such_target").render_as_string(False)
    status, out, err = await _cli(
        "copy", "--to", missing, cwd=tmp_path, env={"DATABASE_URL": _sqlite(tmp_path / "bot.db")}
    )
    assert (status, out) == (1, "")
    assert err.startswith("persistence-sidecar: the database 'persistence_no_such_target' does not exist on the server")
    assert len(err.splitlines()) == 1 and "resume" not in err


async def test_the_way_back_after_a_move_copies_into_the_database_the_source_was_copied_from(tmp_path: Path) -> None:
    """Moved from a.db to b.db, the bot ran on b.db (amending a trade, adding one); copying b.db back into a.db is
    allowed (b.db records that it is a copy of a.db) and brings a.db up to date."""
    old, new = _sqlite(tmp_path / "a.db"), _sqlite(tmp_path / "b.db")
    await _source(tmp_path / "a.db", 30)
    await _copy(old, new)
    moved = _db(new)
    try:
        repos = Repositories(moved)
        await repos.trades.save_trade(_amended(varied_trades(30)[3], 1))
        await repos.trades.save_trade(varied_trades(1, prefix="AFTER")[0])
    finally:
        await moved.dispose()
    report = await _copy(new, old)
    assert {entry.table: (entry.added, entry.amended) for entry in report.tables}["trades"] == (1, 1)
    assert await _everything(old) == await _everything(new)
    await _source(tmp_path / "c.db", 5)
    with pytest.raises(CopyRefusedError, match=r"already holds data, copied from sqlite:\S+b\.db: trades \(31 rows\)"):
        await _copy(_sqlite(tmp_path / "c.db"), old)


async def test_the_way_back_is_refused_before_writing_when_both_sides_were_written_since_the_move(
    tmp_path: Path,
) -> None:
    """Moved from a.db to b.db, but a bot kept writing to a.db as well: each side now holds history the other lacks.
    Copying b.db back into a.db would interleave two histories in a.db's trail for good, so it is refused naming the
    chain, and nothing is written; the same holds the other way, for b.db as an earlier copy of a.db."""
    old, new = _sqlite(tmp_path / "a.db"), _sqlite(tmp_path / "b.db")
    await _source(tmp_path / "a.db", 30)
    await _copy(old, new)
    for url, prefix in ((new, "ON-B"), (old, "ON-A")):
        database = _db(url)
        try:
            await Repositories(database).trades.save_trade(varied_trades(1, prefix=prefix)[0])
        finally:
            await database.dispose()
    before = await _everything(old)
    with pytest.raises(CopyRefusedError, match=r"the target was written to since it was copied: its audit chain of "):
        await _copy(new, old)
    assert await _everything(old) == before
    before = await _everything(new)
    with pytest.raises(CopyRefusedError, match=r"the source holds another one|the source has no such entry"):
        await _copy(old, new)
    assert await _everything(new) == before
