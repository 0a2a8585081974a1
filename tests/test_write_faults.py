"""Write-path guarantees under real faults: locks, a full disk, poison rows, vanished files, kill -9, long outages."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from persistence import DeadLetteredError, PersistenceSidecar, RecordDroppedError
from persistence.config import Settings
from persistence.db.engine import Database
from persistence.observe.events import (
    BatchCommitted,
    BreakerChanged,
    EventBus,
    JournalFailed,
    JournalSpilled,
    RecordDeadLettered,
    RecordsDropped,
    WriteFailed,
)
from persistence.testing import FakeClock
from persistence.write.journal import Journal
from tests.support import (
    DatabaseLock,
    DiskLimit,
    Recorder,
    StatementCounter,
    add_poison_trigger_postgres,
    add_poison_trigger_sqlite,
    eventually,
    sqlite_file,
    start_recorder_until_killed,
)
from tests.support.factories import make_signal, make_trade
from tests.support.sidecars import build, stored_trade_ids

REPO_ROOT = Path(__file__).resolve().parent.parent
SettingsFactory = Callable[..., Settings]


def transitions(events: Recorder) -> list[tuple[str, str]]:
    return [(event.from_state, event.to_state) for event in events.of(BreakerChanged)]


# ------------------------------------------------------------------------------ (a) breaker and backfill


async def test_breaker_opens_after_five_failures_no_calls_while_open_then_backfills_exactly_once(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    clock = FakeClock()
    sidecar = build(sidecar_settings(clean_database_url), sidecars, clock=clock)
    events = Recorder(sidecar.events)
    await sidecar.start()
    assert await sidecar.record_trade(make_trade()) == "persisted"
    lock = DatabaseLock(clean_database_url)
    await lock.acquire()
    try:
        outage = [sidecar.record_trade(make_trade())]
        await eventually(lambda: sidecar.breaker_state == "open")
        failed_attempts = [event for event in events.of(WriteFailed) if event.records]
        assert len(failed_attempts) == 5
        assert transitions(events) == [("closed", "open")]

        assert sidecar.database is not None
        calls = StatementCounter(sidecar.database)
        outage += [sidecar.record_trade(make_trade()) for _ in range(200)]
        closing = make_trade()
        outage.append(sidecar.record_trade(closing))
        outage.append(sidecar.record_trade({**closing.to_json(), "pnl": "-7.25", "updated_at": None}))
        await asyncio.sleep(0.3)
        clock.advance(29.9)
        await asyncio.sleep(0.2)
        assert sidecar.breaker_state == "open"
        assert calls.count == 0, "a database call was made while the breaker was open"
        assert len(sidecar.trade_history) == 1 + 1 + 200 + 1
    finally:
        await lock.release()
    clock.advance(0.1)
    await sidecar.flush(timeout=15)
    assert transitions(events) == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    ids = await stored_trade_ids(sidecar)
    assert len(ids) == len(set(ids)) == 203
    assert {receipt.key for receipt in outage} <= set(ids)
    assert all(receipt.status == "persisted" for receipt in outage)
    stored = await sidecar.trades.get_trade_by_id(closing.trade_id)
    assert stored is not None and str(stored.pnl) == "-7.25000000"


# ------------------------------------------------------------------------------ (b) poison record


async def test_a_poison_record_among_100_is_dead_lettered_the_rest_commit_and_the_breaker_stays_closed(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(clean_database_url), sidecars)
    events = Recorder(sidecar.events)
    await sidecar.start()
    if clean_database_url.startswith("sqlite"):
        add_poison_trigger_sqlite(sqlite_file(clean_database_url), "POISON-42")
    else:
        await add_poison_trigger_postgres(clean_database_url, "POISON-42")
    receipts = [
        sidecar.record_trade(make_trade(trade_id="POISON-42" if i == 42 else f"OK-{i:03d}")) for i in range(100)
    ]
    await sidecar.flush(timeout=15)
    ids = await stored_trade_ids(sidecar)
    assert len(ids) == 99 and "POISON-42" not in ids
    [letter] = await sidecar.dead_letters.list()
    assert letter.natural_key == "POISON-42" and letter.entity == "trade"
    assert "poison record refused by trigger" in letter.error
    assert letter.payload["trade_id"] == "POISON-42"
    with pytest.raises(DeadLetteredError):
        await receipts[42]
    assert [r.status for i, r in enumerate(receipts) if i != 42] == ["persisted"] * 99
    assert sidecar.breaker_state == "closed" and transitions(events) == []
    assert [event.key for event in events.of(RecordDeadLettered)] == ["POISON-42"]
    assert sidecar.writer is not None and sidecar.writer.breaker.consecutive_failures == 0
    assert await sidecar.record_trade(make_trade()) == "persisted"  # the writer is alive


async def test_a_data_error_never_trips_the_breaker(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url, breaker_failure_threshold=1), sidecars)
    events = Recorder(sidecar.events)
    await sidecar.start()
    add_poison_trigger_sqlite(sqlite_file(sqlite_url), "POISON")
    for _ in range(3):
        with pytest.raises(DeadLetteredError):
            await sidecar.record_trade(make_trade(trade_id="POISON"))
    assert sidecar.breaker_state == "closed" and transitions(events) == []


async def test_a_data_error_in_the_half_open_probe_neither_closes_nor_reopens_the_breaker(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    clock = FakeClock()
    sidecar = build(sidecar_settings(sqlite_url, breaker_failure_threshold=1), sidecars, clock=clock)
    events = Recorder(sidecar.events)
    await sidecar.start()
    add_poison_trigger_sqlite(sqlite_file(sqlite_url), "POISON")
    async with DatabaseLock(sqlite_url):
        poison = sidecar.record_trade(make_trade(trade_id="POISON"))
        await eventually(lambda: sidecar.breaker_state == "open")
    clock.advance(30)
    with pytest.raises(DeadLetteredError):
        await asyncio.wait_for(poison, 10)
    # The probe met a data error: no reset (still half-open) and no trip (not open again).
    assert sidecar.breaker_state == "half_open"
    assert transitions(events) == [("closed", "open"), ("open", "half_open")]
    assert await asyncio.wait_for(sidecar.record_trade(make_trade()), 10) == "persisted"
    assert transitions(events)[-1] == ("half_open", "closed")


# ------------------------------------------------------------------------------ (c) close during an outage


async def test_close_during_an_outage_returns_in_time_journals_the_backlog_and_a_new_sidecar_writes_it(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any], tmp_path: Path
) -> None:
    settings = sidecar_settings(sqlite_url, shutdown_timeout=1.5)
    sidecar = build(settings, sidecars)
    await sidecar.start()
    async with DatabaseLock(sqlite_url):
        recorded = [sidecar.record_trade(make_trade()) for _ in range(300)]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await sidecar.close()
        elapsed = time.monotonic() - started
        assert elapsed < 1.5 + 0.5, f"close() took {elapsed:.2f} s"
        assert Journal(tmp_path / "journal").pending == 300
        assert {r.status for r in recorded} == {"journaled"}
    async with PersistenceSidecar(settings) as restarted:
        ids = await stored_trade_ids(restarted)
        assert restarted.health().journal == 0
    assert sorted(ids) == sorted(r.key for r in recorded)


async def test_close_waits_for_the_pool_to_close_past_its_reserve_before_it_returns(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing the pool can take longer than the slice of the shutdown timeout kept for it (closing SQLite's last
    connection checkpoints its write-ahead log): ``close()`` waits for it, and says so in the log, instead of
    returning with connections still closing in their threads, to answer later on a loop that may be closed."""
    dispose = Database.dispose
    done: list[str] = []

    async def slow(self: Database) -> None:
        await asyncio.sleep(0.3)  # longer than the 0.1 s kept for it by a 0.4 s shutdown timeout
        await dispose(self)
        done.append("disposed")

    monkeypatch.setattr(Database, "dispose", slow)
    sidecar = build(sidecar_settings(sqlite_url, shutdown_timeout=0.4), sidecars)
    await sidecar.start()
    assert await sidecar.record_trade(make_trade()) == "persisted"
    with capture_logs() as logs:
        await sidecar.close()
    assert done == ["disposed"]
    assert any(entry["event"] == "database_close_slow" for entry in logs)


