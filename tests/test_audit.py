"""The audit trail on real databases: what is audited, the chain, tampering caught by ``verify``, refusals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import signal
import sqlite3
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from sqlalchemy import insert, text
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from persistence import PersistenceSidecar
from persistence.audit.chain import (
    BASELINE_INSTANCE,
    GENESIS,
    AuditHead,
    VersionEncoder,
    canonical_json,
    canonical_time,
    canonical_version,
    chain_entries,
    entry_hash,
    header_text,
)
from persistence.audit.trail import chain_lock_key, column_kinds
from persistence.audit.verify import verify
from persistence.config import Settings
from persistence.db.columns import take_sqlite_datetime
from persistence.db.engine import Database, create_database
from persistence.db.rowcodec import DriverBatch
from persistence.db.schema import TABLE_OF, audit_log, trades
from persistence.migrations import migrate_to, upgrade
from persistence.records.models import SignalExecution, Trade
from persistence.tables.repositories import AMENDMENT_RULES, Repositories
from persistence.tools.copy import copy_database
from persistence.tools.export import export
from tests.support import (
    DatabaseLock,
    add_poison_trigger_postgres,
    add_poison_trigger_sqlite,
    sqlite_file,
    start_recorder_until_killed,
)
from tests.support.audit import audit_cli, audit_cli_in_a_subprocess, closed_version, tamper
from tests.support.databases import empty_every_table, make_settings
from tests.support.factories import make_parameter_change, make_signal, make_snapshot, make_trade, trade_data

SettingsFactory = Callable[..., Settings]
REPO_ROOT = Path(__file__).resolve().parent.parent


async def entries(database: Database, instance: str | None = None) -> list[dict[str, Any]]:
    where = "WHERE instance_id = :instance" if instance is not None else ""
    async with database.read() as connection:
        result = await connection.execute(
            text(f"SELECT instance_id, seq, entity, natural_key, payload FROM audit_log {where} ORDER BY id"),
            {"instance": instance},
        )
        return [dict(row) for row in result.mappings()]


# ---------------------------------------------------------------------------------------------- what is audited


async def test_every_version_written_is_audited_once_in_order(database: Database, repos: Repositories) -> None:
    opened = make_trade(pnl=None)
    closed = closed_version(opened)
    signal = make_signal()
    snapshot = make_snapshot()
    change = make_parameter_change()
    async with database.write() as connection:
        # Opened and closed in one batch, then a replay of the older version and of the same one: two versions.
        written = await repos.trades.upsert(connection, [opened, closed, opened, closed])
        assert [version.values["updated_at"] for version in written] == [opened.updated_at, closed.updated_at]
        await repos.signals.upsert(connection, [signal])
        execution = SignalExecution.parse(
            {"signal_id": signal.signal_id, "executed": True, "execution_status": "filled"}
        )
        assert await repos.signals.apply_executions(connection, [execution, execution]) == []
        await repos.snapshots.insert(connection, [snapshot, snapshot])
        await repos.parameters.insert(connection, [change])
    async with database.write() as connection:  # a later transaction replays everything: nothing new is written
        assert await repos.trades.upsert(connection, [opened, closed]) == []
        assert await repos.signals.upsert(connection, [signal]) == []  # unexecuted replay of an executed signal
        assert await repos.snapshots.insert(connection, [snapshot]) == []

    trail = await entries(database, database.settings.instance_id)
    assert [(entry["seq"], entry["entity"], entry["natural_key"]) for entry in trail] == [
        (1, "trade", opened.trade_id),
        (2, "trade", opened.trade_id),
        (3, "signal", signal.signal_id),
        (4, "signal", signal.signal_id),
        (5, "snapshot", snapshot.id),
        (6, "parameter_change", change.id),
    ]
    first, second = (json.loads(entry["payload"]) for entry in trail[:2])
    assert first["pnl"] is None and first["exit_time"] is None
    assert second["pnl"] == "12.50000000"  # exact decimals as strings with eight places
    assert second["updated_at"].endswith("Z") and second["entry_price"] == f"{opened.entry_price:.8f}"
    assert json.loads(trail[3]["payload"])["executed"] is True
    versions = await repos.audit.versions("trade", opened.trade_id)
    assert [entry.version["updated_at"] for entry in versions] == [first["updated_at"], second["updated_at"]]
    assert versions[0].prev_hash == GENESIS and versions[1].prev_hash == versions[0].hash
    assert (await verify(database)).ok


async def test_a_version_older_than_the_stored_one_writes_nothing_and_adds_no_entry(
    database: Database, repos: Repositories
) -> None:
    opened = make_trade()
    closed = closed_version(opened)
    async with database.write() as connection:
        await repos.trades.upsert(connection, [closed])
    async with database.write() as connection:
        assert await repos.trades.upsert(connection, [opened]) == []  # older: refused
    assert await repos.trades.get_trade_by_id(opened.trade_id) == closed
    assert len(await entries(database)) == 1
    # In one batch too, whatever the order the versions come in: the newest wins and only it is written.
    other = make_trade()
    async with database.write() as connection:
        written = await repos.trades.upsert(connection, [closed_version(other), other])
    assert [version.values["updated_at"] for version in written] == [closed_version(other).updated_at]
    assert await repos.trades.get_trade_by_id(other.trade_id) == closed_version(other)
    assert (await verify(database)).ok


async def test_writes_outside_the_writer_are_audited_too(database: Database, repos: Repositories) -> None:
    trade = make_trade()
    await repos.trades.save_trade(trade)
    assert await repos.signals.update_signal_execution("no-such-signal", True) is False
    signal = make_signal()
    await repos.signals.save_signal(signal)
    assert await repos.signals.update_signal_execution(signal.signal_id, True, "filled") is True
    await repos.snapshots.save_snapshot(make_snapshot())
    await repos.parameters.save_change(make_parameter_change())
    report = await verify(database)
    assert report.ok, report.lines()
    assert report.chains == {database.settings.instance_id: 5}
    assert report.rows == {"trades": 1, "signals": 1, "performance_snapshots": 1, "parameter_history": 1}


async def test_a_dead_lettered_record_adds_no_entry(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    if clean_database_url.startswith("sqlite"):
        database = create_database(make_settings(database_url=clean_database_url))
        await upgrade(database)
        await database.dispose()
        add_poison_trigger_sqlite(sqlite_file(clean_database_url), "T-POISON")
    else:
        await add_poison_trigger_postgres(clean_database_url, "T-POISON")
    sidecar = PersistenceSidecar(sidecar_settings(clean_database_url))
    sidecars.append(sidecar)
    await sidecar.start()
    good = [make_trade() for _ in range(5)]
    receipts = [sidecar.record_trade(trade) for trade in good[:2]]
    receipts.append(sidecar.record_trade(make_trade(trade_id="T-POISON")))
    receipts += [sidecar.record_trade(trade) for trade in good[2:]]
    await sidecar.flush()
    assert [receipt.status for receipt in receipts].count("dead_lettered") == 1
    database = sidecar.database
    assert database is not None
    assert sorted(entry["natural_key"] for entry in await entries(database)) == sorted(t.trade_id for t in good)
    assert (await verify(database)).ok


# ---------------------------------------------------------------------------------------------- tampering


async def _three_versions(database: Database, repos: Repositories) -> Trade:
    """A trade written in three versions (seq 1, 2, 3), then another trade (seq 4)."""
    trade = make_trade(trade_id="T-AUDITED")
    for version in (trade, closed_version(trade, 60, "1.5"), closed_version(trade, 120, "2.5")):
        await repos.trades.save_trade(version)
    await repos.trades.save_trade(make_trade(trade_id="T-OTHER"))
    assert (await verify(database)).ok
    return trade


async def test_a_pnl_changed_by_hand_is_caught_naming_the_trade_and_its_latest_entry(
    database: Database, repos: Repositories, database_url: str
) -> None:
    await _three_versions(database, repos)
    stored = "250000000" if database.is_sqlite else "2.5"  # SQLite keeps decimals as integers of 1e-8
    await tamper(database_url, f"UPDATE trades SET pnl = {stored} * 10 WHERE trade_id = 'T-AUDITED'")
    report = await verify(database)
    assert not report.ok and report.broken is not None
    assert (report.broken.entity, report.broken.natural_key, report.broken.seq) == ("trade", "T-AUDITED", 3)
    assert "pnl is '25.00000000', audited '2.50000000'" in report.broken.describe()


async def test_a_changed_payload_in_the_trail_is_caught_naming_the_entry(
    database: Database, repos: Repositories, database_url: str
) -> None:
    await _three_versions(database, repos)
    await tamper(
        database_url,
        'UPDATE audit_log SET payload = REPLACE(payload, \'"pnl":"1.50000000"\', \'"pnl":"9.50000000"\') WHERE seq = 2',
    )
    broken = (await verify(database)).broken
    assert broken is not None and (broken.seq, broken.natural_key) == (2, "T-AUDITED")
    assert "hash does not match" in broken.problem


async def test_a_deleted_entry_is_caught_as_a_gap(database: Database, repos: Repositories, database_url: str) -> None:
    await _three_versions(database, repos)
    await tamper(database_url, "DELETE FROM audit_log WHERE seq = 2")
    broken = (await verify(database)).broken
    assert broken is not None and broken.seq == 3 and "seq 2 missing" in broken.problem


async def test_a_swapped_pair_of_entries_is_caught(database: Database, repos: Repositories, database_url: str) -> None:
    await _three_versions(database, repos)
    await tamper(
        database_url,
        "UPDATE audit_log SET seq = -2 WHERE seq = 2",
        "UPDATE audit_log SET seq = 2 WHERE seq = 3",
        "UPDATE audit_log SET seq = 3 WHERE seq = -2",
    )
    broken = (await verify(database)).broken
    assert broken is not None and broken.seq == 2 and "does not link" in broken.problem


async def test_a_rewritten_tail_is_caught_by_the_row_it_no_longer_matches(
    database: Database, repos: Repositories, database_url: str
) -> None:
    """The newest entries deleted together: the chain is whole, but the current row is not its latest version."""
    await _three_versions(database, repos)
    await tamper(database_url, "DELETE FROM audit_log WHERE seq >= 3")
    broken = (await verify(database)).broken
    assert broken is not None and (broken.natural_key, broken.seq) == ("T-AUDITED", 2)
    assert "differs from its latest audited version" in broken.problem


async def test_a_row_inserted_or_deleted_by_hand_is_caught(
    database: Database, repos: Repositories, database_url: str
) -> None:
    await _three_versions(database, repos)
    await tamper(database_url, "DELETE FROM trades WHERE trade_id = 'T-OTHER'")
    broken = (await verify(database)).broken
    assert broken is not None and broken.natural_key == "T-OTHER" and "deleted" in broken.problem


async def test_a_verify_of_one_instance_checks_its_chain_and_rows_only(database: Database, database_url: str) -> None:
    mine = Repositories(database)
    await mine.trades.save_trade(make_trade())
    other_settings = make_settings(database_url=database_url, instance_id="bot-b")
    other_db = create_database(other_settings)
    try:
        await Repositories(other_db).trades.save_trade(make_trade(trade_id="T-B"))
        await tamper(database_url, "UPDATE trades SET symbol = 'GBPUSD' WHERE trade_id = 'T-B'")
        assert (await verify(database, instance_id=database.settings.instance_id)).ok
        broken = (await verify(database, instance_id="bot-b")).broken
        assert broken is not None and broken.natural_key == "T-B" and broken.instance_id == "bot-b"
    finally:
        await other_db.dispose()


# ---------------------------------------------------------------------------------------------- refusals


async def test_the_database_refuses_update_and_delete_on_the_trail(database: Database, repos: Repositories) -> None:
    await repos.trades.save_trade(make_trade())
    for statement in ("UPDATE audit_log SET natural_key = 'x'", "DELETE FROM audit_log"):
        with pytest.raises(DBAPIError, match="append-only"):
            async with database.write() as connection:
                await connection.execute(text(statement))
    if database.dialect_name == "postgresql":
        with pytest.raises(DBAPIError, match="append-only"):
            async with database.write() as connection:
                await connection.execute(text("TRUNCATE audit_log"))
    assert len(await entries(database)) == 1


# ---------------------------------------------------------------------------------------------- chains over time


async def test_the_chain_continues_across_restarts_and_a_journal_replay_after_an_outage(
    clean_database_url: str, sidecar_settings: SettingsFactory
) -> None:
    settings = sidecar_settings(clean_database_url, instance_id="bot-restarts")
    trades = [make_trade() for _ in range(6)]
    async with PersistenceSidecar(settings) as sidecar:
        for trade in trades[:3]:
            sidecar.record_trade(trade)
        await sidecar.flush()
    # The database locked for a whole run: every record is journaled, then replayed by the next start.
    lock = DatabaseLock(clean_database_url)
    await lock.acquire()
    try:
        sidecar = PersistenceSidecar(settings)
        await sidecar.start()
        receipts = [sidecar.record_trade(closed_version(trade)) for trade in trades]
        await sidecar.close(timeout=0.5)
        assert {receipt.status for receipt in receipts} == {"journaled"}
    finally:
        await lock.release()
    async with PersistenceSidecar(settings) as sidecar:
        await sidecar.flush()
        database = sidecar.database
        assert database is not None
        trail = await entries(database, "bot-restarts")
        assert [entry["seq"] for entry in trail] == list(range(1, 10))
        assert (await verify(database)).ok


async def test_batches_begun_ahead_while_others_commit_leave_a_trail_that_verifies(
    clean_database_url: str, sidecar_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many batches recorded at once, amendments among them: on PostgreSQL a batch's transaction is begun while the
    one before commits (its new rows claimed), and the trail must still be the one a batch written in place writes."""
    from persistence.tables.ahead import AheadTransactions

    continued: list[object] = []
    take = AheadTransactions.take

    async def counted(self: AheadTransactions, parts: Any) -> Any:
        held = await take(self, parts)
        if held is not None:
            continued.append(held)
        return held

    monkeypatch.setattr(AheadTransactions, "take", counted)
    settings = sidecar_settings(clean_database_url, instance_id="bot-ahead", batch_size=100)
    opened = [make_trade() for _ in range(450)]
    closed = [closed_version(trade) for trade in opened[:150]]
    async with PersistenceSidecar(settings) as sidecar:
        receipts = [sidecar.record_trade(trade) for trade in [*opened, *closed]]
        assert set(await asyncio.gather(*receipts)) == {"persisted"}
        database = sidecar.database
        assert database is not None
        for trade in [*closed, *opened[150:]]:
            assert await sidecar.trades.get_trade_by_id(trade.trade_id) == trade
        trail = await entries(database, "bot-ahead")
        assert [entry["seq"] for entry in trail] == list(range(1, 601))
        fields = tuple(Trade.model_fields)
        by_key: dict[str, list[str]] = {}
        for entry in trail:
            by_key.setdefault(entry["natural_key"], []).append(entry["payload"])
        for trade in opened[150:]:
            assert by_key[trade.trade_id] == [canonical_version(trade.__dict__, fields)]
        for first, last in zip(opened[:150], closed, strict=True):
            assert by_key[first.trade_id] == [canonical_version(version.__dict__, fields) for version in (first, last)]
        assert (await verify(database)).ok
    if not settings.is_sqlite:
        assert continued  # the batches were begun ahead: this test saw that path


