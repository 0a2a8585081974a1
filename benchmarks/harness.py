"""Shared machinery for the benchmarks: workloads, ceilings, probes and percentiles.

pytest-benchmark has no async support and no percentiles beyond its own timing, so each benchmark drives an event
loop from a synchronous function and computes per-record latencies itself. The headline latency is the user's: from
each record's own ``record_trade`` call to its receipt resolving, awaited by the host, with the sidecar's default
settings and logging (:func:`user_burst`). The internal figure beside it runs from the call to the commit of its
batch (the writer's ``BatchCommitted`` events, :func:`sidecar_burst`).

The ceilings run on the same records in the same process: raw ``sqlite3.executemany`` of the rows encoded as the
schema stores them (the same-schema ceiling), of the same values as plain text into a table of text columns with the
same indexes (the text ceiling: what the encoding itself costs), and asyncpg ``copy_records_to_table`` and
``executemany`` into PostgreSQL's ``trades``. The naive way is one ORM ``add`` + ``await commit()`` per trade.

The same-work ceilings (SPEC, "Performance targets") add what the audit trail makes every write do: the rows plus
their audit entries (canonical JSON of each version, the SHA-256 chain after the chain's head read in the same
transaction), written by the simplest code in one transaction: ``executemany`` of both in one ``BEGIN IMMEDIATE …
COMMIT`` on SQLite (:func:`same_work_sqlite`), ``copy_records_to_table`` of both in one transaction on PostgreSQL
(:func:`same_work_postgres`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import insert
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import registry as orm_registry

from persistence import PersistenceSidecar, Settings
from persistence.audit.chain import GENESIS, AuditHead, VersionEncoder, linked_entries
from persistence.audit.trail import ENTRY_COLUMNS, HEAD_SQL, column_kinds
from persistence.db.engine import create_database
from persistence.db.rowcodec import DriverBatch
from persistence.db.schema import audit_log, trades
from persistence.migrations import upgrade
from persistence.observe.events import BatchCommitted
from persistence.records.models import Trade

T = TypeVar("T")
BASE = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
SYMBOLS = ("EURUSD", "GBPUSD", "USDJPY", "BTCUSD", "XAUUSD")
SESSIONS = ("TOKYO", "LONDON", "NY", "SYDNEY", "OVERLAP")
PATTERNS = ("breakout", "reversal", "flag", "wedge", "range")
BENCH_INSTANCE = "bench"
"""The instance id the ceilings write, so their rows are the rows the sidecar writes."""


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


def ms(seconds: float) -> str:
    """Seconds as milliseconds, for a figure's text."""
    return f"{seconds * 1000:.2f} ms"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) by the nearest-rank method."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def run(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]) -> T:
    return loop.run_until_complete(coroutine)


def bench_settings(database_url: str, journal_dir: Path, **overrides: Any) -> Settings:
    """A benchmark sidecar's settings: its journal and its audit checkpoints in the benchmark's own folder, never in
    the folder it was started from (the defaults' ``./data``)."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "journal_dir": journal_dir,
        "audit_anchor_dir": journal_dir.with_name(f"{journal_dir.name}-anchors"),
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def sqlite_settings(path: Path, **overrides: Any) -> Settings:
    return bench_settings(f"sqlite+aiosqlite:///{path}", path.parent / f"{path.stem}-journal", **overrides)


def persistence_off(path: Path) -> Settings:
    """A sidecar's settings with persistence switched off (``ENABLE_DATABASE_PERSISTENCE=false``): no engine, no
    thread, no file. A host loop run with it gives the machine's own stall floor beside a figure of the same run."""
    return sqlite_settings(path, enabled=False)


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
    gc.collect()  # as in user_burst: the earlier rounds' garbage is not the sidecar's
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
        rows = batch.encode([{**record.__dict__, "instance_id": BENCH_INSTANCE} for record in records])
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(batch.sql, rows)
        connection.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        connection.close()


TRADE_FIELDS = tuple(Trade.model_fields)


def same_work_sqlite(path: Path, count: int, prefix: str) -> float:
    """The SQLite same-work ceiling: the rows plus their audit entries in one transaction; seconds.

    Inside the timing, as for the sidecar: the rows encoded as the schema stores them, each version's canonical JSON
    (the project's :class:`VersionEncoder`, standard library only), the chain's head read, the entries hashed
    (:func:`~persistence.audit.chain.linked_entries`, each a record's first version, so the entries are the ones the
    sidecar writes, record links included), then one ``executemany`` of the rows and one of the entries between
    ``BEGIN IMMEDIATE`` and ``COMMIT``. The file must be migrated (``trades`` and ``audit_log`` exist).
    """
    records = [Trade.parse(trade_mapping(i, prefix)) for i in range(count)]
    dialect = sqlite_dialect.dialect(paramstyle="qmark")
    batch = DriverBatch(insert(trades), trades, dialect)
    entry_batch = DriverBatch(insert(audit_log), audit_log, dialect)
    encode = VersionEncoder(TRADE_FIELDS, column_kinds(trades)).encode
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        started = time.perf_counter()
        values = [{**record.__dict__, "instance_id": BENCH_INSTANCE} for record in records]
        rows = batch.encode(values)
        payloads = [("trade", value["trade_id"], encode(value), GENESIS) for value in values]  # new: first versions
        connection.execute("BEGIN IMMEDIATE")
        found = connection.execute(HEAD_SQL, (BENCH_INSTANCE,)).fetchall()
        head = AuditHead(BENCH_INSTANCE, int(found[0][0]), str(found[0][1])) if found else None
        entries = linked_entries(head, BENCH_INSTANCE, payloads, datetime.now(UTC))
        connection.executemany(batch.sql, rows)
        connection.executemany(entry_batch.sql, entry_batch.encode(entries))
        connection.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        connection.close()


