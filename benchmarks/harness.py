"""Shared machinery for the benchmarks: workloads, baselines and percentiles.

pytest-benchmark has no async support and no percentiles beyond its own timing, so each benchmark drives an event
loop from a synchronous function and computes per-record latencies itself: a record's latency runs from its
``record_trade`` call to the commit of its batch (taken from the writer's ``BatchCommitted`` events). The
baselines run on the same schema and the same records in the same process: raw ``sqlite3.executemany`` in one
transaction (the ceiling) and one ORM ``add`` + ``await commit()`` per trade (the naive way).
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import insert
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import registry as orm_registry

from persistence import PersistenceSidecar, Settings
from persistence.db import create_database
from persistence.events import BatchCommitted
from persistence.migrations import upgrade
from persistence.models import Trade
from persistence.rowcodec import DriverBatch
from persistence.schema import trades

T = TypeVar("T")
BASE = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
SYMBOLS = ("EURUSD", "GBPUSD", "USDJPY", "BTCUSD", "XAUUSD")
SESSIONS = ("TOKYO", "LONDON", "NY", "SYDNEY", "OVERLAP")
PATTERNS = ("breakout", "reversal", "flag", "wedge", "range")


def trade_mapping(i: int, prefix: str = "B") -> dict[str, Any]:
    """A realistic trade as the orchestrator would hand it over (a mapping, validated on record)."""
    return {
        "trade_id": f"{prefix}-{i:08d}",
        "signal_id": f"S-{i:08d}",
        "account_id": "ACC-1",
        "symbol": SYMBOLS[i % len(SYMBOLS)],
        "direction": "BUY" if i % 2 else "SELL",
        "entry_time": BASE + timedelta(seconds=i),
        "entry_price": Decimal("1.08423") + Decimal(i % 1000) / 100000,
        "stop_loss": Decimal("1.08000"),
        "take_profit": Decimal("1.09000"),
        "position_size": Decimal("100000"),
        "pnl": Decimal((i % 2001) - 1000) / 100,
        "session": SESSIONS[i % len(SESSIONS)],
        "pattern_type": PATTERNS[i % len(PATTERNS)],
        "confidence_score": Decimal("0.75"),
        "risk_reward_ratio": Decimal("2.5"),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) by the nearest-rank method."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def run(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]) -> T:
    return loop.run_until_complete(coroutine)


def sqlite_settings(path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{path}",
        "journal_dir": path.parent / f"{path.stem}-journal",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


async def migrated(settings: Settings) -> None:
    database = create_database(settings)
    try:
        await upgrade(database)
    finally:
        await database.dispose()


class LatencyProbe:
    """Collects per-record latencies from a sidecar's ``BatchCommitted`` events."""

    def __init__(self, sidecar: PersistenceSidecar) -> None:
        self.latencies: list[float] = []
        self.batches: list[int] = []
        sidecar.events.subscribe(self._on_event)

    def _on_event(self, event: object) -> None:
        if isinstance(event, BatchCommitted):
            self.latencies.extend(latency for _, latency in event.latencies)
            self.batches.append(event.records)


async def sidecar_burst(settings: Settings, count: int, prefix: str) -> tuple[list[float], float]:
    """Record ``count`` trades at once; return per-record latencies and the wall time until all committed."""
    async with PersistenceSidecar(settings, log_events=False) as sidecar:
        probe = LatencyProbe(sidecar)
        mappings = [trade_mapping(i, prefix) for i in range(count)]
        started = time.perf_counter()
        for mapping in mappings:
            sidecar.record_trade(mapping)
        await sidecar.flush(timeout=120)
        return probe.latencies, time.perf_counter() - started


async def naive_burst(settings: Settings, count: int, prefix: str) -> tuple[list[float], float]:
    """The naive way: one ORM add + awaited commit per trade, inline. Latency of record i: burst start → its commit."""

    class NaiveTrade:
        pass

    mapper = orm_registry()
    mapper.map_imperatively(NaiveTrade, trades)
    database = create_database(settings)
    sessions = async_sessionmaker(database.engine, expire_on_commit=False)
    latencies: list[float] = []
    try:
        rows = [Trade.parse(trade_mapping(i, prefix)).to_row() for i in range(count)]
        started = time.perf_counter()
        async with sessions() as session:
            for row in rows:
                instance = NaiveTrade()
                instance.__dict__.update({})
                for key, value in row.items():
                    setattr(instance, key, value)
                session.add(instance)
                await session.commit()
                latencies.append(time.perf_counter() - started)
        return latencies, time.perf_counter() - started
    finally:
        mapper.dispose()
        await database.dispose()


def raw_executemany(path: Path, count: int, prefix: str) -> float:
    """The ceiling: the same rows through sqlite3.executemany in one transaction; returns the seconds it took.

    The rows are encoded inside the timing with the sidecar's own encoder (the fastest there is for this schema), so
    the ceiling is what any writer of these records has to pay: encoding plus SQLite's insert, nothing else.
    """
    records = [Trade.parse(trade_mapping(i, prefix)) for i in range(count)]
    batch = DriverBatch(insert(trades), trades, sqlite_dialect.dialect(paramstyle="qmark"))
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        started = time.perf_counter()
        rows = batch.encode([record.__dict__ for record in records])
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(batch.sql, rows)
        connection.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        connection.close()
