"""The public fault kit (``persistence.testing``): every fault really produces the behaviour it names, and
leaving it restores normal writes. Runs on SQLite and, when configured, PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from persistence import DeadLetteredError, PersistenceSidecar
from persistence.config import Settings
from persistence.errors import DatabaseUnavailableError
from persistence.observe.events import BatchCommitted, BreakerChanged, WriteFailed
from persistence.testing import DiskLimit, FakeClock, FaultInjector, wait_for_breaker, written_table
from persistence.write.committer import RetryPolicy
from tests.support import Recorder, eventually
from tests.support.databases import make_settings
from tests.support.factories import make_trade, trade_data

ONE_ATTEMPT = RetryPolicy(attempts=1, initial_wait=0.0, max_wait=0.0)
SettingsFactory = Callable[..., Settings]


def start_sidecar(
    settings: Settings, sidecars: list[Any], clock: FakeClock | None = None, retry: RetryPolicy = ONE_ATTEMPT
) -> PersistenceSidecar:
    """A sidecar on a fake clock (or the real one when ``clock`` is None) with one attempt per write."""
    if clock is None:
        sidecar = PersistenceSidecar(settings, retry=retry)
    else:
        sidecar = PersistenceSidecar(settings, clock=clock, sleep=clock.sleep, retry=retry)
    sidecars.append(sidecar)
    return sidecar


def failed_writes(events: Recorder) -> list[WriteFailed]:
    return [event for event in events.of(WriteFailed) if event.records]


# ------------------------------------------------------------------------------ failing writes


async def test_failing_the_next_three_writes_gives_three_write_failures_then_the_record_commits(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = start_sidecar(sidecar_settings(clean_database_url), sidecars, FakeClock())
    events = Recorder(sidecar.events)
    await sidecar.start()
    with FaultInjector(sidecar).fail_writes(3) as faults:
        receipt = sidecar.record_trade(make_trade())
        assert await asyncio.wait_for(receipt, 10) == "persisted"
    failures = failed_writes(events)
    assert len(failures) == 3
    assert {(event.error_class, event.transient) for event in failures} == {("OperationalError", True)}
    assert faults.remaining == 0 and len(faults.failed) == 3
    assert all(written_table(statement) == "trades" for statement in faults.failed)
    assert sidecar.breaker_state == "closed"  # 3 < the threshold of 5
    assert await sidecar.trades.get_trade_by_id(receipt.key) is not None


async def test_injected_transient_failures_reaching_the_threshold_open_the_breaker(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    clock = FakeClock()
    sidecar = start_sidecar(sidecar_settings(clean_database_url), sidecars, clock)
    await sidecar.start()
    with FaultInjector(sidecar).fail_writes(5):
        receipt = sidecar.record_trade(make_trade())
        await wait_for_breaker(sidecar, "open")
    await wait_for_breaker(sidecar, "closed", clock=clock)
    assert await asyncio.wait_for(receipt, 10) == "persisted"


async def test_an_injected_data_error_dead_letters_the_record_and_leaves_the_breaker_alone(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = start_sidecar(sidecar_settings(clean_database_url, breaker_failure_threshold=1), sidecars, FakeClock())
    events = Recorder(sidecar.events)
    await sidecar.start()
    with FaultInjector(sidecar).fail_writes(1, kind="data"):
        receipt = sidecar.record_trade(make_trade())
        with pytest.raises(DeadLetteredError):
            await asyncio.wait_for(receipt, 10)
    [letter] = await sidecar.dead_letters.list()
    assert letter.natural_key == receipt.key and letter.error_class == "IntegrityError"
    assert events.of(BreakerChanged) == [] and sidecar.breaker_state == "closed"
    assert await asyncio.wait_for(sidecar.record_trade(make_trade()), 10) == "persisted"


async def test_a_poisoned_record_among_fifty_is_the_only_one_dead_lettered_and_the_rest_commit(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = start_sidecar(sidecar_settings(clean_database_url, breaker_failure_threshold=1), sidecars, FakeClock())
    events = Recorder(sidecar.events)
    await sidecar.start()
    trades = [make_trade() for _ in range(50)]
    with FaultInjector(sidecar).poison(trades[17].trade_id) as poison:
        receipts = [sidecar.record_trade(trade) for trade in trades]
        await sidecar.flush(timeout=10)
    assert poison.refused >= 1
    assert [receipt.status for receipt in receipts].count("persisted") == 49
    assert receipts[17].status == "dead_lettered"
    [letter] = await sidecar.dead_letters.list()
    assert letter.natural_key == trades[17].trade_id
    assert await sidecar.trades.count() == 49
    assert events.of(BreakerChanged) == []
    again = sidecar.record_trade(trades[17])  # removed: the same record goes through now
    assert await asyncio.wait_for(again, 10) == "persisted"


async def test_leaving_fail_writes_early_restores_normal_writes(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    clock = FakeClock()
    sidecar = start_sidecar(sidecar_settings(clean_database_url), sidecars, clock)
    events = Recorder(sidecar.events)
    await sidecar.start()
    with FaultInjector(sidecar).fail_writes(1_000) as faults:
        receipt = sidecar.record_trade(make_trade())
        await wait_for_breaker(sidecar, "open")
    assert faults.remaining > 900, "the fault was exhausted, so this proves nothing about its removal"
    failures_before = len(failed_writes(events))
    await wait_for_breaker(sidecar, "closed", clock=clock)
    assert await asyncio.wait_for(receipt, 10) == "persisted"
    assert [await sidecar.record_trade(make_trade()) for _ in range(5)] == ["persisted"] * 5
    assert len(failed_writes(events)) == failures_before


# ------------------------------------------------------------------------------ latency


async def test_added_latency_delays_commits_without_blocking_the_event_loop(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = start_sidecar(sidecar_settings(clean_database_url, query_timeout_ms=2000), sidecars)
    events = Recorder(sidecar.events)
    await sidecar.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    try:
        with FaultInjector(sidecar).latency(0.3) as delay:
            started = time.perf_counter()
            assert await asyncio.wait_for(sidecar.record_trade(make_trade()), 10) == "persisted"
            slow = time.perf_counter() - started
    finally:
        ticking.cancel()
    assert slow >= 0.3 and delay.delayed >= 1
    assert ticks >= 10, f"the event loop was blocked during the delay ({ticks} ticks in {slow:.2f} s)"
    [committed] = [event for event in events.of(BatchCommitted) if event.records]
    assert committed.latencies[0][1] >= 0.3  # the sidecar's own write-latency figure sees the delay
    started = time.perf_counter()
    assert await asyncio.wait_for(sidecar.record_trade(make_trade()), 10) == "persisted"
    assert time.perf_counter() - started < 0.25


# ------------------------------------------------------------------------------ a full disk


async def test_a_full_disk_sends_the_backlog_to_the_journal_and_leaving_it_brings_the_records_back(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    clock = FakeClock()
    settings = sidecar_settings(sqlite_url, max_pending=20, breaker_failure_threshold=2)
    sidecar = start_sidecar(settings, sidecars, clock)
    events = Recorder(sidecar.events)
    await sidecar.start()
    assert await sidecar.record_trade(make_trade()) == "persisted"
    async with FaultInjector(sidecar).full_disk() as disk:
        assert disk.max_pages is not None
        recorded = [sidecar.record_trade(make_trade(pattern_type="x" * 64)) for _ in range(300)]
        await wait_for_breaker(sidecar, "open")
        assert any("full" in event.error for event in failed_writes(events))
        await eventually(lambda: sidecar.queue_depth() <= 20)
        clock.advance(settings.journal_sync_seconds)
        await eventually(lambda: sum(receipt.status == "journaled" for receipt in recorded) >= 280)
    await wait_for_breaker(sidecar, "closed", clock=clock)
    await sidecar.flush(timeout=20)
    assert {receipt.status for receipt in recorded} == {"persisted"}
    assert await sidecar.trades.count() == 301
    # Space stays back: many more batches, each on whichever pooled connection comes next.
    for _ in range(20):
        assert await asyncio.wait_for(sidecar.record_trade(make_trade(pattern_type="y" * 64)), 10) == "persisted"


@pytest.mark.postgres
async def test_a_full_disk_is_refused_on_postgresql(
    postgres_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = start_sidecar(sidecar_settings(postgres_url), sidecars, FakeClock())
    await sidecar.start()
    assert sidecar.database is not None
    with pytest.raises(NotImplementedError):
        DiskLimit(sidecar.database)
    with pytest.raises(NotImplementedError):
        async with FaultInjector(sidecar).full_disk():
            pass  # pragma: no cover


# ------------------------------------------------------------------------------ a held lock


async def test_a_held_lock_opens_the_breaker_and_releasing_it_lets_the_record_through(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    clock = FakeClock()
    settings = sidecar_settings(clean_database_url)
    sidecar = start_sidecar(settings, sidecars, clock)
    events = Recorder(sidecar.events)
    await sidecar.start()
    started = clock.now
    async with FaultInjector(sidecar).lock() as lock:
        assert lock.held
        receipt = sidecar.record_trade(make_trade())
        await wait_for_breaker(sidecar, "open")
        assert receipt.status == "pending"
    assert not lock.held
    await wait_for_breaker(sidecar, "closed", clock=clock)
    assert clock.now - started >= settings.breaker_reset_seconds
    assert await asyncio.wait_for(receipt, 10) == "persisted"
    assert [(event.from_state, event.to_state) for event in events.of(BreakerChanged)] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


# ------------------------------------------------------------------------------ wait_for_breaker


async def test_wait_for_breaker_raises_when_the_state_never_comes(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    clock = FakeClock()
    sidecar = start_sidecar(sidecar_settings(sqlite_url), sidecars, clock)
    await sidecar.start()
    with pytest.raises(TimeoutError):
        await wait_for_breaker(sidecar, "open", clock=clock, timeout=0.2)
    with pytest.raises(ValueError, match="state must be one of"):
        await wait_for_breaker(sidecar, "ajar")


async def test_wait_for_breaker_without_a_fake_clock_waits_out_the_real_reset_period(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    settings = sidecar_settings(sqlite_url, breaker_failure_threshold=1, breaker_reset_seconds=0.5)
    sidecar = start_sidecar(settings, sidecars)
    await sidecar.start()
    with FaultInjector(sidecar).fail_writes(1):
        receipt = sidecar.record_trade(make_trade())
        await wait_for_breaker(sidecar, "open", timeout=5)
    opened = time.monotonic()
    await wait_for_breaker(sidecar, "closed", timeout=5)
    assert time.monotonic() - opened >= 0.4
    assert await asyncio.wait_for(receipt, 5) == "persisted"


async def test_the_injector_needs_a_started_sidecar(sqlite_url: str, sidecar_settings: SettingsFactory) -> None:
    with pytest.raises(DatabaseUnavailableError):
        FaultInjector(PersistenceSidecar(sidecar_settings(sqlite_url)))


def test_written_table_names_the_target_of_write_statements_only() -> None:
    assert written_table("INSERT INTO trades (a) VALUES (?) ON CONFLICT (trade_id) DO UPDATE SET a = 1") == "trades"
    assert written_table('INSERT OR REPLACE INTO "signals" (a) VALUES (1)') == "signals"
    assert written_table("UPDATE signals SET executed = 1") == "signals"
    assert written_table("DELETE FROM dead_letters") == "dead_letters"
    assert written_table("SELECT * FROM trades") is None
    assert written_table("BEGIN IMMEDIATE") is None


async def test_the_writer_probes_once_the_reset_period_passed_even_if_the_clock_moved_before_its_sleep_began(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    clock = FakeClock()
    settings = sidecar_settings(sqlite_url, breaker_failure_threshold=1)
    sidecar = start_sidecar(settings, sidecars, clock)
    await sidecar.start()
    with FaultInjector(sidecar).fail_writes(1):
        receipt = sidecar.record_trade(make_trade())
        while sidecar.breaker_state != "open":
            await asyncio.sleep(0)  # see "open" in the same loop turn the writer decided to idle for 30 s
    clock.advance(settings.breaker_reset_seconds)  # the whole reset period has now passed
    # Spec 4: open -> half-open after the reset period. The writer instead sleeps 30 s counted from when its
    # sleep coroutine first ran (after the advance), so the record waits for another full period.
    assert await asyncio.wait_for(receipt, 2) == "persisted"


async def test_the_readme_fault_kit_example_passes_with_the_default_retry_policy(tmp_path: Path) -> None:
    # The README's example, verbatim but for the settings (no .env here) and the trade.
    my_trade = trade_data()
    clock = FakeClock()
    settings = make_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/trading.db",
        journal_dir=tmp_path / "journal",
        query_timeout_ms=100,  # a locked SQLite database answers "locked" after this long
    )
    async with PersistenceSidecar(settings, clock=clock, sleep=clock.sleep) as sidecar:
        faults = FaultInjector(sidecar)
        async with faults.lock():
            receipt = sidecar.record_trade(my_trade)
            await wait_for_breaker(sidecar, "open", clock=clock)  # retry backoffs are skipped
            assert sidecar.trade_history.get(receipt.key) is not None  # trading goes on in memory
        await wait_for_breaker(sidecar, "closed", clock=clock)  # so is the reset period
        assert await receipt == "persisted"

        with faults.poison("T-BAD"), pytest.raises(DeadLetteredError):
            await sidecar.record_trade({**my_trade, "trade_id": "T-BAD"})
