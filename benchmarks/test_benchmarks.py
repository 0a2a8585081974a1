"""The SPEC's performance figures, each against baselines measured in the same run (``make bench``)."""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import statistics
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from benchmarks.harness import (
    LatencyProbe,
    migrated,
    naive_burst,
    percentile,
    raw_executemany,
    run,
    sidecar_burst,
    sqlite_settings,
    trade_mapping,
)
from persistence import PersistenceSidecar, Settings
from persistence.db import create_database
from persistence.history import TradeHistory
from persistence.models import Trade
from persistence.repositories import Repositories

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
POSTGRES_URL = os.environ.get("PERSISTENCE_TEST_POSTGRES_URL")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def test_burst_of_1000_trades_p95_against_naive_and_ceiling(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    p95s: list[float] = []
    naive_p95s: list[float] = []
    ceilings: list[float] = []
    counter = iter(range(10_000))

    def one_round() -> None:
        n = next(counter)
        settings = sqlite_settings(tmp_path / f"burst-{n}.db")
        run(loop, migrated(settings))
        latencies, _ = run(loop, sidecar_burst(settings, 1000, f"S{n}"))
        assert len(latencies) == 1000
        p95s.append(percentile(latencies, 95))
        naive_settings = sqlite_settings(tmp_path / f"naive-{n}.db")
        run(loop, migrated(naive_settings))
        naive_latencies, _ = run(loop, naive_burst(naive_settings, 1000, f"N{n}"))
        naive_p95s.append(percentile(naive_latencies, 95))
        raw_settings = sqlite_settings(tmp_path / f"raw-{n}.db")
        run(loop, migrated(raw_settings))
        ceilings.append(raw_executemany(tmp_path / f"raw-{n}.db", 1000, f"R{n}"))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    p95, naive, ceiling = statistics.median(p95s), statistics.median(naive_p95s), statistics.median(ceilings)
    benchmark.extra_info.update(p95_ms=p95 * 1000, naive_p95_ms=naive * 1000, raw_ms=ceiling * 1000)
    figures.append(
        {
            "figure": "burst of 1000 trades: p95 record→commit (SQLite)",
            "target": "< 100 ms required, ≤ 25 ms target",
            "measured": ms(p95),
            "baseline": f"naive ORM commit per trade p95 {ms(naive)}; raw executemany of all 1000: {ms(ceiling)}",
            "ratio": f"{naive / p95:.0f}× faster than naive; {p95 / ceiling:.1f}× the raw ceiling",
        }
    )
    assert p95 < 0.100


def test_steady_1000_trades_per_second_p95(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    p95s: list[float] = []
    frozen_p95s: list[float] = []
    counter = iter(range(10_000))

    async def steady(settings: Settings, prefix: str, rate: int, seconds: float, freeze: bool = False) -> list[float]:
        async with PersistenceSidecar(settings, log_events=False) as sidecar:
            probe = LatencyProbe(sidecar)
            if freeze:  # what the README suggests a host do once it has started: keep its heap out of full collections
                gc.collect()
                gc.freeze()
            start = time.perf_counter()
            total = int(rate * seconds)
            for i in range(total):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sidecar.record_trade(trade_mapping(i, prefix))
            await sidecar.flush(timeout=60)
            return probe.latencies

    def one_round() -> None:
        n = next(counter)
        settings = sqlite_settings(tmp_path / f"steady-{n}.db")
        run(loop, migrated(settings))
        latencies = run(loop, steady(settings, f"T{n}", 1000, 3.0))
        p95s.append(percentile(latencies, 95))
        settings = sqlite_settings(tmp_path / f"steady-frozen-{n}.db")
        run(loop, migrated(settings))
        try:
            latencies = run(loop, steady(settings, f"F{n}", 1000, 3.0, freeze=True))
        finally:
            gc.unfreeze()
        frozen_p95s.append(percentile(latencies, 95))

    benchmark.pedantic(one_round, rounds=max(ROUNDS // 2, 3), iterations=1)
    p95, frozen = statistics.median(p95s), statistics.median(frozen_p95s)
    benchmark.extra_info.update(p95_ms=p95 * 1000, frozen_p95_ms=frozen * 1000)
    figures.append(
        {
            "figure": "steady 1000 trades/s for 3 s: p95 record→commit (SQLite)",
            "target": "≤ 5 ms",
            "measured": ms(p95),
            "baseline": f"same, the host's heap frozen after start-up (gc.freeze()): p95 {ms(frozen)}",
        }
    )


def test_record_trade_hot_path_p50_p99(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    settings = sqlite_settings(tmp_path / "hot.db")
    run(loop, migrated(settings))
    samples: list[float] = []
    counter = iter(range(1_000_000))

    async def measure() -> None:
        async with PersistenceSidecar(settings, log_events=False) as sidecar:
            for _ in range(5):
                mappings = [trade_mapping(next(counter), "H") for _ in range(2000)]
                clock = time.perf_counter_ns
                record = sidecar.record_trade
                for mapping in mappings:
                    started = clock()
                    record(mapping)
                    samples.append((clock() - started) / 1e9)
                await sidecar.flush(timeout=60)

    benchmark.pedantic(lambda: run(loop, measure()), rounds=max(ROUNDS // 2, 2), iterations=1)
    p50, p99 = percentile(samples, 50), percentile(samples, 99)
    with_gc = list(samples)
    samples.clear()
    gc.collect()
    gc.disable()  # the same calls without the collector's pauses: what the tail owes to GC
    try:
        run(loop, measure())
    finally:
        gc.enable()
    p99_no_gc = percentile(samples, 99)
    samples.clear()
    thresholds = gc.get_threshold()
    gc.collect()
    gc.set_threshold(10_000, *thresholds[1:])  # a host that collects its youngest generation less often
    try:
        run(loop, measure())
    finally:
        gc.set_threshold(*thresholds)
    p99_tuned, p999_tuned = percentile(samples, 99), percentile(samples, 99.9)
    benchmark.extra_info.update(p50_us=p50 * 1e6, p99_us=p99 * 1e6, p99_no_gc_us=p99_no_gc * 1e6)
    figures.append(
        {
            "figure": "record_trade on the event loop (validation included)",
            "target": "p99 ≤ 50 µs",
            "measured": (
                f"p50 {p50 * 1e6:.1f} µs, p99 {p99 * 1e6:.1f} µs, p99.9 {percentile(with_gc, 99.9) * 1e6:.0f} µs "
                f"({len(with_gc)} calls)"
            ),
            "baseline": (
                f"the garbage collector off: p99 {p99_no_gc * 1e6:.1f} µs; gc.set_threshold(10000): "
                f"p99 {p99_tuned * 1e6:.1f} µs, p99.9 {p999_tuned * 1e6:.0f} µs"
            ),
        }
    )


def test_sustained_throughput_against_raw_executemany(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    count = 50_000
    rates: list[float] = []
    ceilings: list[float] = []
    counter = iter(range(10_000))

    async def sustained(settings: Settings, prefix: str) -> float:
        mappings = [trade_mapping(i, prefix) for i in range(count)]
        async with PersistenceSidecar(settings, log_events=False) as sidecar:
            started = time.perf_counter()
            for offset in range(0, count, 500):
                for mapping in mappings[offset : offset + 500]:
                    sidecar.record_trade(mapping)
                await asyncio.sleep(0)
            await sidecar.flush(timeout=300)
            return count / (time.perf_counter() - started)

    def one_round() -> None:
        n = next(counter)
        settings = sqlite_settings(tmp_path / f"sustained-{n}.db")
        run(loop, migrated(settings))
        rates.append(run(loop, sustained(settings, f"U{n}")))
        raw = sqlite_settings(tmp_path / f"ceiling-{n}.db")
        run(loop, migrated(raw))
        ceilings.append(count / raw_executemany(tmp_path / f"ceiling-{n}.db", count, f"C{n}"))

    benchmark.pedantic(one_round, rounds=max(ROUNDS // 2, 2), iterations=1)
    rate, ceiling = statistics.median(rates), statistics.median(ceilings)
    benchmark.extra_info.update(records_per_s=rate, ceiling_per_s=ceiling)
    figures.append(
        {
            "figure": "sustained throughput, 50,000 trades recorded and committed (SQLite)",
            "target": "≥ 50 % of raw executemany",
            "measured": f"{rate:,.0f} trades/s",
            "baseline": f"raw sqlite3.executemany, one transaction (incl. encoding): {ceiling:,.0f} trades/s",
            "ratio": f"{rate / ceiling:.0%} of the ceiling",
        }
    )


def test_start_up_with_10000_trades_loads_history(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    settings = sqlite_settings(tmp_path / "startup.db")

    async def seed() -> None:
        async with PersistenceSidecar(settings, log_events=False) as sidecar:
            for i in range(10_000):
                sidecar.record_trade(trade_mapping(i, "ST"))
            await sidecar.flush(timeout=60)

    run(loop, seed())
    durations: list[float] = []

    async def start_once() -> None:
        sidecar = PersistenceSidecar(settings, log_events=False)
        # A host starts the sidecar once, in a young process. Here the earlier rounds' sidecars (10,000 records each)
        # are still garbage waiting for the collector, whose full pass would otherwise land inside the timing.
        gc.collect()
        started = time.perf_counter()
        await sidecar.start()
        durations.append(time.perf_counter() - started)
        assert len(sidecar.trade_history) == 10_000
        await sidecar.close()

    benchmark.pedantic(lambda: run(loop, start_once()), rounds=ROUNDS, iterations=1)
    median = statistics.median(durations)
    figures.append(
        {
            "figure": "start-up with 10,000 trades in the DB (migrations check + history load)",
            "target": "≤ 0.2 s (requirement 2 s)",
            "measured": ms(median),
        }
    )


def test_filtered_history_queries_over_100000_trades(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    settings = sqlite_settings(tmp_path / "queries.db")
    run(loop, migrated(settings))

    async def seed() -> None:
        database = create_database(settings)
        repos = Repositories(database)
        try:
            for offset in range(0, 100_000, 5000):
                batch = [Trade.parse(trade_mapping(i, "Q")) for i in range(offset, offset + 5000)]
                async with database.write() as connection:
                    await repos.trades.upsert(connection, batch)
        finally:
            await database.dispose()

    run(loop, seed())
    samples: list[float] = []
    by_query: dict[int, list[float]] = {}
    queries = [
        {"symbol": "EURUSD", "limit": 100},
        {"session": "LONDON", "sort_by": "pnl", "sort_order": "desc", "limit": 100},
        {"pattern_type": "flag", "start_date": "2026-01-05T12:00:00Z", "end_date": "2026-01-06T12:00:00Z"},
        {"symbol": "BTCUSD", "session": "SYDNEY", "sort_by": "entry_time", "sort_order": "asc", "offset": 500},
        {"start_date": "2026-01-05T09:00:00Z", "end_date": "2026-01-05T10:00:00Z", "sort_by": "pnl", "limit": 1000},
    ]

    raw_samples: list[float] = []
    raw_by_query: dict[int, list[float]] = {}

    async def measure() -> None:
        from datetime import datetime

        database = create_database(settings)
        repos = Repositories(database)
        sent: list[tuple[str, Any]] = []

        def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
            if statement.startswith("SELECT"):
                sent.append((statement, parameters))

        event.listen(database.engine.sync_engine, "before_cursor_execute", capture)
        # The ceiling of each shape: the same SQL and parameters through raw sqlite3, rows fetched, nothing decoded.
        raw = sqlite3.connect(settings.url.database or "")
        raw.execute(f"PRAGMA cache_size=-{settings.sqlite_cache_mib * 1024}")
        try:
            # One untimed pass first: a running service queries through warm connections (SQLite's page cache is
            # per connection, and a new engine starts with none).
            for iteration in range(11):
                for number, query in enumerate(queries):
                    arguments = {
                        key: datetime.fromisoformat(value) if key.endswith("_date") else value
                        for key, value in query.items()
                    }
                    sent.clear()
                    started = time.perf_counter()
                    page = await repos.trades.query(**arguments)
                    elapsed = time.perf_counter() - started
                    assert page.items
                    [(statement, parameters)] = sent
                    started = time.perf_counter()
                    rows = raw.execute(statement, parameters).fetchall()
                    raw_elapsed = time.perf_counter() - started
                    assert len(rows) == len(page.items)
                    if iteration:
                        samples.append(elapsed)
                        by_query.setdefault(number, []).append(elapsed)
                        raw_samples.append(raw_elapsed)
                        raw_by_query.setdefault(number, []).append(raw_elapsed)
        finally:
            raw.close()
            await database.dispose()

    benchmark.pedantic(lambda: run(loop, measure()), rounds=max(ROUNDS // 2, 2), iterations=1)
    p95, raw_p95 = percentile(samples, 95), percentile(raw_samples, 95)
    slowest = max(by_query, key=lambda number: statistics.median(by_query[number]))
    slowest_median = statistics.median(by_query[slowest])
    slowest_raw = statistics.median(raw_by_query[slowest])
    figures.append(
        {
            "figure": "filtered history queries over 100,000 trades: p95 (SQLite)",
            "target": "≤ 20 ms (requirement 500 ms)",
            "measured": f"{ms(p95)} (p50 {ms(percentile(samples, 50))})",
            "baseline": (
                f"the same SQL through raw sqlite3, rows not decoded: p95 {ms(raw_p95)}; slowest shape "
                f"{queries[slowest]}: median {ms(slowest_median)}, raw {ms(slowest_raw)}"
            ),
            "ratio": f"p95 {p95 / raw_p95:.1f}× the raw query",
        }
    )


def test_memory_per_10000_trades_in_trade_history(benchmark: Any, figures: list[dict[str, Any]]) -> None:
    sizes: list[int] = []

    def one_round() -> None:
        trades = [Trade.parse(trade_mapping(i, "M")) for i in range(10_000)]
        gc.collect()
        tracemalloc.start()
        history = TradeHistory(10_000)
        for trade in trades:
            history.record(trade)
        container = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del history
        gc.collect()
        tracemalloc.start()
        again = [Trade.parse(trade_mapping(i, "M2")) for i in range(10_000)]
        records = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del again
        sizes.append(container + records)

    benchmark.pedantic(one_round, rounds=3, iterations=1)
    size = statistics.median(sizes)
    figures.append(
        {
            "figure": "memory per 10,000 trades in trade_history (records + index)",
            "target": "—",
            "measured": f"{size / 1024 / 1024:.1f} MiB ({size / 10_000:,.0f} bytes per trade)",
        }
    )


@pytest.mark.skipif(not POSTGRES_URL, reason="PERSISTENCE_TEST_POSTGRES_URL is not set")
def test_postgres_burst_and_throughput(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    from tests.conftest import create_postgres_database, drop_postgres_database

    p95s: list[float] = []
    rates: list[float] = []
    naive_p95s: list[float] = []

    def one_round() -> None:
        url = create_postgres_database("persistence_bench")
        try:
            settings = Settings(_env_file=None, database_url=url, journal_dir=tmp_path / "pg-journal")
            run(loop, migrated(settings))
            latencies, _ = run(loop, sidecar_burst(settings, 1000, "PGB"))
            p95s.append(percentile(latencies, 95))
            naive_latencies, _ = run(loop, naive_burst(settings, 1000, "PGN"))
            naive_p95s.append(percentile(naive_latencies, 95))
            _, elapsed = run(loop, sidecar_burst(settings, 20_000, "PGT"))
            rates.append(20_000 / elapsed)
        finally:
            drop_postgres_database(url)

    benchmark.pedantic(one_round, rounds=max(ROUNDS // 2, 2), iterations=1)
    p95, naive, rate = statistics.median(p95s), statistics.median(naive_p95s), statistics.median(rates)
    figures.append(
        {
            "figure": "PostgreSQL: burst of 1000 p95, and 20,000-trade throughput",
            "target": "p95 < 100 ms",
            "measured": f"p95 {ms(p95)}; {rate:,.0f} trades/s",
            "baseline": f"naive ORM commit per trade p95 {ms(naive)}",
            "ratio": f"{naive / p95:.0f}× faster than naive",
        }
    )