# ------------------------------------------------------------------------------ (d) kill -9


def test_kill_9_loses_nothing_whose_receipt_had_resolved(tmp_path: Path) -> None:
    database = tmp_path / "crash.db"
    child = start_recorder_until_killed(f"sqlite+aiosqlite:///{database}", str(tmp_path / "journal"))
    assert child.stdout is not None
    acknowledged: list[str] = []
    deadline = time.monotonic() + 60
    while len(acknowledged) < 500 and time.monotonic() < deadline:
        acknowledged.append(child.stdout.readline().strip())
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert len(acknowledged) == 500
    with sqlite3.connect(database) as connection:
        stored = {row[0] for row in connection.execute("SELECT trade_id FROM trades")}
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    missing = [key for key in acknowledged if key not in stored]
    assert missing == []


# ------------------------------------------------------------------------------ (e) long outage


@pytest.mark.slow
def test_an_outage_of_40000_records_keeps_memory_flat_and_loses_nothing(tmp_path: Path) -> None:
    total, max_pending = 40_000, 5_000
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.children.long_outage",
            str(tmp_path / "outage.db"),
            str(tmp_path / "journal"),
            str(total),
            str(max_pending),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["peak_queue"] <= max_pending + 2_000
    assert figures["journal_during_outage"] >= total - max_pending - 2_000
    # History keeps every trade not yet safe: the RAM backlog plus what awaits the next journal sync.
    assert figures["peak_history"] <= 1_000 + max_pending + 2_000 + 2_000
    # Bounded means flat: once the backlog is full (a quarter of the way), the last 30,000 trades add nothing. Held
    # in RAM they cost about 1.6 KB each (48 MB; measured with max_pending = total); the bound catches a leak of
    # 560 bytes per record.
    assert figures["peak_rss_growth_after_first_quarter"] < 16 * 1024 * 1024, figures
    assert figures["peak_rss_growth"] < 150 * 1024 * 1024, figures
    assert figures["rows"] == figures["distinct"] == total + 1
    assert figures["journal_after"] == 0


