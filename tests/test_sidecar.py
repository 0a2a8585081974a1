"""The sidecar's write path on a real database: persistence, receipts, history, flush, close, the flag."""

from __future__ import annotations

import asyncio
import inspect
import threading
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from persistence import (
    DeadLetteredError,
    FlushTimeoutError,
    InvalidRecordError,
    PersistenceSidecar,
    Receipt,
    SidecarClosedError,
)
from persistence.observe.correlation import correlation_scope
from persistence.observe.events import BatchCommitted, DatabaseUnavailable, ShutdownComplete
from persistence.testing import FakeClock
from tests.support import DatabaseLock, Recorder, eventually
from tests.support.factories import make_parameter_change, make_signal, make_snapshot, make_trade, trade_data
from tests.support.sidecars import SettingsFactory, build, stored_trade_ids


async def test_records_are_persisted_and_receipts_resolve(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(clean_database_url), sidecars)
    await sidecar.start()
    trade = make_trade(pnl=Decimal("-0.00001234"))
    signal = make_signal()
    receipts = [
        sidecar.record_trade(trade),
        sidecar.record_signal(signal),
        sidecar.update_signal_execution(signal.signal_id, executed=True, execution_status="FILLED"),
        sidecar.record_snapshot(make_snapshot()),
        sidecar.record_parameter_change(make_parameter_change()),
    ]
    assert all(isinstance(receipt, Receipt) for receipt in receipts)
    assert [await receipt for receipt in receipts] == ["persisted"] * 5
    assert await sidecar.trades.get_trade_by_id(trade.trade_id) == trade
    stored_signal = await sidecar.signals.get_signal_by_id(signal.signal_id)
    assert stored_signal is not None and stored_signal.executed and stored_signal.execution_status == "FILLED"
    assert len(await sidecar.snapshots.get_snapshots()) == 1
    assert len(await sidecar.parameters.get_changes()) == 1
    assert sidecar.health().counts.persisted == 5


async def test_record_methods_are_synchronous_and_accept_mappings(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url), sidecars)
    await sidecar.start()
    for method in (
        sidecar.record_trade,
        sidecar.record_signal,
        sidecar.update_signal_execution,
        sidecar.record_snapshot,
        sidecar.record_parameter_change,
    ):
        assert not inspect.iscoroutinefunction(method)
    receipt = sidecar.record_trade(trade_data(trade_id="from-mapping", pnl="12.5"))
    assert receipt.status == "pending"
    await sidecar.flush(5)
    assert receipt.status == "persisted"
    stored = await sidecar.trades.get_trade_by_id("from-mapping")
    assert stored is not None and stored.pnl == Decimal("12.5")


async def test_invalid_input_raises_at_once_and_nothing_is_stored(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url), sidecars)
    await sidecar.start()
    with pytest.raises(InvalidRecordError) as caught:
        sidecar.record_trade(trade_data(trade_id="bad", entry_price=float("nan")))
    assert caught.value.field == "entry_price"
    with pytest.raises(InvalidRecordError):
        sidecar.record_signal({"signal_id": "x"})
    with pytest.raises(InvalidRecordError):
        sidecar.update_signal_execution("", True)
    assert len(sidecar.trade_history) == 0
    await sidecar.flush(5)
    assert await stored_trade_ids(sidecar) == []
    good = sidecar.record_trade(make_trade())  # the writer is alive and well
    assert await good == "persisted"


async def test_a_trade_recorded_again_updates_history_in_place_and_the_row(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(clean_database_url), sidecars)
    await sidecar.start()
    first, second = make_trade(), make_trade()
    sidecar.record_trade(first)
    sidecar.record_trade(second)
    exit_time = (first.entry_time + timedelta(hours=4)).isoformat()
    closed = {**first.to_json(), "exit_price": "1.09", "exit_time": exit_time, "pnl": "57.70"}
    del closed["created_at"], closed["updated_at"]
    sidecar.record_trade(closed)
    assert [t.trade_id for t in sidecar.trade_history] == [first.trade_id, second.trade_id]
    current = sidecar.trade_history.get(first.trade_id)
    assert current is not None and current.pnl == Decimal("57.70")
    assert current.created_at == first.created_at and current.updated_at > first.updated_at
    await sidecar.flush(5)
    assert sorted(await stored_trade_ids(sidecar)) == sorted([first.trade_id, second.trade_id])
    assert await sidecar.trades.get_trade_by_id(first.trade_id) == current


async def test_a_lone_record_is_written_without_waiting_for_a_batch_to_fill(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url, batch_size=500), sidecars)
    await sidecar.start()
    receipt = sidecar.record_trade(make_trade())
    await asyncio.wait_for(receipt, timeout=2.0)  # the fake clock never moves: no timer is involved


async def test_batches_hold_at_most_batch_size_records_in_one_transaction(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url, batch_size=64), sidecars)
    events = Recorder(sidecar.events)
    await sidecar.start()
    for _ in range(1000):
        sidecar.record_trade(make_trade())
    await sidecar.flush(10)
    batches = events.of(BatchCommitted)
    assert sum(batch.records for batch in batches) == 1000
    assert max(batch.records for batch in batches) == 64
    assert len(batches) >= 1000 // 64