async def test_instances_sharing_one_database_keep_their_own_chains_and_the_newest_version_wins(
    postgres_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    """Three orchestrators on one PostgreSQL database, two of them sharing an instance id, all writing the same ids."""
    database = create_database(make_settings(database_url=postgres_url))
    await upgrade(database)
    async with database.write() as connection:
        await empty_every_table(connection)
    names = ["bot-a", "bot-b", "bot-b"]
    base = [make_trade(trade_id=f"T-SHARED-{i}") for i in range(200)]
    sidecars = [
        PersistenceSidecar(
            sidecar_settings(postgres_url, instance_id=name, journal_dir=tmp_path / f"journal-{index}", batch_size=37)
        )
        for index, name in enumerate(names)
    ]

    async def run(index: int, sidecar: PersistenceSidecar) -> None:
        await sidecar.start()
        sidecar.record_trade(make_trade(trade_id=f"T-OWN-{index}"))
        for round_ in range(3):
            for i, trade in enumerate(base):
                # Each writes its own versions of every trade, at times that interleave with the others'.
                seconds = 10 * (round_ * 3 + index) + 1
                sidecar.record_trade(closed_version(trade, seconds, f"{index}.{round_}{i % 10}"))
            await asyncio.sleep(0)
        await sidecar.flush()
        await sidecar.close()

    try:
        await asyncio.gather(*(run(index, sidecar) for index, sidecar in enumerate(sidecars)))
        report = await verify(database)
        assert report.ok, report.lines()
        assert set(report.chains) == {"bot-a", "bot-b"}
        newest = 10 * (2 * 3 + 2) + 1  # the last round of the third sidecar
        async with database.read() as connection:
            statement = text("SELECT trade_id, updated_at, instance_id FROM trades WHERE trade_id LIKE 'T-SHARED-%'")
            rows = (await connection.execute(statement)).all()
        assert len(rows) == len(base)
        original = {trade.trade_id: trade.updated_at for trade in base}
        assert {row[1] - original[row[0]] for row in rows} == {timedelta(seconds=newest)}
        assert {row[2] for row in rows} == {"bot-b"}
    finally:
        await database.dispose()


async def test_the_chain_lock_is_per_instance() -> None:
    assert chain_lock_key("bot-a") != chain_lock_key("bot-b")
    assert chain_lock_key("bot-a") == chain_lock_key("bot-a")
    assert -(2**63) <= chain_lock_key("bot-a") < 2**63


# ---------------------------------------------------------------------------------------------- migration


async def test_rows_written_before_the_trail_get_a_baseline_chain(fresh_url: str) -> None:
    database = create_database(make_settings(database_url=fresh_url))
    try:
        await upgrade(database)
        repos = Repositories(database)
        kept = [make_trade(pnl=f"-{i}.5") for i in range(7)]
        async with database.write() as connection:
            await repos.trades.upsert(connection, kept)
            await repos.signals.upsert(connection, [make_signal()])
        await migrate_to(database, "0002", force=True)  # the rows stay; the trail and instance_id go
        await upgrade(database)
        trail = await entries(database)
        assert {entry["instance_id"] for entry in trail} == {BASELINE_INSTANCE}
        assert [entry["seq"] for entry in trail] == list(range(1, 9))
        payloads = {entry["natural_key"]: entry["payload"] for entry in trail}
        for trade in kept:
            assert payloads[trade.trade_id] == canonical_version(trade.__dict__, tuple(Trade.model_fields))
        report = await verify(database)
        assert report.ok, report.lines()
        # The next version of a baseline row is this instance's, and verify still holds.
        await Repositories(database).trades.save_trade(closed_version(kept[0]))
        assert (await verify(database)).ok
    finally:
        await database.dispose()


# ---------------------------------------------------------------------------------------------- crashes, the CLI


def test_a_kill_9_mid_stream_leaves_chains_that_verify_and_miss_nothing(fresh_url: str, tmp_path: Path) -> None:
    """kill -9 of a child writing trades (every third closed later): no gap, no fork, every persisted one audited."""
    journal = tmp_path / "journal"
    child = start_recorder_until_killed(fresh_url, str(journal), "versions")
    assert child.stdout is not None
    acknowledged = [child.stdout.readline().strip() for _ in range(600)]
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()
    checked = audit_cli(fresh_url, "verify")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip().endswith("audit trail verified")

    async def restart_and_read() -> tuple[set[str], set[str]]:
        settings = make_settings(database_url=fresh_url, journal_dir=journal)
        async with PersistenceSidecar(settings, log_events=False) as sidecar:  # replays what the journal kept
            await sidecar.flush()
            database = sidecar.database
            assert database is not None
            async with database.read() as connection:
                rows = set((await connection.execute(text("SELECT trade_id FROM trades"))).scalars())
                audited = text("SELECT DISTINCT natural_key FROM audit_log WHERE entity = 'trade'")
                keys = set((await connection.execute(audited)).scalars())
        return rows, keys

    rows, audited = asyncio.run(restart_and_read())
    assert set(acknowledged) <= rows
    assert rows == audited
    again = audit_cli(fresh_url, "verify")
    assert again.returncode == 0, again.stdout + again.stderr


def test_the_audit_commands_report_a_broken_entry_and_list_versions(sqlite_url: str) -> None:
    async def prepare() -> None:
        database = create_database(make_settings(database_url=sqlite_url, instance_id="desk-1"))
        try:
            await upgrade(database)
            await _three_versions(database, Repositories(database))
        finally:
            await database.dispose()

    asyncio.run(prepare())
    listed = audit_cli_in_a_subprocess(sqlite_url, "versions", "trade", "T-AUDITED")
    assert listed.returncode == 0, listed.stderr
    versions = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [version["seq"] for version in versions] == [1, 2, 3]
    assert [version["version"]["pnl"] for version in versions] == [None, "1.50000000", "2.50000000"]
    good = audit_cli(sqlite_url, "verify")
    assert good.returncode == 0 and "chain desk-1: 4 entries, head " in good.stdout
    assert good.stderr == ""  # no progress bar off a terminal
    asyncio.run(tamper(sqlite_url, "UPDATE trades SET pnl = pnl + 1 WHERE trade_id = 'T-AUDITED'"))
    broken = audit_cli(sqlite_url, "verify")
    assert broken.returncode == 1
    assert "BROKEN: entry seq 3 of instance 'desk-1', trade 'T-AUDITED': the trades row differs" in broken.stdout
    assert "pnl is '2.50000001', audited '2.50000000'" in broken.stdout
    assert audit_cli(sqlite_url, "versions", "trade", "T-NONE").returncode == 1


def test_the_audit_commands_refuse_a_database_from_before_the_trail(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"

    async def prepare() -> None:
        database = create_database(make_settings(database_url=url))
        try:
            await upgrade(database, "0002")
        finally:
            await database.dispose()

    asyncio.run(prepare())
    refused = audit_cli(url, "verify")
    assert refused.returncode == 2
    assert "schema revision 0002, before the audit trail; run `persistence-sidecar migrate`" in refused.stderr


def test_a_database_at_an_older_revision_with_the_trail_is_verified_and_an_unknown_one_is_refused(
    tmp_path: Path,
) -> None:
    """The trail exists since 0003: a database a later migration has not reached yet is still audited, while a
    revision this release does not know is refused with advice that works (a newer release)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'older.db'}"

    async def prepare() -> None:
        database = create_database(make_settings(database_url=url))
        try:
            await upgrade(database, "0003")
        finally:
            await database.dispose()

    asyncio.run(prepare())
    checked = audit_cli(url, "verify")
    assert checked.returncode == 0, checked.stderr
    with sqlite3.connect(tmp_path / "older.db") as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'f00dfeed9999'")
    refused = audit_cli(url, "verify")
    assert refused.returncode == 2
    assert "f00dfeed9999" in refused.stderr and "newer release" in refused.stderr


# ---------------------------------------------------------------------------------------------- canonical form


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"pnl": None, "exit_time": None, "exit_price": None, "session": None, "pattern_type": None},
        {"pnl": Decimal("-0.00000001"), "pattern_type": 'quote " backslash \\ tab \t é € 😀'},
        {"pnl": Decimal("9999999999.99999999"), "position_size": Decimal("0.00000001")},
        # Decimals without exactly eight places (unvalidated): the encoder's str() shortcut must not take them.
        {"pnl": Decimal("1.2345E-10"), "stop_loss": Decimal("1.5"), "take_profit": Decimal("-0E-8")},
        {"pnl": Decimal("1.2345E+3"), "stop_loss": Decimal("123456.1234567"), "take_profit": Decimal("0E-16")},
        {"entry_time": datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(hours=2)))},
        {
            "entry_time": datetime(1, 1, 1, tzinfo=UTC),
            "created_at": datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        },
    ],
)
def test_the_fast_encoder_writes_exactly_the_canonical_json(overrides: dict[str, Any]) -> None:
    trade = make_trade()
    values = {**trade.__dict__, **overrides}  # values as records or drivers hand them over, unvalidated here
    fields = tuple(Trade.model_fields)
    fast = VersionEncoder(fields, column_kinds(TABLE_OF["trade"])).encode(values)
    assert fast == canonical_version(values, fields)
    assert list(json.loads(fast)) == sorted(fields) and fast.isascii()
    for record in (make_signal(), make_snapshot(), make_parameter_change()):
        names = tuple(type(record).model_fields)
        encoder = VersionEncoder(names, column_kinds(TABLE_OF[record.entity]))
        assert encoder.encode(record.__dict__) == canonical_version(record.__dict__, names)


def test_the_fast_encoder_ignores_the_hosts_decimal_context() -> None:
    """str() of a decimal follows the thread's context (a lower-case exponent with ``capitals=0``)."""
    values = {**make_trade().__dict__, "pnl": Decimal("1.2345E-10"), "stop_loss": Decimal("0.00000001")}
    fields = tuple(Trade.model_fields)
    encoder = VersionEncoder(fields, column_kinds(TABLE_OF["trade"]))
    with localcontext() as context:
        context.capitals = 0
        context.prec = 3
        assert encoder.encode(values) == canonical_version(values, fields)
    assert json.loads(encoder.encode(values))["pnl"] == "0.00000000"


def test_a_payload_takes_the_timestamps_the_row_encoding_kept() -> None:
    """On SQLite the row's stored text of a timestamp is kept for the version's payload: the same text with T, Z."""
    trade = make_trade(entry_time=datetime(2026, 3, 29, 1, 30, 0, 7, tzinfo=UTC))
    row = {**trade.__dict__, "instance_id": "desk-1"}
    batch = DriverBatch(insert(trades), trades, sqlite_dialect.dialect(paramstyle="qmark"))
    fields = tuple(Trade.model_fields)
    encoder = VersionEncoder(fields, column_kinds(TABLE_OF["trade"]))
    (encoded,) = batch.encode([row])
    assert "2026-03-29 01:30:00.000007" in encoded
    assert take_sqlite_datetime(trade.entry_time) == "2026-03-29 01:30:00.000007"
    assert take_sqlite_datetime(trade.entry_time) is None  # taken once
    batch.encode([row])
    assert encoder.encode(row) == canonical_version(row, fields)
    assert take_sqlite_datetime(trade.created_at) is None  # the payload took it
    # Only UTC values are kept: equal times in another zone may differ by their fold, not their instant.
    local = datetime(2026, 10, 25, 2, 30, tzinfo=ZoneInfo("Europe/Berlin"), fold=1)
    batch.encode([{**row, "exit_time": local}])
    assert take_sqlite_datetime(local) is None
    later = {**row, "exit_time": local.replace(fold=0)}
    assert encoder.encode(later) == canonical_version(later, fields)


def test_the_header_text_is_the_canonical_json_of_the_header() -> None:
    at = datetime(2026, 12, 2, 10, 0, 0, 5, tzinfo=UTC)
    for instance, key in (("desk-1", "T-1"), ('d"sk\\1', "T/é\n"), ("pre-audit", "x" * 64)):
        header = {
            "instance_id": instance,
            "seq": 42,
            "entity": "trade",
            "natural_key": key,
            "recorded_at": canonical_time(at),
        }
        assert header_text(instance, 42, "trade", key, canonical_time(at)) == canonical_json(header)
    assert canonical_time(at) == "2026-12-02T10:00:00.000005Z"
    assert (
        canonical_time(datetime(2026, 12, 2, 12, tzinfo=timezone(timedelta(hours=2)))) == "2026-12-02T10:00:00.000000Z"
    )


def test_chain_entries_hash_each_entry_as_entry_hash_of_its_header_text() -> None:
    """chain_entries writes the hashed text in one piece; verify recomputes it with entry_hash and header_text."""
    at = datetime(2026, 12, 2, 10, 0, 0, 5, tzinfo=UTC)
    versions = [("trade", "T-1", '{"a":1}'), ("signal", 'S"\\é\n', '{"b":"\\u00e9"}'), ("trade", "T-2", "{}")]
    for head in (None, AuditHead('d"sk\\1', 41, "ab" * 32)):
        instance = head.instance_id if head is not None else "desk-1"
        rows = chain_entries(head, instance, versions, at)
        previous = head.hash if head is not None else GENESIS
        for seq, (row, (entity, key, payload)) in enumerate(zip(rows, versions, strict=True), start=rows[0]["seq"]):
            header = header_text(instance, seq, entity, key, canonical_time(at))
            assert (row["seq"], row["prev_hash"]) == (seq, previous)
            assert row["hash"] == entry_hash(previous, header, payload)
            previous = row["hash"]
        assert rows[0]["seq"] == (head.seq + 1 if head is not None else 1)


async def _fill(database: Database, count: int) -> None:
    repos = Repositories(database)
    for start in range(0, count, 2000):
        async with database.write() as connection:
            await repos.trades.upsert(
                connection, [make_trade(trade_id=f"M-{i:07d}") for i in range(start, start + 2000)]
            )


async def test_verify_streams_its_memory_does_not_grow_with_the_trail(tmp_path: Path) -> None:
    """Peak memory of a verify over 24,000 entries is that of one over 6,000: it holds a chunk at a time."""
    peaks: list[int] = []
    for count in (6_000, 24_000):
        database = create_database(make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / f'{count}.db'}"))
        try:
            await upgrade(database)
            await _fill(database, count)
            tracemalloc.start()
            report = await verify(database, chunk=500)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            assert report.ok and report.rows["trades"] == count and sum(report.chains.values()) == count
        finally:
            await database.dispose()
    assert peaks[1] < peaks[0] * 1.3, peaks


def test_audit_verify_shows_a_progress_bar_on_a_terminal_and_prints_only_the_report(sqlite_url: str) -> None:
    async def prepare() -> None:
        database = create_database(make_settings(database_url=sqlite_url))
        try:
            await upgrade(database)
            await _fill(database, 6_000)
        finally:
            await database.dispose()

    asyncio.run(prepare())
    controller, terminal = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DATABASE_URL": sqlite_url}
    with subprocess.Popen(
        [sys.executable, "-m", "persistence", "audit", "verify"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    ) as child:
        os.close(terminal)
        stdout, _ = child.communicate(timeout=120)
    drawn = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(controller, 65536):
            drawn += chunk
    os.close(controller)
    assert child.returncode == 0
    assert b"audit verify [" in drawn and b"rows/s" in drawn
    assert stdout.splitlines()[-1] == "audit trail verified" and "\r" not in stdout


async def test_a_copied_database_keeps_a_trail_that_verifies_and_is_caught_when_edited(
    sqlite_url: str, fresh_url: str
) -> None:
    source = create_database(make_settings(database_url=sqlite_url, instance_id="desk-1"))
    target = create_database(make_settings(database_url=fresh_url))
    try:
        await upgrade(source)
        await _three_versions(source, Repositories(source))
        report = await copy_database(source, target, rules=AMENDMENT_RULES, chunk_rows=2)
        assert report.mismatched == []
        copied = await verify(target)
        assert copied.ok, copied.lines()
        assert copied.heads == (await verify(source)).heads  # the same chain, hash for hash
        assert [entry.seq for entry in await Repositories(target).audit.versions("trade", "T-AUDITED")] == [1, 2, 3]
        await tamper(fresh_url, "UPDATE trades SET symbol = 'GBPUSD' WHERE trade_id = 'T-OTHER'")
        broken = (await verify(target)).broken
        assert broken is not None and broken.natural_key == "T-OTHER"
    finally:
        await source.dispose()
        await target.dispose()


# ---------------------------------------------------------------------------------------------- found in review


async def test_a_negative_zero_is_stored_audited_and_verified_as_zero(database: Database, repos: Repositories) -> None:
    """round(-0.001, 2) is -0.0: no database keeps the sign of a zero, so neither does the record (nor its entry)."""
    trade = Trade.parse({**trade_data(), "pnl": -0.0, "pnl_percentage": Decimal("-0"), "confidence_score": "-0.000"})
    assert str(trade.pnl) == str(trade.pnl_percentage) == str(trade.confidence_score) == "0E-8"
    await repos.trades.save_trade(trade)
    assert json.loads((await repos.audit.versions("trade", trade.trade_id))[0].payload)["pnl"] == "0.00000000"
    report = await verify(database)
    assert report.ok, report.lines()


async def test_an_entry_moved_to_a_later_id_is_caught(
    database: Database, repos: Repositories, database_url: str
) -> None:
    """The id orders a key's versions across chains: rolling a row back by giving its older entry a later id fails."""
    trade = make_trade(trade_id="T-MOVED")
    await repos.trades.save_trade(trade)
    await repos.trades.save_trade(closed_version(trade, 60, "-500"))
    await tamper(
        database_url,
        "UPDATE audit_log SET id = 1000 WHERE seq = 1",
        "UPDATE trades SET pnl = NULL, exit_time = NULL, exit_price = NULL, updated_at = created_at "
        "WHERE trade_id = 'T-MOVED'",
    )
    broken = (await verify(database)).broken
    assert broken is not None and broken.seq == 2 and "the entry was moved" in broken.problem


async def test_garbage_written_by_hand_is_reported_not_crashed_on(sqlite_url: str) -> None:
    database = create_database(make_settings(database_url=sqlite_url))
    try:
        await upgrade(database)
        repos = Repositories(database)
        await repos.trades.save_trade(make_trade(trade_id="T-1"))
        await repos.trades.save_trade(make_trade(trade_id="T-2"))
        await tamper(sqlite_url, "UPDATE trades SET entry_time = 'yesterday' WHERE trade_id = 'T-2'")
        broken = (await verify(database)).broken
        assert broken is not None and broken.natural_key == "T-2" and "cannot be read" in broken.problem
        await tamper(sqlite_url, "UPDATE audit_log SET payload = REPLACE(payload, 'EURUSD', 'EURUSDé') WHERE seq = 1")
        broken = (await verify(database)).broken
        assert broken is not None and broken.seq == 1 and "hash does not match" in broken.problem
    finally:
        await database.dispose()


async def test_verify_reads_only_the_newest_entry_of_each_key(tmp_path: Path) -> None:
    """Ten versions of each trade cost verify no more memory than one: it never loads a key's older entries (ten
    times the entries held would be far past the 1.5 bound)."""
    peaks: list[int] = []
    for versions in (1, 10):
        database = create_database(make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / f'{versions}.db'}"))
        try:
            await upgrade(database)
            repos = Repositories(database)
            base = [make_trade(trade_id=f"V-{i:05d}") for i in range(1000)]
            for n in range(versions):
                async with database.write() as connection:
                    await repos.trades.upsert(connection, [closed_version(trade, n + 1, f"{n}.5") for trade in base])
            tracemalloc.start()
            report = await verify(database, chunk=1000)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            assert report.ok and sum(report.chains.values()) == 1000 * versions
        finally:
            await database.dispose()
    assert peaks[1] < peaks[0] * 1.5, peaks


async def test_two_instances_claiming_overlapping_new_keys_in_opposite_orders_queue_not_deadlock(
    postgres_url: str,
) -> None:
    """Batches [K1, K3, K2] and [K2, K1]: claims go in key order, so the second waits for the first; no deadlock."""
    first = create_database(make_settings(database_url=postgres_url, instance_id="desk-a"))
    second = create_database(make_settings(database_url=postgres_url, instance_id="desk-b"))
    await upgrade(first)
    async with first.write() as connection:
        await empty_every_table(connection)
    url = make_url(postgres_url)
    blocker = await asyncpg.connect(host=url.host, port=url.port or 5432, user=url.username, database=url.database)
    try:
        holding = blocker.transaction()
        await holding.start()  # an uncommitted K3 makes the first writer wait in the middle of its claim
        await blocker.execute(
            "INSERT INTO trades (trade_id, symbol, direction, entry_time, entry_price, position_size, created_at, "
            "updated_at) VALUES ('K3', 'X', 'BUY', now(), 1, 1, now(), now())"
        )

        async def write(database: Database, keys: list[str], delay: float) -> None:
            await asyncio.sleep(delay)
            async with database.write() as connection:
                await Repositories(database).trades.upsert(connection, [make_trade(trade_id=key) for key in keys])

        writers = [
            asyncio.create_task(write(first, ["K1", "K3", "K2"], 0)),
            asyncio.create_task(write(second, ["K2", "K1"], 0.3)),
        ]
        await asyncio.sleep(0.8)
        await holding.rollback()
        await asyncio.wait_for(asyncio.gather(*writers), 10)  # a deadlock would raise here
        report = await verify(first)
        assert report.ok, report.lines()
        assert set(report.chains) == {"desk-a", "desk-b"}
    finally:
        await blocker.close()
        await first.dispose()
        await second.dispose()


async def test_the_trail_exports_with_its_filters(sqlite_url: str, tmp_path: Path) -> None:
    database = create_database(make_settings(database_url=sqlite_url, instance_id="desk-1"))
    try:
        await upgrade(database)
        repos = Repositories(database)
        trade = await _three_versions(database, repos)
        await repos.signals.save_signal(make_signal())
        everything = await export(database, "audit", tmp_path / "audit.jsonl", "jsonl")
        assert everything.rows == 5
        lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        assert [line["seq"] for line in lines] == [1, 2, 3, 4, 5]
        assert set(lines[0]) == {column.name for column in audit_log.c}
        assert lines[0]["hash"] == lines[1]["prev_hash"] and lines[0]["prev_hash"] == GENESIS
        only = await export(database, "audit", tmp_path / "trades.jsonl", "jsonl", record="trade", instance_id="desk-1")
        assert only.rows == 4
        assert (await export(database, "audit", tmp_path / "none.jsonl", "jsonl", instance_id="desk-2")).rows == 0
        versions = [json.loads(line) for line in (tmp_path / "trades.jsonl").read_text().splitlines()]
        assert [json.loads(line["payload"])["trade_id"] for line in versions[:3]] == [trade.trade_id] * 3
    finally:
        await database.dispose()


def test_export_audit_on_the_command_line_filters_by_record_and_instance(sqlite_url: str, tmp_path: Path) -> None:
    async def prepare() -> None:
        database = create_database(make_settings(database_url=sqlite_url, instance_id="desk-1"))
        try:
            await upgrade(database)
            repos = Repositories(database)
            await _three_versions(database, repos)
            await repos.signals.save_signal(make_signal())
        finally:
            await database.dispose()

    asyncio.run(prepare())
    output = tmp_path / "trail.csv"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DATABASE_URL": sqlite_url}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "persistence",
            "export",
            "audit",
            "--output",
            str(output),
            "--entity",
            "trade",
            "--instance-id",
            "desk-1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"exported 4 audit to {output} (csv, ")
    assert len(output.read_text().splitlines()) == 1 + 4
