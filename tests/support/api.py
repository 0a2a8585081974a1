"""For the history API tests: an in-process client, reading a response's ids and errors, and a SQLite database
that cannot even be read (another connection in exclusive locking mode holding a write)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from persistence import PersistenceSidecar
from persistence.records.models import Trade
from tests.support.factories import BASE_TIME, make_signal, make_trade

HISTORY = "/api/v1/trades/history"
SIGNALS = "/api/v1/signals/history"

# Twelve trades over three symbols, three sessions, two patterns; P&L with negatives, one open trade (no P&L).
SEED: list[dict[str, Any]] = [
    {"symbol": "EURUSD", "session": "LONDON", "pattern_type": "breakout", "pnl": "-120.5"},
    {"symbol": "GBPUSD", "session": "NY", "pattern_type": "reversal", "pnl": "15"},
    {"symbol": "EURUSD", "session": "TOKYO", "pattern_type": "reversal", "pnl": "-3.25"},
    {"symbol": "USDJPY", "session": "LONDON", "pattern_type": "breakout", "pnl": "980.12345678"},
    {"symbol": "EURUSD", "session": "NY", "pattern_type": "breakout", "pnl": "-1000"},
    {"symbol": "GBPUSD", "session": "LONDON", "pattern_type": "breakout", "pnl": "2"},
    {"symbol": "USDJPY", "session": "TOKYO", "pattern_type": "reversal", "pnl": "-0.00000001"},
    {"symbol": "EURUSD", "session": "LONDON", "pattern_type": "reversal", "pnl": None},
    {"symbol": "GBPUSD", "session": "TOKYO", "pattern_type": "breakout", "pnl": "10"},
    {"symbol": "EURUSD", "session": "NY", "pattern_type": "reversal", "pnl": "100"},
    {"symbol": "USDJPY", "session": "NY", "pattern_type": "breakout", "pnl": "-99.99"},
    {"symbol": "EURUSD", "session": "LONDON", "pattern_type": "breakout", "pnl": "7"},
]


def seed_trades() -> list[Trade]:
    return [
        make_trade(
            trade_id=f"API-{i:02d}",
            entry_time=BASE_TIME + timedelta(hours=i),
            **{key: (Decimal(value) if key == "pnl" and value is not None else value) for key, value in row.items()},
        )
        for i, row in enumerate(SEED)
    ]


async def seed(sidecar: PersistenceSidecar) -> PersistenceSidecar:
    """Record the twelve seed trades and three signals (two executed) in a started sidecar and wait until committed."""
    for trade in seed_trades():
        sidecar.record_trade(trade)
    for i, executed in enumerate((True, False, True)):
        signal = make_signal(
            signal_id=f"SIG-{i}",
            symbol="EURUSD" if i < 2 else "GBPUSD",
            generated_at=BASE_TIME + timedelta(hours=i),
            confidence=Decimal(("0.9", "0.55", "0.7")[i]),
        )
        sidecar.record_signal(signal)
        if executed:
            sidecar.update_signal_execution(signal.signal_id, True, "FILLED")
    await sidecar.flush(10)
    return sidecar


def expected(predicate: Callable[[dict[str, Any], int], bool]) -> list[str]:
    """Seed trade ids matching ``predicate``, newest entry first (the default sort)."""
    return [f"API-{i:02d}" for i, row in reversed(list(enumerate(SEED))) if predicate(row, i)]


class ReadLock:
    """Holds a SQLite file so that no other connection can read it (``locking_mode=EXCLUSIVE`` plus a write).

    In WAL mode ``BEGIN EXCLUSIVE`` alone still lets readers in; exclusive locking mode does not. Released by
    closing the connection.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._connection: sqlite3.Connection | None = None

    def __enter__(self) -> ReadLock:
        connection = sqlite3.connect(self._path, isolation_level=None, timeout=10)
        connection.execute("PRAGMA locking_mode=EXCLUSIVE")
        connection.execute("BEGIN EXCLUSIVE")
        connection.execute("CREATE TABLE IF NOT EXISTS read_lock_probe (x INTEGER)")
        self._connection = connection
        return self

    def __exit__(self, *_: object) -> None:
        if self._connection is not None:
            self._connection.rollback()
            self._connection.close()
            self._connection = None


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def ids(response: httpx.Response) -> list[str]:
    body = response.json()
    return [item.get("trade_id") or item.get("signal_id") for item in body["data"]]


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"data", "error", "correlation_id"}, body
    assert body["data"] is None and body["error"]["code"] == code and body["error"]["message"]
    assert body["correlation_id"] == response.headers["X-Correlation-ID"]
    assert "detail" not in response.text
    return body