# ------------------------------------------------------------------------------ (h) full disk


async def test_a_full_disk_sends_records_to_the_journal_and_they_come_back_when_space_returns(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    clock = FakeClock()
    sidecar = build(sidecar_settings(sqlite_url, max_pending=20, breaker_failure_threshold=2), sidecars, clock=clock)
    events = Recorder(sidecar.events)
    await sidecar.start()
    assert sidecar.database is not None
    disk = DiskLimit(sidecar.database)
    assert await sidecar.record_trade(make_trade()) == "persisted"
    disk.fill(sqlite_file(sqlite_url))
    recorded = [sidecar.record_trade(make_trade(pattern_type="x" * 64)) for _ in range(400)]
    await eventually(lambda: sidecar.breaker_state == "open")
    assert any("full" in event.error for event in events.of(WriteFailed))
    await eventually(lambda: sidecar.health().queue <= 20)
    clock.advance(1.0)  # the journal sync interval
    await eventually(lambda: sum(r.status == "journaled" for r in recorded) >= 380)
    assert sidecar.health().journal >= 380
    assert events.of(JournalSpilled)
    disk.free()
    clock.advance(30)
    await sidecar.flush(timeout=20)
    ids = await stored_trade_ids(sidecar)
    assert len(ids) == len(set(ids)) == 401
    assert sidecar.health().journal == 0
    assert {r.status for r in recorded} == {"persisted"}
    replayed = [event for event in events.of(BatchCommitted) if event.from_journal]
    assert sum(len(event.latencies) for event in replayed) >= 380  # the slow ones still count in p95/p99


# ------------------------------------------------------------------------------ a vanished database file


async def test_a_vanished_database_file_is_noticed_recreated_and_written_again(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url), sidecars)
    events = Recorder(sidecar.events)
    await sidecar.start()
    assert await sidecar.record_trade(make_trade()) == "persisted"
    path = sqlite_file(sqlite_url)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    after = sidecar.record_trade(make_trade())
    assert await asyncio.wait_for(after, 10) == "persisted"
    assert any("vanished" in event.error for event in events.of(WriteFailed))
    with sqlite3.connect(path) as connection:
        assert [row[0] for row in connection.execute("SELECT trade_id FROM trades")] == [after.key]
    assert len(sidecar.trade_history) == 2


# ------------------------------------------------------------------------------ ordering