async def same_work_postgres(database_url: str, count: int, prefix: str) -> float:
    """The PostgreSQL same-work ceiling: ``copy_records_to_table`` of the rows and of their audit entries in one
    transaction (head read in it, payloads and hashes computed inside the timing); seconds. ``trades`` is emptied
    before and after; ``audit_log`` is append-only, so each call writes a chain of its own (``bench-<prefix>``)."""
    columns, rows = pg_rows(count, prefix)
    encode = VersionEncoder(TRADE_FIELDS, column_kinds(trades)).encode
    records = [dict(zip(columns, row, strict=True)) for row in rows]
    connection = await pg_connect(database_url)
    try:
        instance = f"{BENCH_INSTANCE}-{prefix}"
        await connection.execute("TRUNCATE trades")
        started = time.perf_counter()
        async with connection.transaction():
            found = await connection.fetchrow(
                "SELECT seq, hash FROM audit_log WHERE instance_id = $1 ORDER BY seq DESC LIMIT 1", instance
            )
            head = AuditHead(instance, int(found[0]), str(found[1])) if found else None
            payloads = [("trade", str(record["trade_id"]), encode(record), GENESIS) for record in records]
            entries = linked_entries(head, instance, payloads, datetime.now(UTC))
            await connection.copy_records_to_table("trades", records=rows, columns=columns)
            await connection.copy_records_to_table(
                "audit_log",
                records=[tuple(entry[name] for name in ENTRY_COLUMNS) for entry in entries],
                columns=list(ENTRY_COLUMNS),
            )
        elapsed = time.perf_counter() - started
        await connection.execute("TRUNCATE trades")
        return elapsed
    finally:
        await connection.close()


async def user_burst(settings: Settings, count: int, prefix: str) -> tuple[list[float], float]:
    """The user's measurement of a burst: ``count`` trades recorded at once, each receipt awaited by the host.

    A record's latency runs from its own ``record_trade`` call to its receipt resolving, as a host awaiting it sees
    it (the task awaiting the receipt resumes). Default settings and logging: the sidecar is built as a host builds
    it. Returns the latencies and the wall time until the last receipt resolved.

    The earlier rounds' garbage is collected first: a host process does not carry a benchmark's leftovers, and a
    full collection walking them would land inside the burst in some rounds and not others.
    """
    gc.collect()
    async with PersistenceSidecar(settings) as sidecar:
        mappings = [trade_mapping(i, prefix) for i in range(count)]
        clock = time.perf_counter
        latencies = [math.nan] * count

        async def settle(index: int, started: float, receipt: Awaitable[object]) -> None:
            await receipt
            latencies[index] = clock() - started

        waiters = []
        first = clock()
        for index, mapping in enumerate(mappings):
            started = clock()
            receipt = sidecar.record_trade(mapping)
            waiters.append(settle(index, started, receipt))
        await asyncio.gather(*waiters)
        return latencies, clock() - first


async def user_steady(
    settings: Settings,
    count: int,
    rate: float,
    prefix: str,
    probe: LoopStallProbe | None = None,
    *,
    freeze: bool = False,
) -> list[float]:
    """``count`` trades at ``rate`` per second, each receipt awaited by its own task: the user's latencies.

    ``freeze``: the host calls ``gc.freeze()`` once the sidecar has started (and ``gc.unfreeze()`` at the end), so
    full collections no longer walk the start-up heap.
    """
    gc.collect()
    async with PersistenceSidecar(settings) as sidecar:
        if freeze:
            gc.collect()
            gc.freeze()
        if probe is not None:
            probe.start()
        clock = time.perf_counter
        latencies: list[float] = []
        tasks: list[asyncio.Task[None]] = []

        async def settle(started: float, receipt: Awaitable[object]) -> None:
            await receipt
            latencies.append(clock() - started)

        begin = clock()
        for i in range(count):
            delay = begin + i / rate - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            started = clock()
            receipt = sidecar.record_trade(trade_mapping(i, prefix))
            tasks.append(asyncio.ensure_future(settle(started, receipt)))
        await asyncio.gather(*tasks)
        if probe is not None:
            await probe.stop()
        if freeze:
            gc.unfreeze()
        return latencies


