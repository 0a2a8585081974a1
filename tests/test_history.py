"""trade_history and receipts: ordering, updates in place, the window, safety, and receipt outcomes."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal

import pytest

from persistence.errors import DeadLetteredError, RecordDroppedError
from persistence.records.history import TradeHistory
from persistence.records.receipts import Receipt
from tests.support.factories import make_trade


def test_trades_are_kept_oldest_first_and_updated_in_place() -> None:
    history = TradeHistory(10)
    first, second = make_trade(), make_trade()
    history.record(first)
    history.record(second)
    history.record(first.model_copy(update={"pnl": Decimal("5"), "updated_at": first.updated_at + timedelta(1)}))
    assert [t.trade_id for t in history] == [first.trade_id, second.trade_id]
    current = history.get(first.trade_id)
    assert current is not None and current.pnl == Decimal("5")
    assert history[0] == current and len(history) == 2
    assert first.trade_id in history and "nope" not in history


def test_an_update_keeps_created_at_and_is_always_newer_than_what_it_replaces() -> None:
    history = TradeHistory(10)
    newer = make_trade()
    older_object = newer.model_copy(update={"pnl": Decimal("1"), "updated_at": newer.updated_at - timedelta(seconds=5)})
    history.record(newer)
    stored = history.record(older_object)  # recorded later, but constructed with an older timestamp
    assert stored.updated_at > newer.updated_at
    assert stored.created_at == newer.created_at
    assert stored.pnl == Decimal("1")


def test_the_window_evicts_the_oldest_safe_trades() -> None:
    history = TradeHistory(3)
    made = [make_trade() for _ in range(6)]
    for trade in made:
        history.record(trade)
    assert [t.trade_id for t in history] == [t.trade_id for t in made[3:]]


def test_a_trade_not_yet_safe_is_never_evicted() -> None:
    history = TradeHistory(3)
    made = [make_trade() for _ in range(8)]
    for trade in made:
        history.record(trade, unsafe=True)
    assert len(history) == 8
    for trade in made[:6]:
        history.mark_safe(trade.trade_id)
    history.evict()
    assert [t.trade_id for t in history] == [t.trade_id for t in made[5:]]
    assert history.unsafe == 2


def test_a_trade_with_two_pending_versions_stays_unsafe_until_both_are_safe() -> None:
    history = TradeHistory(1)
    trade = make_trade()
    history.record(trade, unsafe=True)
    history.record(trade.model_copy(update={"pnl": Decimal("2")}), unsafe=True)
    history.mark_safe(trade.trade_id)
    history.record(make_trade())  # the only safe trade is this newer one: it goes, the unsafe one stays
    assert [t.trade_id for t in history] == [trade.trade_id]
    history.mark_safe(trade.trade_id)
    newest = make_trade()
    history.record(newest)
    assert [t.trade_id for t in history] == [newest.trade_id]


def test_loaded_trades_go_before_those_recorded_since_and_never_replace_them() -> None:
    history = TradeHistory(10)
    recorded = make_trade(pnl=Decimal("9"))
    history.record(recorded)
    stale = recorded.model_copy(update={"pnl": Decimal("1")})
    older = [make_trade(), make_trade()]
    assert history.load([*older, stale]) == 2
    assert [t.trade_id for t in history] == [older[0].trade_id, older[1].trade_id, recorded.trade_id]
    assert history.get(recorded.trade_id) == recorded


async def test_receipts_resolve_and_report_their_outcome() -> None:
    persisted, dead, dropped = Receipt("trade", "a"), Receipt("trade", "b"), Receipt("signal", "c")
    waiter = asyncio.ensure_future(_await(persisted))
    await asyncio.sleep(0)
    assert not waiter.done()
    persisted.mark_journaled()
    assert persisted.status == "journaled" and not persisted.done
    await asyncio.sleep(0)
    assert not waiter.done()  # journaled is safe, not yet committed
    persisted.mark_persisted()
    assert await waiter == "persisted"
    dead.mark_dead_lettered("value out of range")
    with pytest.raises(DeadLetteredError, match="value out of range"):
        await dead
    dropped.mark_dropped("journal_unavailable")
    with pytest.raises(RecordDroppedError):
        await dropped
    persisted.mark_journaled()
    assert persisted.status == "persisted"  # a final status never goes back


async def _await(receipt: Receipt) -> str:
    return await receipt
