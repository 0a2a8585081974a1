"""PostgreSQL under real faults, in a throwaway database: backends killed mid-batch and a simulated server restart.

A real restart is not done: the server is shared by everyone who runs the suite. A restart is what the sidecar sees
as every connection dropped, new connections refused for a while, then a server that answers slowly; here that is
``ALTER DATABASE … ALLOW_CONNECTIONS false`` on the throwaway database plus ``pg_terminate_backend`` of every
connection to it, over and over for a few seconds, then connections allowed again while another connection holds
``LOCK TABLE … ACCESS EXCLUSIVE`` for a while. Under a steady stream of trades (opened, then
closed) and signals the same invariants hold: nothing missing, nothing duplicated, the latest version of each trade
wins. Runs only when ``PERSISTENCE_TEST_POSTGRES_URL`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from persistence import PersistenceSidecar, SidecarClosedError
from persistence.observe.events import BreakerChanged, WriteFailed
from persistence.records.models import Signal, Trade
from persistence.testing import DatabaseLock, FaultInjector, wait_for_breaker
from persistence.write.committer import RetryPolicy
from tests.support import Recorder
from tests.support.databases import (
    POSTGRES_ENV,
    POSTGRES_SKIP_REASON,
    create_postgres_database,
    drop_postgres_database,
    make_settings,
)

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not os.environ.get(POSTGRES_ENV), reason=POSTGRES_SKIP_REASON),
]

RETRY = RetryPolicy(attempts=3, initial_wait=0.02, max_wait=0.2)


@pytest.fixture
def throwaway_postgres_url() -> Iterator[str]:
    url = create_postgres_database("persistence_faults")
    yield url
    drop_postgres_database(url)


async def connect(database_url: str) -> asyncpg.Connection:
    url = make_url(database_url)
    return await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, password=url.password, database=url.database
    )


async def terminate_other_backends(killer: asyncpg.Connection) -> int:
    """Kill every other connection to this database (the sidecar's); returns how many were killed."""
    killed = await killer.fetchval(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return int(killed or 0)


@dataclass
class Stream:
    """A steady stream of trades (opened, closed about half a second later) and signals, and what it recorded."""

    rng: random.Random = field(default_factory=lambda: random.Random(11))
    trades: dict[str, Trade] = field(default_factory=dict)
    signals: set[str] = field(default_factory=set)
    opened: deque[Trade] = field(default_factory=deque)
    closed: int = 0
    n: int = 0

    def tick(self, sidecar: PersistenceSidecar) -> None:
        now = datetime.now(UTC)
        self.n += 1
        trade = Trade(
            trade_id=f"PG-{self.n:07d}",
            symbol="EURUSD",
            direction="BUY",
            entry_time=now,
            entry_price=Decimal(self.rng.randrange(10**8, 2 * 10**8)) / 10**8,
            position_size=Decimal("1000"),
            created_at=now,
            updated_at=now,
        )
        self._record(sidecar, trade)
        self.opened.append(trade)
        if len(self.opened) > 50:
            old = self.opened.popleft()
            later = max(now, old.updated_at + timedelta(microseconds=1))
            closed = old.model_copy(
                update={
                    "exit_time": later,
                    "exit_price": old.entry_price + Decimal(self.rng.randrange(-(10**5), 10**5)) / 10**8,
                    "pnl": Decimal(self.rng.randrange(-(10**9), 10**9)) / 10**8,
                    "updated_at": later,
                }
            )
            self._record(sidecar, closed)
            self.closed += 1
        signal = Signal(
            signal_id=f"PGS-{self.n:07d}",
            symbol="EURUSD",
            timeframe="M1",
            signal_type="SELL",
            confidence=Decimal("0.5"),
            entry_price=Decimal("1.1"),
            generated_at=now,
        )
        sidecar.record_signal(signal)
        self.signals.add(signal.signal_id)

    def _record(self, sidecar: PersistenceSidecar, trade: Trade) -> None:
        sidecar.record_trade(trade)
        self.trades[trade.trade_id] = trade

    async def run(self, sidecar: PersistenceSidecar, stop: asyncio.Event, interval: float = 0.01) -> None:
        """About 250 records/s until ``stop`` is set."""
        while not stop.is_set():
            self.tick(sidecar)
            await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def streaming(sidecar: PersistenceSidecar, stream: Stream) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(stream.run(sidecar, stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def assert_database_matches(database_url: str, stream: Stream) -> None:
    """Nothing missing, nothing duplicated, nothing unexpected, the latest version of every trade."""
    connection = await connect(database_url)
    try:
        rows = await connection.fetch("SELECT trade_id, pnl, exit_price, exit_time FROM trades")
        signal_ids = [row[0] for row in await connection.fetch("SELECT signal_id FROM signals")]
        dead_letters = await connection.fetchval("SELECT count(*) FROM dead_letters")
    finally:
        await connection.close()
    stored_ids = [row["trade_id"] for row in rows]
    assert len(stored_ids) == len(set(stored_ids)), "a trade was stored twice"
    assert set(stored_ids) == set(stream.trades), (
        f"missing {len(set(stream.trades) - set(stored_ids))}, unexpected {len(set(stored_ids) - set(stream.trades))}"
    )
    stale = [
        row["trade_id"]
        for row in rows
        if (row["pnl"], row["exit_price"], row["exit_time"])
        != (
            stream.trades[row["trade_id"]].pnl,
            stream.trades[row["trade_id"]].exit_price,
            stream.trades[row["trade_id"]].exit_time,
        )
    ]
    assert stale == [], f"{len(stale)} trades do not hold their latest version, e.g. {stale[:3]}"
    assert sum(row["exit_time"] is not None for row in rows) == stream.closed
    assert len(signal_ids) == len(set(signal_ids)) and set(signal_ids) == stream.signals
    assert dead_letters == 0


def postgres_sidecar(
    database_url: str, tmp_path: Path, sidecars: list[Any], retry: RetryPolicy = RETRY
) -> PersistenceSidecar:
    settings = make_settings(
        database_url=database_url,
        journal_dir=tmp_path / "journal",
        query_timeout_ms=1000,
        breaker_failure_threshold=3,
        breaker_reset_seconds=1.0,
        shutdown_timeout=5.0,
        pool_size=2,
        max_overflow=2,
    )
    sidecar = PersistenceSidecar(settings, retry=retry)
    sidecars.append(sidecar)
    return sidecar


def failed_batches(events: Recorder) -> int:
    return len([event for event in events.of(WriteFailed) if event.records])


@pytest.mark.slow
async def test_connections_killed_mid_batch_lose_nothing_duplicate_nothing_and_keep_the_latest_versions(
    throwaway_postgres_url: str, tmp_path: Path, sidecars: list[Any]
) -> None:
    # One attempt per write: a batch whose connection is killed fails and must stay queued for the next attempt.
    sidecar = postgres_sidecar(throwaway_postgres_url, tmp_path, sidecars, RetryPolicy(attempts=1))
    events = Recorder(sidecar.events)
    await sidecar.start()
    stream = Stream()
    killer = await connect(throwaway_postgres_url)
    killed = 0
    try:
        # The delay before each write statement keeps a transaction open between the trades and the signals
        # statements much of the time, so the kills land inside batches.
        with FaultInjector(sidecar).latency(0.02):
            async with streaming(sidecar, stream):
                for _ in range(12):
                    await asyncio.sleep(random.uniform(0.2, 0.5))
                    killed += await terminate_other_backends(killer)
                await asyncio.sleep(1.0)
    finally:
        await killer.close()
    await sidecar.flush(timeout=30)
    assert killed >= 6, "the sidecar's connections were not there to be killed"
    assert failed_batches(events) >= 1, "no batch met a killed connection; the test proved nothing"
    await assert_database_matches(throwaway_postgres_url, stream)
    assert sidecar.breaker_state == "closed"


@pytest.mark.slow
async def test_a_simulated_server_restart_loses_nothing_duplicates_nothing_and_the_breaker_recovers(
    throwaway_postgres_url: str, tmp_path: Path, sidecars: list[Any]
) -> None:
    sidecar = postgres_sidecar(throwaway_postgres_url, tmp_path, sidecars)
    events = Recorder(sidecar.events)
    await sidecar.start()
    stream = Stream()
    killer = await connect(throwaway_postgres_url)
    killed = 0
    try:
        async with streaming(sidecar, stream):
            await asyncio.sleep(1.0)
            # "Down": new connections refused and every open one dropped, for three seconds.
            # (From the base database: PostgreSQL refuses to disallow connections to the one you are in.)
            name = make_url(throwaway_postgres_url).database
            admin = await connect(os.environ[POSTGRES_ENV])
            await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            try:
                loop = asyncio.get_running_loop()
                until = loop.time() + 3.0
                while loop.time() < until:
                    killed += await terminate_other_backends(killer)
                    await asyncio.sleep(0.05)
            finally:
                await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
                await admin.close()
            # "Coming back slowly": the tables stay locked for 1.5 s more.
            async with DatabaseLock(throwaway_postgres_url):
                await asyncio.sleep(1.5)
            await asyncio.sleep(1.0)
    finally:
        await killer.close()
    await wait_for_breaker(sidecar, "closed", timeout=15)
    await sidecar.flush(timeout=30)
    await assert_database_matches(throwaway_postgres_url, stream)
    assert killed >= 1
    openings = [event for event in events.of(BreakerChanged) if event.to_state == "open"]
    assert openings, "the outage never opened the breaker; it was not an outage"


async def test_close_during_a_start_waiting_for_the_database_stops_it_and_leaves_no_session_open(
    throwaway_postgres_url: str, tmp_path: Path
) -> None:
    """Another session holds trades in ACCESS EXCLUSIVE mode, so the start's history load waits (up to a 30 s query
    timeout). A close() then cancels the start and waits for it: start() raises SidecarClosedError, and once the
    lock is gone no session of the sidecar is left open on the server (the pool was disposed of after the start had
    given its connections back, not under it)."""
    settings = make_settings(
        database_url=throwaway_postgres_url, journal_dir=tmp_path / "journal", query_timeout_ms=30_000
    )
    async with PersistenceSidecar(settings, log_events=False):
        pass  # migrated
    holder, monitor = await connect(throwaway_postgres_url), await connect(throwaway_postgres_url)
    # Asked outside a transaction, so each query sees the activity anew.
    others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> ALL($1::int[])"
    ours = [holder.get_server_pid(), monitor.get_server_pid()]
    try:
        await holder.execute("BEGIN")
        await holder.execute("LOCK TABLE trades IN ACCESS EXCLUSIVE MODE")
        sidecar = PersistenceSidecar(settings, log_events=False)
        starting = asyncio.ensure_future(sidecar.start())
        await eventually_async(
            lambda: monitor.fetchval(others + " AND wait_event_type = 'Lock'", ours), "the start never waited"
        )
        await asyncio.wait_for(sidecar.close(), 10)
        with pytest.raises(SidecarClosedError):
            await asyncio.wait_for(starting, 10)
        await holder.execute("ROLLBACK")
        await eventually_async(
            lambda: _none(monitor.fetchval(others, ours)), "a session of the closed sidecar was left open"
        )
    finally:
        await holder.close()
        await monitor.close()


async def _none(count: Any) -> bool:
    return int(await count) == 0


async def eventually_async(check: Any, message: str, timeout: float = 10.0) -> None:
    """Wait until the awaitable ``check()`` returns a truthy value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, message
        await asyncio.sleep(0.05)