async def test_a_signal_journaled_during_an_outage_is_written_before_its_later_execution_update(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    clock = FakeClock()
    sidecar = build(sidecar_settings(sqlite_url, max_pending=1, breaker_failure_threshold=1), sidecars, clock=clock)
    await sidecar.start()
    signal_record = make_signal()
    async with DatabaseLock(sqlite_url):
        sidecar.record_signal(signal_record)
        for _ in range(10):
            sidecar.record_trade(make_trade())
        await eventually(lambda: sidecar.breaker_state == "open")
        await eventually(lambda: sidecar.health().journal >= 5)
        update = sidecar.update_signal_execution(signal_record.signal_id, True, "FILLED")
    clock.advance(30)
    assert await asyncio.wait_for(update, 10) == "persisted"
    stored = await sidecar.signals.get_signal_by_id(signal_record.signal_id)
    assert stored is not None and stored.executed and stored.execution_status == "FILLED"
    assert await sidecar.dead_letters.count() == 0


# ------------------------------------------------------------------------------ corrupt journal at start-up


async def test_a_corrupt_journal_line_and_a_torn_tail_are_each_counted_as_dropped_at_start_up(
    sqlite_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = sidecar_settings(sqlite_url, shutdown_timeout=0.5)
    first = PersistenceSidecar(settings)
    await first.start()
    async with DatabaseLock(sqlite_url):
        keys = [first.record_trade(make_trade()).key for _ in range(3)]
        await first.close()  # the database is locked: all three go to the journal
    segment = next((tmp_path / "journal").glob("segment-*.jsonl"))
    lines = segment.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1][:20] + b"#corrupted#" + lines[1][31:]
    segment.write_bytes(b"".join(lines) + b'deadbeef {"truncated')
    bus = EventBus()
    events = Recorder(bus)
    second = PersistenceSidecar(settings, bus=bus)
    async with second:
        ids = await stored_trade_ids(second)
        assert second.backlog is not None and second.backlog.journal_corrupt_lines == 2
        assert second.health().counts.dropped == 2
    assert sorted(ids) == sorted([keys[0], keys[2]])
    drops = [event for event in events.of(RecordsDropped) if event.reason == "corrupt_journal"]
    assert sum(event.count for event in drops) == 2
    sample = second.registry.get_sample_value(
        "persistence_dropped_records_total", {"entity": "unknown", "reason": "corrupt_journal"}
    )
    assert sample == 2


# ------------------------------------------------------------------------------ (i) two sidecars, one PostgreSQL


@pytest.mark.postgres
async def test_two_sidecars_writing_to_one_postgres_database_never_duplicate_a_record(
    postgres_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any], tmp_path: Path
) -> None:
    first = build(sidecar_settings(postgres_url, journal_dir=tmp_path / "j1"), sidecars)
    second = build(sidecar_settings(postgres_url, journal_dir=tmp_path / "j2"), sidecars)
    await asyncio.gather(first.start(), second.start())
    assert first.database is not None
    async with first.database.write() as connection:
        await connection.execute(text("DROP TRIGGER IF EXISTS poison ON trades"))
        await connection.execute(text("TRUNCATE trades, dead_letters RESTART IDENTITY"))
    shared = [make_trade() for _ in range(300)]
    receipts = []
    for trade in shared:
        receipts.append(first.record_trade(trade))
        receipts.append(second.record_trade(trade))
    receipts += [first.record_trade(make_trade()) for _ in range(100)]
    receipts += [second.record_trade(make_trade()) for _ in range(100)]
    await asyncio.gather(first.flush(20), second.flush(20))
    assert {r.status for r in receipts} == {"persisted"}
    async with first.database.read() as connection:
        total, distinct = (
            await connection.execute(text("SELECT count(*), count(DISTINCT trade_id) FROM trades"))
        ).one()
    assert total == distinct == 500
    assert await first.dead_letters.count() == 0


# ------------------------------------------------------------------------------ the journal's disk is gone too


