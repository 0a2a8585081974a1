"""The writer loop on its own: a real backlog, a fake target (no database) and a fake clock.

The loop's job is admit → commit → settle → publish; these tests drive it with a target that fails when told to,
and check what the breaker, the receipts and the events make of each outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from persistence.config import Settings
from persistence.observe.events import (
    BatchCommitted,
    BreakerChanged,
    DatabaseRecovered,
    DatabaseUnavailable,
    EventBus,
    JournalSpilled,
    JournalSynced,
    RecordDeadLettered,
    WriteFailed,
)
from persistence.records.history import TradeHistory
from persistence.testing import FakeClock
from persistence.write import backlog as backlog_module
from persistence.write.backlog import Backlog, Pending, ReceiptBook
from persistence.write.breaker import CircuitBreaker
from persistence.write.committer import DeadLetteredRecord, Outcome
from persistence.write.writer import Writer
from tests.support import Recorder, eventually
from tests.support.databases import make_settings
from tests.support.factories import make_trade


class FakeTarget:
    """The writer's committer and database link in one: commits whatever it is given, except: ``fail`` transient
    failures first, and keys in ``poison`` dead."""

    def __init__(self) -> None:
        self.ready = True
        self.fail = 0
        self.unreachable = 0  # prepare() fails this many times first
        self.poison: set[str] = set()
        self.batches: list[list[str]] = []
        self.ahead: list[list[str]] = []
        self.ahead_of: list[list[str]] = []
        self.ahead_stopped = 0

    async def prepare(self) -> int:
        if self.unreachable:
            self.unreachable -= 1
            raise OSError("connection refused")
        self.ready = True
        return 3

    async def commit(self, records: Sequence[Pending]) -> Outcome:
        self.batches.append([item.record.key for item in records])
        await asyncio.sleep(0)  # a commit waits for its database: the batch after it may be made ahead meanwhile
        if self.fail:
            self.fail -= 1
            return Outcome(failure=OSError("disk I/O error"), attempts=1)
        outcome = Outcome()
        for item in records:
            if item.record.key in self.poison:
                outcome.dead.append(DeadLetteredRecord(item, "IntegrityError", "refused"))
            else:
                outcome.committed.append(item)
        return outcome

    async def prepare_ahead(self, records: Sequence[Pending], committing: Sequence[Pending]) -> None:
        self.ahead.append([item.record.key for item in records])
        self.ahead_of.append([item.record.key for item in committing])
        try:
            await asyncio.Event().wait()  # longer than any commit here
        finally:
            self.ahead_stopped += 1

    def committed(self, now: float, outcome: Outcome) -> None:
        return None


@dataclass
class Loop:
    writer: Writer
    backlog: Backlog
    target: FakeTarget
    clock: FakeClock
    events: Recorder


@contextlib.asynccontextmanager
async def writer_loop(settings: Settings) -> AsyncIterator[Loop]:
    """A started writer over a real backlog (journal in ``settings.journal_dir``), a fake committer and clock."""
    clock, bus, book = FakeClock(), EventBus(), ReceiptBook()
    events = Recorder(bus)
    backlog = Backlog(settings, bus=bus, history=TradeHistory(100), clock=clock, sleep=clock.sleep, book=book)
    target = FakeTarget()
    writer = Writer(
        backlog,
        target,
        target,
        breaker=CircuitBreaker(5, 30.0),
        book=book,
        bus=bus,
        clock=clock,
        sleep=clock.sleep,
        batch_size=10,
    )
    await backlog.open()
    writer.start()
    try:
        yield Loop(writer, backlog, target, clock, events)
    finally:
        await writer.stop(1.0)
        await backlog.close()


@pytest.fixture
async def loop(tmp_path: Path) -> AsyncIterator[Loop]:
    async with writer_loop(make_settings(journal_dir=tmp_path / "journal", breaker_failure_threshold=5)) as running:
        yield running


async def test_records_are_committed_in_batches_oldest_first_and_receipts_resolve(loop: Loop) -> None:
    receipts = [loop.backlog.submit(make_trade(trade_id=f"W-{i:02d}")) for i in range(25)]
    assert await asyncio.wait_for(asyncio.gather(*receipts), 5) == ["persisted"] * 25
    keys = [key for batch in loop.target.batches for key in batch]
    assert keys == [f"W-{i:02d}" for i in range(25)]
    assert all(len(batch) <= 10 for batch in loop.target.batches)
    assert sum(event.records for event in loop.events.of(BatchCommitted)) == 25


async def test_the_next_batch_is_prepared_while_a_commit_waits_and_stopped_when_it_is_done(loop: Loop) -> None:
    receipts = [loop.backlog.submit(make_trade(trade_id=f"A-{i:02d}")) for i in range(25)]
    assert await asyncio.wait_for(asyncio.gather(*receipts), 5) == ["persisted"] * 25
    assert loop.target.ahead == [[f"A-{i:02d}" for i in range(10, 20)], [f"A-{i:02d}" for i in range(20, 25)]]
    assert loop.target.ahead_of == [[f"A-{i:02d}" for i in range(0, 10)], [f"A-{i:02d}" for i in range(10, 20)]]
    assert loop.target.ahead_stopped == 2  # each stopped when its commit was done: none outlives it
    assert [len(batch) for batch in loop.target.batches] == [10, 10, 5]


async def test_nothing_is_made_ahead_of_a_batch_read_from_the_journal(tmp_path: Path) -> None:
    settings = make_settings(journal_dir=tmp_path / "journal")
    clock = FakeClock()
    earlier = Backlog(
        settings, bus=EventBus(), history=TradeHistory(100), clock=clock, sleep=clock.sleep, book=ReceiptBook()
    )
    await earlier.open()
    for i in range(25):
        earlier.submit(make_trade(trade_id=f"J-{i:02d}"))
    await earlier.close()  # journals what it holds: the next backlog starts with 25 records on disk only
    async with writer_loop(settings) as running:
        await eventually(lambda: sum(len(batch) for batch in running.target.batches) == 25)
        assert running.target.ahead == []


async def test_five_transient_failures_open_the_breaker_no_call_while_open_then_one_probe_closes_it(
    loop: Loop,
) -> None:
    loop.target.fail = 5
    receipt = loop.backlog.submit(make_trade())
    await eventually(lambda: loop.writer.breaker.state == "open")
    calls = len(loop.target.batches)
    assert calls == 5 and len(loop.events.of(WriteFailed)) == 5
    loop.backlog.submit(make_trade())  # new work while open: still no call
    for _ in range(20):  # turns, not time: the writer wakes, is refused by the breaker and goes back to sleep
        await asyncio.sleep(0)
    assert len(loop.target.batches) == calls
    loop.clock.advance(30.0)
    assert await asyncio.wait_for(receipt, 5) == "persisted"
    changes = [(event.from_state, event.to_state) for event in loop.events.of(BreakerChanged)]
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


async def test_a_dead_lettered_record_settles_its_receipt_and_neither_trips_nor_resets_the_breaker(
    loop: Loop,
) -> None:
    loop.target.poison = {"BAD"}
    good, bad = loop.backlog.submit(make_trade()), loop.backlog.submit(make_trade(trade_id="BAD"))
    assert await asyncio.wait_for(good, 5) == "persisted"
    await eventually(lambda: bad.status == "dead_lettered")
    [dead] = loop.events.of(RecordDeadLettered)
    assert dead.key == "BAD" and loop.writer.breaker.consecutive_failures == 0
    assert loop.backlog.outstanding() == 0


async def test_the_database_is_reachable_as_the_last_verdict_says_and_a_recovery_is_published(loop: Loop) -> None:
    assert not loop.writer.database_ok  # nothing asked yet
    assert await asyncio.wait_for(loop.backlog.submit(make_trade()), 5) == "persisted"
    assert loop.writer.database_ok
    loop.target.fail = 1
    receipt = loop.backlog.submit(make_trade())
    await eventually(lambda: bool(loop.events.of(WriteFailed)))
    assert await asyncio.wait_for(receipt, 5) == "persisted"  # retried at once: the breaker is still closed
    assert loop.writer.database_ok and not loop.events.of(DatabaseRecovered)  # a commit failed; nothing to prepare
    loop.target.poison = {"BAD"}
    bad = loop.backlog.submit(make_trade(trade_id="BAD"))
    await eventually(lambda: bad.status == "dead_lettered")
    assert loop.writer.database_ok  # a data error is an answer from the database
    loop.target.ready, loop.target.unreachable = False, 1
    receipt = loop.backlog.submit(make_trade())
    assert await asyncio.wait_for(receipt, 5) == "persisted"
    [recovered] = loop.events.of(DatabaseRecovered)
    assert recovered.history_loaded == 3 and loop.writer.database_ok
    assert any(event.error == "connection refused" for event in loop.events.of(WriteFailed))


async def test_open_says_an_unreachable_database_at_start_up_and_the_loop_prepares_it_later(loop: Loop) -> None:
    loop.target.ready, loop.target.unreachable = False, 1
    assert await loop.writer.open() is False
    [unavailable] = loop.events.of(DatabaseUnavailable)
    assert unavailable.at_startup and unavailable.error == "connection refused"
    assert not loop.writer.database_ok and loop.writer.breaker.consecutive_failures == 0  # not asked of the breaker
    assert await asyncio.wait_for(loop.backlog.submit(make_trade()), 5) == "persisted"
    assert loop.writer.database_ok and len(loop.events.of(DatabaseRecovered)) == 1


async def test_the_keeper_journals_a_waiting_record_when_the_injected_clock_says_it_is_due(tmp_path: Path) -> None:
    """The keeper sleeps on the injected clock: moving it past the grace period (half the 60 s sync interval) gets
    the record journaled at once, with no real time passing; before, nothing happens however many turns go by."""
    settings = make_settings(journal_dir=tmp_path / "journal", journal_sync_seconds=60.0)
    clock, bus, book = FakeClock(), EventBus(), ReceiptBook()
    events = Recorder(bus)
    backlog = Backlog(settings, bus=bus, history=TradeHistory(100), clock=clock, sleep=clock.sleep, book=book)
    await backlog.open()
    try:
        backlog.submit(make_trade())
        for _ in range(20):
            await asyncio.sleep(0)
        clock.advance(29.0)
        for _ in range(20):
            await asyncio.sleep(0)
        assert events.of(JournalSynced) == [], "journaled before the grace period was over"
        clock.advance(1.5)
        await eventually(lambda: bool(events.of(JournalSynced)), timeout=3.0)
        assert sum(event.records for event in events.of(JournalSynced)) == 1
    finally:
        await backlog.close()


async def test_an_outage_journals_every_waiting_record_in_one_spill_per_grace_period(tmp_path: Path) -> None:
    """Records arriving one a second through an outage: when the oldest is a grace period old (half the 60 s sync
    interval), every record in RAM only goes in that one spill (one append, one fsync, one log line), not one spill
    per record as each comes due; the next spill waits until the oldest record after it is as old."""
    settings = make_settings(journal_dir=tmp_path / "journal", journal_sync_seconds=60.0)
    clock, bus, book = FakeClock(), EventBus(), ReceiptBook()
    events = Recorder(bus)
    backlog = Backlog(settings, bus=bus, history=TradeHistory(1000), clock=clock, sleep=clock.sleep, book=book)
    await backlog.open()

    async def turns() -> None:
        for _ in range(10):
            await asyncio.sleep(0)

    try:
        for _ in range(30):  # recorded at 0, 1, ..., 29 s
            backlog.submit(make_trade())
            await turns()
            clock.advance(1.0)
        assert events.of(JournalSpilled) == []
        clock.advance(0.5)  # 30.5 s: the first record is past the grace period, the last one 1.5 s old
        await eventually(lambda: bool(events.of(JournalSynced)), timeout=3.0)
        await turns()
        assert [event.records for event in events.of(JournalSpilled)] == [30]
        assert [event.records for event in events.of(JournalSynced)] == [30]
        for _ in range(5):  # recorded at 31.5 ... 35.5 s
            clock.advance(1.0)
            backlog.submit(make_trade())
            await turns()
        clock.advance(60.0 - 35.5)  # 60 s: the oldest of them is 28.5 s old, not due
        await turns()
        assert len(events.of(JournalSpilled)) == 1
        clock.advance(2.0)
        await eventually(lambda: len(events.of(JournalSpilled)) == 2, timeout=3.0)
        assert [event.records for event in events.of(JournalSpilled)] == [30, 5]
        assert backlog.journal_pending == 35
    finally:
        await backlog.close()


async def test_a_batch_committed_while_a_spill_journals_it_is_acknowledged_in_the_journal_to_its_last_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer commits 100 records taken from RAM while the keeper journals the same 100 in two chunks (the
    outage's spill takes every record in RAM only). The commit settles while the second chunk is still being written:
    the journal must end with nothing pending, not with the second chunk's records to be written again as a journal
    batch."""
    settings = make_settings(journal_dir=tmp_path / "journal", journal_sync_seconds=1.0)
    clock = FakeClock()
    backlog = Backlog(
        settings, bus=EventBus(), history=TradeHistory(1000), clock=clock, sleep=clock.sleep, book=ReceiptBook()
    )
    await backlog.open()
    real, chunks = backlog_module._append_chunk, []
    second_chunk, go_on = threading.Event(), threading.Event()

    def held_second_chunk(journal: object, run_id: str, items: Sequence[Pending]) -> object:
        chunks.append(len(items))
        if len(chunks) == 2:  # on the journal thread: hold the spill between its two chunks
            second_chunk.set()
            go_on.wait(10)
        return real(journal, run_id, items)  # type: ignore[arg-type]

    monkeypatch.setattr(backlog_module, "_append_chunk", held_second_chunk)
    try:
        for _ in range(100):
            backlog.submit(make_trade())
        batch = await backlog.take(100)  # the writer's batch, being committed
        clock.advance(1.0)  # no progress for the grace period: the keeper spills all 100
        await eventually(second_chunk.is_set, timeout=5.0)
        settling = asyncio.ensure_future(backlog.settle(batch, 100))  # the commit succeeded meanwhile
        await asyncio.sleep(0.05)
        go_on.set()
        await asyncio.wait_for(settling, 5.0)
        assert chunks == [64, 36]
        assert backlog.queue_depth == 0 and backlog.journal_pending == 0 and not backlog.on_disk_only
        assert not (await backlog.take(100)).slots  # nothing comes back to be written twice
    finally:
        go_on.set()
        await backlog.close()