async def test_flush_times_out_while_the_database_is_locked(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url), sidecars)
    await sidecar.start()
    async with DatabaseLock(sqlite_url):
        sidecar.record_trade(make_trade())
        with pytest.raises(FlushTimeoutError) as caught:
            await sidecar.flush(timeout=0.5)
        assert caught.value.outstanding == 1


async def test_record_after_close_raises_and_close_is_idempotent(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url), sidecars)
    events = Recorder(sidecar.events)
    await sidecar.start()
    sidecar.record_trade(make_trade())
    await asyncio.gather(sidecar.close(), sidecar.close())
    await sidecar.close()
    with pytest.raises(SidecarClosedError):
        sidecar.record_trade(make_trade())
    [summary] = events.of(ShutdownComplete)
    assert (summary.persisted, summary.journaled, summary.dead_lettered, summary.dropped) == (1, 0, 0, 0)


async def test_close_logs_one_summary_line(sqlite_url: str, sidecar_settings: SettingsFactory) -> None:
    clock = FakeClock()
    sidecar = PersistenceSidecar(sidecar_settings(sqlite_url), clock=clock, sleep=clock.sleep)
    with capture_logs() as logs:
        async with sidecar:
            for _ in range(3):
                sidecar.record_trade(make_trade())
    summaries = [line for line in logs if line["event"] == "shutdown_complete"]
    assert len(summaries) == 1
    assert summaries[0]["persisted"] == 3 and summaries[0]["dropped"] == 0
    assert not [line for line in logs if line["log_level"] == "info" and line["event"] == "batch_committed"]


async def test_unknown_signal_execution_is_dead_lettered(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url), sidecars)
    await sidecar.start()
    receipt = sidecar.update_signal_execution("S-never-recorded", True, "FILLED")
    with pytest.raises(DeadLetteredError) as caught:
        await receipt
    assert caught.value.key == "S-never-recorded"
    [letter] = await sidecar.dead_letters.list()
    assert letter.natural_key == "S-never-recorded"
    assert sidecar.breaker_state == "closed"


async def test_the_correlation_id_travels_with_the_record_to_the_writer(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url), sidecars)
    events = Recorder(sidecar.events)
    await sidecar.start()
    with correlation_scope("req-42"):
        receipt = sidecar.record_trade(make_trade())
    await receipt
    assert "req-42" in events.of(BatchCommitted)[-1].correlation_ids


async def test_history_is_bounded_by_history_max(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url, history_max=25), sidecars)
    await sidecar.start()
    made = [make_trade() for _ in range(100)]
    for trade in made:
        sidecar.record_trade(trade)
    await sidecar.flush(5)
    sidecar.record_trade(make_trade())  # eviction runs on the hot path too
    await sidecar.flush(5)
    assert len(sidecar.trade_history) <= 26
    assert sidecar.trade_history[0].trade_id != made[0].trade_id


async def test_history_never_evicts_a_trade_that_is_not_yet_safe(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url, history_max=10), sidecars)
    await sidecar.start()
    async with DatabaseLock(sqlite_url):
        made = [make_trade() for _ in range(40)]
        for trade in made:
            sidecar.record_trade(trade)
        await asyncio.sleep(0.05)
        assert [t.trade_id for t in sidecar.trade_history] == [t.trade_id for t in made]


# ------------------------------------------------------------------------------------ (f) the flag


def _threads() -> set[str]:
    return {thread.name for thread in threading.enumerate()}


async def test_flag_off_means_no_file_no_journal_no_thread_and_disabled_receipts(
    tmp_path: Path, sidecar_settings: SettingsFactory
) -> None:
    database = tmp_path / "never" / "trading.db"
    settings = sidecar_settings(f"sqlite+aiosqlite:///{database}", enabled=False)
    before = _threads()
    async with PersistenceSidecar(settings) as sidecar:
        receipts = [sidecar.record_trade(make_trade()) for _ in range(5)]
        assert all(receipt.status == "disabled" for receipt in receipts)
        assert await receipts[0] == "disabled"
        assert sidecar.record_signal(make_signal()).status == "disabled"
        assert len(sidecar.trade_history) == 5
        await sidecar.flush(1)
        assert _threads() - before == set(), "persistence switched off must not start a thread"
        assert sidecar.health().enabled is False
        assert sidecar.database is None
    assert not database.exists() and not database.parent.exists()
    assert not (tmp_path / "journal").exists()


async def test_flag_flips_at_run_time_and_turning_off_flushes_first(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url), sidecars)
    await sidecar.start()
    before_off = [sidecar.record_trade(make_trade()) for _ in range(50)]
    await sidecar.set_enabled(False)
    assert [receipt.status for receipt in before_off] == ["persisted"] * 50
    while_off = sidecar.record_trade(make_trade())
    assert while_off.status == "disabled" and sidecar.database is None
    await sidecar.set_enabled(True)
    after_on = sidecar.record_trade(make_trade())
    assert await after_on == "persisted"
    ids = set(await stored_trade_ids(sidecar))
    assert {r.key for r in before_off} <= ids and after_on.key in ids and while_off.key not in ids
    assert len(sidecar.trade_history) == 52


