"""Records for the export, copy and restore tests: many trades with 8-decimal prices, negatives and nulls."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert
from sqlalchemy.dialects import sqlite as sqlite_dialect

from persistence.db.engine import Database
from persistence.db.rowcodec import DriverBatch
from persistence.db.schema import trades as trades_table
from persistence.records.models import SESSIONS, Trade
from persistence.tables.repositories import Repositories
from tests.support.factories import BASE_TIME, make_parameter_change, make_signal, make_snapshot

SYMBOLS = ("EURUSD", "GBPUSD", "BTCUSD", "XAUUSD")


def _eight(i: int, salt: int) -> str:
    return f"{(i * salt) % 10**8:08d}"


def varied_trades(count: int, prefix: str = "X") -> list[Trade]:
    """``count`` trades: prices with 8 decimals, negative and tiny P&L, nulls in every nullable column."""
    trades: list[Trade] = []
    for i in range(count):
        entry = BASE_TIME + timedelta(seconds=37 * i, microseconds=i % 1_000_000)
        closed = i % 4 != 0
        data: dict[str, Any] = {
            "trade_id": f"{prefix}-{i:07d}",
            "signal_id": None if i % 6 == 0 else f"S-{i:07d}",
            "account_id": None if i % 5 == 0 else f"ACC-{i % 3}",
            "symbol": SYMBOLS[i % len(SYMBOLS)],
            "direction": "BUY" if i % 2 else "SELL",
            "entry_time": entry,
            "entry_price": Decimal(f"{1 + i % 70_000}.{_eight(i, 7919)}"),
            "exit_time": entry + timedelta(minutes=5 + i % 300) if closed else None,
            "exit_price": Decimal(f"{1 + i % 69_999}.{_eight(i, 104_729)}") if closed else None,
            "stop_loss": None if i % 3 == 0 else Decimal(f"0.{_eight(i + 1, 31)}") + Decimal("0.00000001"),
            "take_profit": None if i % 7 == 0 else Decimal(f"99999999.{_eight(i, 17)}"),
            "position_size": Decimal(f"{i % 1000}.{_eight(i, 3)}") + Decimal("0.00000001"),
            "pnl": None if i % 9 == 0 else Decimal(f"{'-' if i % 2 else ''}{i % 100_000}.{_eight(i, 7)}"),
            "pnl_percentage": Decimal("-0.00000001") if i % 13 == 0 else None,
            "session": SESSIONS[i % len(SESSIONS)] if i % 10 else None,
            "pattern_type": None if i % 11 == 0 else ("breakout", "reversal", "flag")[i % 3],
            "confidence_score": None if i % 8 == 0 else Decimal(f"0.{_eight(i, 13)}"),
            "risk_reward_ratio": Decimal("9999999999.99999999") if i % 97 == 0 else Decimal("2.5"),
            "created_at": BASE_TIME + timedelta(days=400, microseconds=i),
            "updated_at": BASE_TIME + timedelta(days=400, microseconds=2 * i + 1),
        }
        trades.append(Trade.parse(data))
    return trades


async def record_everything(database: Database, trades: list[Trade]) -> Repositories:
    """Write ``trades`` plus a few signals, snapshots, parameter changes and a dead letter; return the repositories."""
    repos = Repositories(database)
    for start in range(0, len(trades), 5000):
        async with database.write() as connection:
            await repos.trades.upsert(connection, trades[start : start + 5000])
    async with database.write() as connection:
        await repos.signals.upsert(
            connection,
            [make_signal(executed=i % 2 == 0, stop_loss=None if i % 3 else Decimal("1.00000001")) for i in range(40)],
        )
        await repos.snapshots.insert(connection, [make_snapshot(total_pnl=Decimal(f"-{i}.5")) for i in range(7)])
        await repos.parameters.insert(
            connection, [make_parameter_change(reason=None if i % 2 else "why") for i in range(5)]
        )
    await repos.dead_letters.add(trades[0], "a record that could never be written")
    return repos


def as_rows(records: list[Any]) -> dict[str, dict[str, Any]]:
    """Records by natural key, as plain field dicts."""
    return {record.key: dict(record.__dict__) for record in records}


def fill_trades_fast(path: Path, count: int, chunk: int = 20_000) -> None:
    """Insert ``count`` varied trades into a migrated SQLite file with the sidecar's own encoder, chunk by chunk."""
    batch = DriverBatch(insert(trades_table), trades_table, sqlite_dialect.dialect(paramstyle="qmark"))
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        for start in range(0, count, chunk):
            records = varied_trades(min(chunk, count - start), prefix=f"F{start}")
            connection.execute("BEGIN IMMEDIATE")
            rows = [{**record.__dict__, "instance_id": "bulk-filled"} for record in records]
            connection.executemany(batch.sql, batch.encode(rows))
            connection.execute("COMMIT")
    finally:
        connection.close()


@contextlib.contextmanager
def small_tmpfs(where: Path, *remount: str, size: str = "16k") -> Iterator[Path]:
    """A tmpfs of our own at ``where`` (``size``; remounted with each of ``remount``, e.g. ``ro``), unmounted at the
    end: a real full or read-only file system. Skips the test where mounting is not allowed (not root)."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        for option in remount:
            subprocess.run(["mount", "-o", f"remount,{option}", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