async def test_when_the_journal_cannot_take_the_backlog_every_dropped_record_is_counted_and_logged(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any], tmp_path: Path
) -> None:
    clock = FakeClock()
    settings = sidecar_settings(sqlite_url, max_pending=10, breaker_failure_threshold=1)
    sidecar = build(settings, sidecars, clock=clock)
    events = Recorder(sidecar.events)
    await sidecar.start()
    shutil.rmtree(settings.journal_dir)  # start() made it (and owns it): take it away
    settings.journal_dir.write_text("not a directory")  # the journal has nowhere to go
    async with DatabaseLock(sqlite_url):
        first = sidecar.record_trade(make_trade())
        await eventually(lambda: sidecar.breaker_state == "open")
        with capture_logs() as logs:
            recorded = [first, *(sidecar.record_trade(make_trade()) for _ in range(50))]
            await eventually(lambda: sidecar.health().counts.dropped > 0)
        dropped = [r for r in recorded if r.status == "dropped"]
        assert len(dropped) == sidecar.health().counts.dropped == 51 - sidecar.health().queue
        assert sidecar.health().queue <= 20  # bounded at twice PERSISTENCE_MAX_PENDING
        with pytest.raises(RecordDroppedError):
            await dropped[0]
        assert sum(line["count"] for line in logs if line["event"] == "records_dropped") == len(dropped)
        # The journal's refusal is its own event and log line, not a failed database write.
        refusals = events.of(JournalFailed)
        assert refusals and {event.operation for event in refusals} == {"append"} and refusals[0].records > 0
        assert any(line["event"] == "journal_failed" and line["operation"] == "append" for line in logs)
        assert not [event for event in events.of(WriteFailed) if "journal" in event.error]
        scraped = sidecar.registry.get_sample_value(
            "persistence_dropped_records_total", {"entity": "trade", "reason": "journal_unavailable"}
        )
        assert scraped == len(dropped)
    clock.advance(30)
    await sidecar.flush(10)
    kept = [r for r in recorded if r.status != "dropped"]
    assert {r.status for r in kept} == {"persisted"}
    assert sorted(await stored_trade_ids(sidecar)) == sorted(r.key for r in kept)


# ------------------------------------------------------------------------------ the writer outlives the unforeseen


async def test_the_writer_survives_an_error_nobody_foresaw_and_backs_off_through_the_breaker(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    clock = FakeClock()
    sidecar = build(sidecar_settings(sqlite_url, breaker_failure_threshold=1), sidecars, clock=clock)
    events = Recorder(sidecar.events)
    await sidecar.start()
    writer, backlog = sidecar.writer, sidecar.backlog
    assert writer is not None and backlog is not None
    take = backlog.take
    failures = iter([RuntimeError("a bug in the writer"), None])

    async def faulty_take(size: int) -> Any:  # a hand-written fault: the first batch blows up, later ones work
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return await take(size)

    backlog.take = faulty_take  # type: ignore[method-assign]
    receipt = sidecar.record_trade(make_trade())
    await eventually(lambda: sidecar.breaker_state == "open")
    assert any(event.error == "writer: a bug in the writer" for event in events.of(WriteFailed))
    clock.advance(30)
    assert await asyncio.wait_for(receipt, 10) == "persisted"
    assert writer.running


# ------------------------------------------------------------------------------ a journal that cannot be read


async def test_a_journal_that_cannot_be_read_is_a_journal_fault_not_a_database_one_and_loses_nothing(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any], tmp_path: Path
) -> None:
    """A journal segment that cannot be read (here a directory where the file was: a real error from the operating
    system) is published as ``JournalFailed("read")``: the breaker and the database's reachability are untouched, the
    records stay on disk in order, and once the file is back they are all written."""
    settings = sidecar_settings(sqlite_url, shutdown_timeout=0.5)
    first = build(settings, sidecars)
    await first.start()
    async with DatabaseLock(sqlite_url):
        recorded = [first.record_trade(make_trade()) for _ in range(20)]
        await first.close()
    assert {receipt.status for receipt in recorded} == {"journaled"}
    [segment] = sorted((tmp_path / "journal").glob("segment-*.jsonl"))
    clock = FakeClock()
    second = build(settings, sidecars, clock=clock)
    events = Recorder(second.events)
    async with DatabaseLock(sqlite_url):
        await asyncio.wait_for(second.start(), 10)  # the journal is open; the database cannot be prepared yet
        moved = segment.with_name("moved-away")
        segment.rename(moved)
        segment.mkdir()  # reading the segment now fails with IsADirectoryError
    await eventually(lambda: bool(events.of(JournalFailed)))
    [failed] = events.of(JournalFailed)
    assert (failed.operation, failed.records) == ("read", 20)
    assert "cannot read journal segment" in failed.error
    health = second.health()
    assert health.breaker == "closed" and health.db.reachable is True and health.journal == 20
    failures = [event for event in events.of(WriteFailed) if event.error_class != "OperationalError"]
    assert failures == []  # the lock's failed preparations are the database's; the journal's fault is not
    segment.rmdir()
    moved.rename(segment)
    clock.advance(1.0)  # the writer reads the journal again after a pause on its clock
    await eventually(lambda: second.health().journal == 0)
    assert sorted(await stored_trade_ids(second)) == sorted(receipt.key for receipt in recorded)
    assert second.health().breaker == "closed"