# ------------------------------------------------------------------------------------ start-up


async def test_start_up_with_an_unreachable_database_runs_in_memory_and_recovers(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    # Create the schema and one trade first, then hold the lock across start-up.
    async with PersistenceSidecar(sidecar_settings(sqlite_url)) as seed:
        old = seed.record_trade(make_trade())
    clock = FakeClock()
    sidecar = build(sidecar_settings(sqlite_url, breaker_failure_threshold=2), sidecars, clock=clock)
    events = Recorder(sidecar.events)
    async with DatabaseLock(sqlite_url):
        with capture_logs() as logs:
            await asyncio.wait_for(sidecar.start(), timeout=10)
        [unavailable] = events.of(DatabaseUnavailable)
        assert unavailable.at_startup
        assert any(line["event"] == "database_unavailable" and line["log_level"] == "critical" for line in logs)
        receipt = sidecar.record_trade(make_trade())
        assert len(sidecar.trade_history) == 1  # trading goes on in memory
        await eventually(lambda: sidecar.breaker_state == "open")
    clock.advance(30)
    assert await asyncio.wait_for(receipt, 10) == "persisted"
    assert [t.trade_id for t in sidecar.trade_history] == [old.key, receipt.key]  # history loaded on recovery


async def test_start_up_with_postgres_unreachable_does_not_stop_start_up(
    sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    settings = sidecar_settings("postgresql+asyncpg://trader:hunter2@127.0.0.1:1/nowhere", query_timeout_ms=500)
    sidecar = build(settings, sidecars)
    with capture_logs() as logs:
        await asyncio.wait_for(sidecar.start(), timeout=10)
    assert sidecar.record_trade(make_trade()).status == "pending"
    critical = [line for line in logs if line["event"] == "database_unavailable"]
    assert critical and critical[0]["log_level"] == "critical"
    assert "hunter2" not in repr(logs)


# ------------------------------------------------------------------------------------ (g) restart


async def test_restart_loads_the_last_history_max_trades_in_order_with_exact_decimals(
    clean_database_url: str, sidecar_settings: SettingsFactory
) -> None:
    settings = sidecar_settings(clean_database_url, history_max=50)
    async with PersistenceSidecar(settings) as sidecar:
        for i in range(120):
            sidecar.record_trade(make_trade(trade_id=f"R-{i:03d}", pnl=Decimal(f"-{i}.00000001")))
        sidecar.record_trade({**sidecar.trade_history.get("R-119").to_json(), "pnl": "98765.12345678"})  # type: ignore[union-attr]
        expected = list(sidecar.trade_history)[-50:]
    async with PersistenceSidecar(settings) as restarted:
        history = list(restarted.trade_history)
    assert [t.trade_id for t in history] == [t.trade_id for t in expected]
    assert history == expected
    assert str(history[-1].pnl) == "98765.12345678"
    assert str(history[0].pnl) == "-70.00000001"


async def test_the_runtime_is_built_off_the_loop_and_a_start_cancelled_meanwhile_leaves_nothing_behind(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the repositories compiles statements and generates codecs: 15-30 ms the host's loop must not wait."""
    import persistence.sidecar as sidecar_module

    gate, threads = threading.Event(), []

    class GatedRuntime(sidecar_module.Runtime):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            threads.append(threading.current_thread())
            assert gate.wait(timeout=30)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sidecar_module, "Runtime", GatedRuntime)
    sidecar = build(sidecar_settings(sqlite_url), sidecars)
    listeners = len(sidecar.events._listeners)
    starting = asyncio.ensure_future(sidecar.start())
    await eventually(lambda: bool(threads))  # the loop runs on while the construction waits at the gate
    assert threads[0] is not threading.main_thread()
    starting.cancel()
    await asyncio.sleep(0.05)
    assert not starting.done()  # the cancelled start waits for the construction under way, not leaving it behind
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await starting
    # Built all the same on its thread; it never ran, and its anchorer has left the bus by the time start() ends.
    assert len(sidecar.events._listeners) == listeners
    await sidecar.close()


async def test_a_start_cancelled_during_its_migrations_can_be_started_again_and_persists(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    """Another connection holds the database's write lock, so the start waits in its migrations; the host cancels
    it. A start() called again once the lock is gone starts the writer: nothing half-started is left to find, and a
    record made in between is persisted."""
    sidecar = build(sidecar_settings(sqlite_url, query_timeout_ms=20_000), sidecars)
    async with DatabaseLock(sqlite_url):
        starting = asyncio.ensure_future(sidecar.start())
        await asyncio.sleep(0.3)
        assert not starting.done()
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(starting, 10)
        assert sidecar.runtime is None
        receipt = sidecar.record_trade(make_trade())
    await asyncio.wait_for(sidecar.start(), 10)
    assert sidecar.writer is not None and sidecar.writer.running
    assert await asyncio.wait_for(receipt, 10) == "persisted"