class LoopStallProbe:
    """A task sleeping 1 ms in a loop and recording how late it wakes: the host loop's stalls. The garbage collector's
    passes of the oldest generation are timed beside it (``gc.callbacks``, any thread), so a stall can be told apart
    from a full collection of the host's heap that happened inside it."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.overshoots: list[float] = []
        self.spans: list[tuple[float, float]] = []
        """Each wake-up's (start of the sleep, wake-up), beside :attr:`overshoots`."""
        self.full_collections: list[tuple[float, float]] = []
        """(start, end) of each collection of the oldest generation while probing."""
        self._task: asyncio.Task[None] | None = None
        self._collecting: float | None = None

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._collecting = time.perf_counter()
        elif self._collecting is not None:
            self.full_collections.append((self._collecting, time.perf_counter()))
            self._collecting = None

    def start(self) -> None:
        gc.callbacks.append(self._on_collection)
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        clock = time.perf_counter
        while True:
            before = clock()
            await asyncio.sleep(self.interval)
            after = clock()
            self.overshoots.append(after - before - self.interval)
            self.spans.append((before, after))

    async def stop(self) -> float:
        """Stop probing; returns the largest stall seen (seconds)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_collection)
        return self.largest

    @property
    def largest(self) -> float:
        return max(self.overshoots, default=0.0)

    @property
    def largest_without_a_full_collection(self) -> float:
        """The largest stall with no collection of the oldest generation inside it: what is left when the collector's
        passes over the host's heap are set aside."""
        return max(
            (
                overshoot
                for overshoot, (before, after) in zip(self.overshoots, self.spans, strict=True)
                if not any(start < after and end > before for start, end in self.full_collections)
            ),
            default=0.0,
        )

    def describe_collections(self) -> str:
        """The full collections seen, for a figure's baseline: how many, and the longest."""
        if not self.full_collections:
            return "no full collection while probing"
        longest = max(end - start for start, end in self.full_collections)
        return f"{len(self.full_collections)} full collections while probing, the longest {longest * 1000:.1f} ms"


TEXT_TABLE = "trades_text"


def create_text_table(path: Path) -> None:
    """A table with the trades table's columns as TEXT and the same unique key and indexes."""
    columns = [column.name for column in trades.c if column.name != "id"]
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        body = ", ".join(f"{name} TEXT" + (" NOT NULL UNIQUE" if name == "trade_id" else "") for name in columns)
        connection.execute(f"CREATE TABLE IF NOT EXISTS {TEXT_TABLE} (id INTEGER PRIMARY KEY, {body})")
        for index in trades.indexes:
            names = ", ".join(column.name for column in index.columns)
            connection.execute(f"CREATE INDEX IF NOT EXISTS {index.name}_text ON {TEXT_TABLE} ({names})")
    finally:
        connection.close()


def raw_text_executemany(path: Path, count: int, prefix: str) -> float:
    """The text ceiling: the same values as plain text (converted before the timing), one executemany."""
    create_text_table(path)
    columns = [column.name for column in trades.c if column.name != "id"]
    rows = []
    for i in range(count):
        mapping = {**trade_mapping(i, prefix), "instance_id": BENCH_INSTANCE}
        rows.append(tuple(None if mapping.get(name) is None else str(mapping[name]) for name in columns))
    sql = f"INSERT INTO {TEXT_TABLE} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        started = time.perf_counter()
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(sql, rows)
        connection.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        connection.close()


async def pg_connect(database_url: str) -> asyncpg.Connection:
    url = make_url(database_url)
    return await asyncpg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        database=url.database,
    )


def pg_rows(count: int, prefix: str) -> tuple[list[str], list[tuple[object, ...]]]:
    """The rows of ``count`` validated trades, as asyncpg takes them (Decimal, aware datetime, str)."""
    columns = [column.name for column in trades.c if column.name != "id"]
    rows = []
    for i in range(count):
        values = {**Trade.parse(trade_mapping(i, prefix)).__dict__, "instance_id": BENCH_INSTANCE}
        rows.append(tuple(values[name] for name in columns))
    return columns, rows


async def pg_ceilings(database_url: str, count: int, prefix: str) -> tuple[float, float]:
    """PostgreSQL ceilings for ``count`` rows into ``trades``: (COPY seconds, executemany seconds), each one
    transaction, the table emptied before each."""
    columns, rows = pg_rows(count, prefix)
    insert_sql = (
        f"INSERT INTO trades ({', '.join(columns)}) VALUES ({', '.join(f'${n + 1}' for n in range(len(columns)))})"
    )
    connection = await pg_connect(database_url)
    try:
        await connection.execute("TRUNCATE trades")
        started = time.perf_counter()
        async with connection.transaction():
            await connection.copy_records_to_table("trades", records=rows, columns=columns)
        copy = time.perf_counter() - started
        await connection.execute("TRUNCATE trades")
        started = time.perf_counter()
        async with connection.transaction():
            await connection.executemany(insert_sql, rows)
        many = time.perf_counter() - started
        await connection.execute("TRUNCATE trades")
        return copy, many
    finally:
        await connection.close()


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started
