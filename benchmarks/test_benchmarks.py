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
    LoopStallProbe,
    bench_settings,
    migrated,
    ms,
    naive_burst,
    percentile,
    persistence_off,
    pg_ceilings,
    pg_connect,
    raw_executemany,
    raw_text_executemany,
    run,
    same_work_postgres,
    same_work_sqlite,
    sidecar_burst,
    sqlite_settings,
    trade_mapping,
    user_burst,
    user_steady,
)
from persistence import PersistenceSidecar, Settings
from persistence.db.engine import create_database
from persistence.records.history import TradeHistory
from persistence.records.models import Trade
from persistence.tables.repositories import Repositories

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
POSTGRES_URL = os.environ.get("PERSISTENCE_TEST_POSTGRES_URL")


def test_burst_of_1000_trades_p95_against_naive_and_ceiling(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    user_p95s: list[float] = []
    p95s: list[float] = []
    naive_p95s: list[float] = []
    ceilings: list[float] = []
    text_ceilings: list[float] = []
    same_work: list[float] = []
    counter = iter(range(10_000))

    def one_round() -> None:
        n = next(counter)
        work = sqlite_settings(tmp_path / f"work-{n}.db")
        run(loop, migrated(work))
        same_work.append(same_work_sqlite(tmp_path / f"work-{n}.db", 1000, f"W{n}"))
        settings = sqlite_settings(tmp_path / f"user-{n}.db")
        run(loop, migrated(settings))
        latencies, _ = run(loop, user_burst(settings, 1000, f"U{n}"))
        user_p95s.append(percentile(latencies, 95))
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
        text_ceilings.append(raw_text_executemany(tmp_path / f"text-{n}.db", 1000, f"X{n}"))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    user, p95, naive = statistics.median(user_p95s), statistics.median(p95s), statistics.median(naive_p95s)
    ceiling, text_ceiling = statistics.median(ceilings), statistics.median(text_ceilings)
    work = statistics.median(same_work)
    work_ratios = [u / w for u, w in zip(user_p95s, same_work, strict=True)]
    benchmark.extra_info.update(user_p95_ms=user * 1000, p95_ms=p95 * 1000, raw_ms=ceiling * 1000)
    figures.append(
        {
            "figure": "burst of 1000 trades: p95 record call → receipt, as a user measures (SQLite)",
            "target": "< 100 ms required; ≤ 1.5× the same-work ceiling and < 50 ms",
            "measured": f"{ms(user)} (record → commit, internal: {ms(p95)})",
            "baseline": (
                f"same-work ceiling (raw executemany of the 1000 rows and their audit entries, one transaction): "
                f"{ms(work)}; rows only: {ms(ceiling)}; text ceiling: {ms(text_ceiling)}; "
                f"naive ORM commit per trade p95 {ms(naive)}"
            ),
            "ratio": (
                f"{user / work:.1f}× the same-work ceiling (round by round: "
                f"{', '.join(f'{r:.1f}×' for r in work_ratios)}), {user / ceiling:.1f}× the rows-only ceiling, "
                f"{user / text_ceiling:.1f}× the text ceiling; {naive / user:.0f}× faster than naive"
            ),
            "values": {
                "same_work_ceiling_ms": work * 1000,
                "ratio_to_same_work_ceiling": user / work,
                "same_work_ceiling_ms_per_round": [value * 1000 for value in same_work],
                "ratio_to_same_work_per_round": work_ratios,
                "user_p95_ms": user * 1000,
                "internal_p95_ms": p95 * 1000,
                "same_schema_ceiling_ms": ceiling * 1000,
                "text_ceiling_ms": text_ceiling * 1000,
                "naive_p95_ms": naive * 1000,
                "ratio_to_same_schema_ceiling": user / ceiling,
                "ratio_to_text_ceiling": user / text_ceiling,
                "user_p95_ms_per_round": [value * 1000 for value in user_p95s],
                "same_schema_ceiling_ms_per_round": [value * 1000 for value in ceilings],
            },
        }
    )
    assert user < 0.100


def test_steady_1000_trades_per_second_p95(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    user_p95s: list[float] = []
    p95s: list[float] = []
    frozen_p95s: list[float] = []
    stalls: list[float] = []
    frozen_user_p95s: list[float] = []
    frozen_stalls: list[float] = []
    off_stalls: list[float] = []  # the machine's own floor: the same host loop with persistence off
    off_apart: list[float] = []
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
        settings = sqlite_settings(tmp_path / f"steady-user-{n}.db")
        run(loop, migrated(settings))
        probe = LoopStallProbe()
        latencies = run(loop, user_steady(settings, 3000, 1000, f"V{n}", probe))
        user_p95s.append(percentile(latencies, 95))
        stalls.append(probe.largest)
        settings = sqlite_settings(tmp_path / f"steady-user-frozen-{n}.db")
        run(loop, migrated(settings))
        probe = LoopStallProbe()
        latencies = run(loop, user_steady(settings, 3000, 1000, f"W{n}", probe, freeze=True))
        frozen_user_p95s.append(percentile(latencies, 95))
        frozen_stalls.append(probe.largest)
        probe = LoopStallProbe()
        run(loop, user_steady(persistence_off(tmp_path / f"steady-off-{n}.db"), 3000, 1000, f"X{n}", probe))
        off_stalls.append(probe.largest)
        off_apart.append(probe.largest_without_a_full_collection)
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
    user, p95, frozen = statistics.median(user_p95s), statistics.median(p95s), statistics.median(frozen_p95s)
    stall, frozen_stall = statistics.median(stalls), statistics.median(frozen_stalls)
    frozen_user = statistics.median(frozen_user_p95s)
    benchmark.extra_info.update(user_p95_ms=user * 1000, p95_ms=p95 * 1000, frozen_p95_ms=frozen * 1000)
    figures.append(
        {
            "figure": "steady 1000 trades/s for 3 s: p95 record call → receipt (SQLite)",
            "target": "≤ 5 ms",
            "measured": f"{ms(user)} (record → commit, internal: {ms(p95)})",
            "baseline": (
                f"the host's heap frozen after start-up (gc.freeze()): {ms(frozen_user)} (internal {ms(frozen)})"
            ),
            "values": {
                "user_p95_ms": user * 1000,
                "internal_p95_ms": p95 * 1000,
                "frozen_user_p95_ms": frozen_user * 1000,
                "frozen_internal_p95_ms": frozen * 1000,
            },
        }
    )
    figures.append(
        {
            "figure": "largest loop stall during a steady 1000 trades/s (1 ms sleeper's overshoot)",
            "target": "≤ 5 ms",
            "measured": ms(stall),
            "baseline": (
                f"per round: {', '.join(ms(value) for value in stalls)}; the host's heap frozen after start-up: "
                f"{ms(frozen_stall)} ({', '.join(ms(value) for value in frozen_stalls)}); the same host loop with "
                f"persistence off (the machine's floor): {ms(statistics.median(off_stalls))} "
                f"({', '.join(ms(value) for value in off_stalls)}; with no full collection inside: "
                f"{', '.join(ms(value) for value in off_apart)})"
            ),
            "values": {
                "largest_stall_ms": stall * 1000,
                "per_round_ms": [value * 1000 for value in stalls],
                "frozen_largest_stall_ms": frozen_stall * 1000,
                "frozen_per_round_ms": [value * 1000 for value in frozen_stalls],
                "persistence_off_largest_stall_ms": statistics.median(off_stalls) * 1000,
                "persistence_off_per_round_ms": [value * 1000 for value in off_stalls],
                "persistence_off_without_a_full_collection_ms": [value * 1000 for value in off_apart],
            },
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
            "target": "p50 ≤ 10 µs, p99 ≤ 30 µs (default GC)",
            "measured": (
                f"p50 {p50 * 1e6:.1f} µs, p99 {p99 * 1e6:.1f} µs, p99.9 {percentile(with_gc, 99.9) * 1e6:.0f} µs "
                f"({len(with_gc)} calls)"
            ),
            "baseline": (
                f"the garbage collector off: p99 {p99_no_gc * 1e6:.1f} µs; gc.set_threshold(10000): "
                f"p99 {p99_tuned * 1e6:.1f} µs, p99.9 {p999_tuned * 1e6:.0f} µs"
            ),
            "values": {
                "p50_us": p50 * 1e6,
                "p99_us": p99 * 1e6,
                "p999_us": percentile(with_gc, 99.9) * 1e6,
                "p99_gc_off_us": p99_no_gc * 1e6,
                "p99_gc_threshold_10000_us": p99_tuned * 1e6,
            },
        }
    )


def test_validation_side_by_side(benchmark: Any, figures: list[dict[str, Any]]) -> None:
    """Trade.parse (the compiled fast path) beside the pydantic model alone and msgspec, on the same mappings."""
    mappings = [trade_mapping(i, "VAL") for i in range(2000)]
    journal_form = [Trade.parse(mapping).to_json() for mapping in mappings]
    cases: dict[str, Any] = {
        "parse": lambda: [Trade.parse(mapping) for mapping in mappings],
        "pydantic": lambda: [Trade.model_validate(mapping) for mapping in mappings],
        "parse_json_form": lambda: [Trade.parse(data) for data in journal_form],
        "pydantic_json_form": lambda: [Trade.model_validate(data) for data in journal_form],
    }
    try:  # not a dependency of the project: measured when installed (pip install msgspec)
        import msgspec

        from benchmarks.validators import MsgspecTrade

        cases["msgspec"] = lambda: [msgspec.convert(mapping, MsgspecTrade) for mapping in mappings]
    except ImportError:
        pass
    timings: dict[str, list[float]] = {name: [] for name in cases}

    def one_round() -> None:
        for name, case in cases.items():  # interleaved, so the machine's drift touches every case alike
            started = time.perf_counter()
            case()
            timings[name].append((time.perf_counter() - started) / len(mappings))

    benchmark.pedantic(one_round, rounds=max(ROUNDS * 2, 7), iterations=1)
    us = {name: statistics.median(values) * 1e6 for name, values in timings.items()}
    figures.append(
        {
            "figure": "validation of one trade mapping, side by side (median µs per trade)",
            "target": "—",
            "measured": f"Trade.parse {us['parse']:.2f} µs; journal (JSON) form {us['parse_json_form']:.2f} µs",
            "baseline": (
                f"the pydantic model alone (the previous path): {us['pydantic']:.2f} µs, JSON form "
                f"{us['pydantic_json_form']:.2f} µs; msgspec.convert to a Struct with types and lengths only (no "
                f"8-place check, no quantize, no UTC, no NUL check): "
                + (f"{us['msgspec']:.2f} µs" if "msgspec" in us else "not installed")
            ),
            "ratio": f"{us['pydantic'] / us['parse']:.1f}× faster than the pydantic model",
            "values": {f"{name}_us": value for name, value in us.items()},
        }
    )


def test_sustained_throughput_against_raw_executemany(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    count = 50_000
    rates: list[float] = []
    same_work: list[float] = []
    ceilings: list[float] = []
    text_ceilings: list[float] = []
    counter = iter(range(10_000))

    async def sustained(settings: Settings, prefix: str) -> float:
        mappings = [trade_mapping(i, prefix) for i in range(count)]
        async with PersistenceSidecar(settings) as sidecar:
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
        text_ceilings.append(count / raw_text_executemany(tmp_path / f"text-{n}.db", count, f"X{n}"))
        work = sqlite_settings(tmp_path / f"work-{n}.db")
        run(loop, migrated(work))
        same_work.append(count / same_work_sqlite(tmp_path / f"work-{n}.db", count, f"W{n}"))

    benchmark.pedantic(one_round, rounds=max(ROUNDS // 2, 3), iterations=1)
    rate, ceiling, text_ceiling = (
        statistics.median(rates),
        statistics.median(ceilings),
        statistics.median(text_ceilings),
    )
    work = statistics.median(same_work)
    benchmark.extra_info.update(records_per_s=rate, ceiling_per_s=ceiling)
    figures.append(
        {
            "figure": "sustained throughput, 50,000 trades recorded and committed (SQLite)",
            "target": "≥ 50 % of the same-work ceiling",
            "measured": f"{rate:,.0f} trades/s",
            "baseline": (
                f"same-work ceiling (rows and audit entries, raw executemany, one transaction): {work:,.0f} trades/s; "
                f"rows only (raw sqlite3.executemany incl. encoding): {ceiling:,.0f} trades/s; "
                f"text ceiling: {text_ceiling:,.0f} trades/s"
            ),
            "ratio": (
                f"{rate / work:.0%} of the same-work ceiling; {rate / ceiling:.0%} of the rows-only ceiling, "
                f"{rate / text_ceiling:.0%} of the text ceiling"
            ),
            "values": {
                "same_work_ceiling_per_s": work,
                "share_of_same_work_ceiling": rate / work,
                "same_work_per_round": same_work,
                "trades_per_s": rate,
                "same_schema_ceiling_per_s": ceiling,
                "text_ceiling_per_s": text_ceiling,
                "share_of_same_schema_ceiling": rate / ceiling,
                "share_of_text_ceiling": rate / text_ceiling,
                "per_round": [
                    {"rate": r, "ceiling": c, "text": t} for r, c, t in zip(rates, ceilings, text_ceilings, strict=True)
                ],
            },
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

    raw_reads: list[float] = []
    checks: list[float] = []

    def raw_read() -> None:
        # The ceiling: the same rows read by raw sqlite3 (the history query, nothing decoded) plus Alembic's check.
        started = time.perf_counter()
        run(loop, migrated(settings))
        checks.append(time.perf_counter() - started)
        connection = sqlite3.connect(settings.url.database or "")
        try:
            started = time.perf_counter()
            rows = connection.execute(
                "SELECT * FROM trades ORDER BY updated_at DESC, id DESC LIMIT ?", (settings.history_max,)
            ).fetchall()
            raw_reads.append(time.perf_counter() - started)
            assert len(rows) == 10_000
        finally:
            connection.close()

    def one_round() -> None:
        run(loop, start_once())
        raw_read()

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    median = statistics.median(durations)
    ceiling = statistics.median(raw_reads) + statistics.median(checks)
    figures.append(
        {
            "figure": "start-up with 10,000 trades in the DB (migrations check + history load)",
            "target": "≤ 1.5× a raw sqlite3 read of the same rows plus Alembic's check (requirement 2 s)",
            "measured": ms(median),
            "baseline": (
                f"raw read {ms(statistics.median(raw_reads))} + Alembic's check {ms(statistics.median(checks))}"
            ),
            "ratio": f"{median / ceiling:.1f}× the raw read plus the check",
            "values": {
                "start_up_ms": median * 1000,
                "raw_read_ms": statistics.median(raw_reads) * 1000,
                "alembic_check_ms": statistics.median(checks) * 1000,
                "ratio": median / ceiling,
            },
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
    queries: list[dict[str, Any]] = [
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
                    arguments: dict[str, Any] = {
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
            "target": "≤ 1.2× the raw query (requirement 500 ms)",
            "measured": f"{ms(p95)} (p50 {ms(percentile(samples, 50))})",
            "baseline": (
                f"the same SQL through raw sqlite3, rows not decoded: p95 {ms(raw_p95)}; slowest shape "
                f"{queries[slowest]}: median {ms(slowest_median)}, raw {ms(slowest_raw)}"
            ),
            "ratio": f"p95 {p95 / raw_p95:.1f}× the raw query",
            "values": {"p95_ms": p95 * 1000, "raw_p95_ms": raw_p95 * 1000, "ratio": p95 / raw_p95},
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
            "values": {"bytes_per_trade": size / 10_000},
        }
    )


@pytest.mark.skipif(not POSTGRES_URL, reason="PERSISTENCE_TEST_POSTGRES_URL is not set")
def test_postgres_burst_and_throughput(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    from tests.support.databases import create_postgres_database, drop_postgres_database

    user_p95s: list[float] = []
    p95s: list[float] = []
    rates: list[float] = []
    naive_p95s: list[float] = []
    copies: list[float] = []
    manys: list[float] = []
    copy_rates: list[float] = []
    many_rates: list[float] = []
    works: list[float] = []
    work_rates: list[float] = []
    counter = iter(range(10_000))

    def one_round() -> None:
        n = next(counter)
        url = create_postgres_database("persistence_bench")
        try:
            settings = bench_settings(url, tmp_path / f"pg-journal-{n}")
            run(loop, migrated(settings))
            latencies, _ = run(loop, user_burst(settings, 1000, f"PGU{n}"))
            user_p95s.append(percentile(latencies, 95))
            latencies, _ = run(loop, sidecar_burst(settings, 1000, f"PGB{n}"))
            p95s.append(percentile(latencies, 95))
            naive_latencies, _ = run(loop, naive_burst(settings, 1000, f"PGN{n}"))
            naive_p95s.append(percentile(naive_latencies, 95))
            _, elapsed = run(loop, sidecar_burst(settings, 20_000, f"PGT{n}"))
            rates.append(20_000 / elapsed)
            copy, many = run(loop, pg_ceilings(url, 1000, f"PGC{n}"))  # empties trades before each ceiling
            copies.append(copy)
            manys.append(many)
            copy, many = run(loop, pg_ceilings(url, 20_000, f"PGR{n}"))
            copy_rates.append(20_000 / copy)
            many_rates.append(20_000 / many)
            works.append(run(loop, same_work_postgres(url, 1000, f"PGW{n}")))
            work_rates.append(20_000 / run(loop, same_work_postgres(url, 20_000, f"PGX{n}")))
        finally:
            drop_postgres_database(url)

    benchmark.pedantic(one_round, rounds=max(ROUNDS // 2, 3), iterations=1)
    user, p95, naive = statistics.median(user_p95s), statistics.median(p95s), statistics.median(naive_p95s)
    copy, many = statistics.median(copies), statistics.median(manys)
    rate, copy_rate, many_rate = statistics.median(rates), statistics.median(copy_rates), statistics.median(many_rates)
    work, work_rate = statistics.median(works), statistics.median(work_rates)
    figures.append(
        {
            "figure": "PostgreSQL: burst of 1000 trades, p95 record call → receipt",
            "target": "< 100 ms required; ≤ 1.5× the same-work ceiling and < 50 ms",
            "measured": f"{ms(user)} (record → commit, internal: {ms(p95)})",
            "baseline": (
                f"same-work ceiling (asyncpg COPY of the 1000 rows and of their audit entries, one transaction): "
                f"{ms(work)}; COPY of the rows only: {ms(copy)}; asyncpg executemany: {ms(many)}; "
                f"naive ORM commit per trade p95 {ms(naive)}"
            ),
            "ratio": (
                f"{user / work:.1f}× the same-work ceiling, {user / copy:.1f}× the rows-only COPY; "
                f"{naive / user:.0f}× faster than naive"
            ),
            "values": {
                "same_work_ceiling_ms": work * 1000,
                "ratio_to_same_work_ceiling": user / work,
                "same_work_ceiling_ms_per_round": [value * 1000 for value in works],
                "user_p95_ms": user * 1000,
                "internal_p95_ms": p95 * 1000,
                "copy_ceiling_ms": copy * 1000,
                "executemany_ceiling_ms": many * 1000,
                "naive_p95_ms": naive * 1000,
                "ratio_to_copy_ceiling": user / copy,
                "user_p95_ms_per_round": [value * 1000 for value in user_p95s],
                "copy_ceiling_ms_per_round": [value * 1000 for value in copies],
            },
        }
    )
    figures.append(
        {
            "figure": "PostgreSQL: sustained throughput, 20,000 trades",
            "target": "≥ 50 % of the same-work ceiling",
            "measured": f"{rate:,.0f} trades/s",
            "baseline": (
                f"same-work ceiling (COPY of rows and audit entries, one transaction): {work_rate:,.0f} trades/s; "
                f"COPY of the rows only: {copy_rate:,.0f} rows/s; asyncpg executemany: {many_rate:,.0f} rows/s"
            ),
            "ratio": f"{rate / work_rate:.0%} of the same-work ceiling, {rate / copy_rate:.0%} of the rows-only COPY",
            "values": {
                "same_work_ceiling_per_s": work_rate,
                "share_of_same_work_ceiling": rate / work_rate,
                "trades_per_s": rate,
                "copy_ceiling_per_s": copy_rate,
                "executemany_ceiling_per_s": many_rate,
                "share_of_copy_ceiling": rate / copy_rate,
            },
        }
    )
    assert user < 0.100


@pytest.mark.skipif(not POSTGRES_URL, reason="PERSISTENCE_TEST_POSTGRES_URL is not set")
def test_postgres_three_processes_on_one_database(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    import json
    import subprocess
    import sys

    from tests.support.databases import create_postgres_database, drop_postgres_database

    count = 20_000
    aggregates: list[float] = []
    singles: list[float] = []
    counter = iter(range(10_000))

    def workers(url: str, prefixes: list[str], n: int) -> list[dict[str, float]]:
        processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.pg_worker",
                    url,
                    prefix,
                    str(count),
                    str(tmp_path / f"j-{n}-{prefix}"),
                ],
                stdout=subprocess.PIPE,
                cwd=Path(__file__).parent.parent,
            )
            for prefix in prefixes
        ]
        results = []
        for process in processes:
            out, _ = process.communicate(timeout=900)
            assert process.returncode == 0
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        return results

    async def landed(url: str) -> tuple[int, int]:
        connection = await pg_connect(url)
        try:
            row = await connection.fetchrow("SELECT count(*), count(DISTINCT trade_id) FROM trades")
            return int(row[0]), int(row[1])
        finally:
            await connection.close()

    def one_round() -> None:
        n = next(counter)
        url = create_postgres_database("persistence_bench3")
        try:
            run(loop, migrated(bench_settings(url, tmp_path / f"m-{n}")))
            [single] = workers(url, [f"P{n}-solo"], n)
            singles.append(single["rate"])
            results = workers(url, [f"P{n}-a", f"P{n}-b", f"P{n}-c"], n)
            span = max(result["finished"] for result in results) - min(result["started"] for result in results)
            aggregates.append(3 * count / span)
            assert run(loop, landed(url)) == (4 * count, 4 * count)  # every record landed, once
        finally:
            drop_postgres_database(url)

    benchmark.pedantic(one_round, rounds=max(ROUNDS // 2, 2), iterations=1)
    aggregate, single = statistics.median(aggregates), statistics.median(singles)
    figures.append(
        {
            "figure": "PostgreSQL: three sidecar processes on one database, 20,000 trades each",
            "target": "every record lands exactly once; aggregate rate reported beside one process's",
            "measured": f"aggregate {aggregate:,.0f} trades/s; every record landed once",
            "baseline": f"one process alone: {single:,.0f} trades/s",
            "ratio": f"{aggregate / single:.1f}× one process (2 cores shared by the three and the server)",
            "values": {"aggregate_per_s": aggregate, "one_process_per_s": single, "landed_once": True},
        }
    )


def test_loop_stall_during_an_outage(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    from persistence.observe.events import JournalSpilled
    from persistence.testing import DatabaseLock

    stalls: list[float] = []
    spilled: list[int] = []
    apart: list[float] = []  # the largest stall with no full collection inside it
    collections: list[str] = []
    off_stalls: list[float] = []  # the machine's own floor: the same host loop with persistence off
    off_apart: list[float] = []
    counter = iter(range(10_000))

    async def outage(settings: Settings, prefix: str) -> float:
        probe = LoopStallProbe()
        async with PersistenceSidecar(settings) as sidecar:
            spills: list[int] = []
            sidecar.events.subscribe(
                lambda event: spills.append(event.records) if isinstance(event, JournalSpilled) else None
            )
            spilled.append(0)
            probe.start()
            lock = DatabaseLock(settings.database_url)
            start = time.perf_counter()
            for i in range(3000):  # 1000/s for 3 s; the database is locked from 1 s to 2 s
                if i == 1000:
                    await lock.acquire()
                elif i == 2000:
                    await lock.release()
                delay = start + i / 1000 - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sidecar.record_trade(trade_mapping(i, prefix))
            await sidecar.flush(timeout=120)
            spilled[-1] = sum(spills)
            stall = await probe.stop()
            apart.append(probe.largest_without_a_full_collection)
            collections.append(probe.describe_collections())
            return stall

    def one_round() -> None:
        n = next(counter)
        settings = sqlite_settings(tmp_path / f"outage-{n}.db", query_timeout_ms=250, breaker_reset_seconds=0.5)
        run(loop, migrated(settings))
        stalls.append(run(loop, outage(settings, f"O{n}")))
        probe = LoopStallProbe()
        run(loop, user_steady(persistence_off(tmp_path / f"outage-off-{n}.db"), 3000, 1000, f"P{n}", probe))
        off_stalls.append(probe.largest)
        off_apart.append(probe.largest_without_a_full_collection)

    benchmark.pedantic(one_round, rounds=max(ROUNDS // 2, 3), iterations=1)
    stall = statistics.median(stalls)
    figures.append(
        {
            "figure": "largest loop stall during an outage (another connection's BEGIN EXCLUSIVE for 1 s at 1000/s)",
            "target": "≤ 5 ms",
            "measured": ms(stall),
            "baseline": (
                f"per round: {', '.join(ms(value) for value in stalls)}; records spilled to the journal per round: "
                f"{', '.join(str(value) for value in spilled)}; the largest stall with no full collection of the "
                f"heap inside it: {ms(statistics.median(apart))} (per round {', '.join(ms(value) for value in apart)}; "
                f"{'; '.join(collections)}); the same host loop at 1000/s with persistence off (the machine's "
                f"floor): {ms(statistics.median(off_stalls))} ({', '.join(ms(value) for value in off_stalls)}; "
                f"with no full collection inside: {', '.join(ms(value) for value in off_apart)})"
            ),
            "values": {
                "largest_stall_ms": stall * 1000,
                "per_round_ms": [value * 1000 for value in stalls],
                "persistence_off_largest_stall_ms": statistics.median(off_stalls) * 1000,
                "persistence_off_per_round_ms": [value * 1000 for value in off_stalls],
                "persistence_off_without_a_full_collection_ms": [value * 1000 for value in off_apart],
                "journal_spilled_per_round": spilled,
                "largest_stall_without_a_full_collection_ms": [value * 1000 for value in apart],
                "full_collections": collections,
            },
        }
    )


def test_loop_stall_during_a_journal_replay_of_100000_records(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    from persistence.testing import DatabaseLock

    count = 100_000
    stalls: list[float] = []
    durations: list[float] = []
    apart: list[float] = []  # the largest stall with no full collection inside it
    collections: list[str] = []
    counter = iter(range(10_000))

    async def journal_then_replay(settings: Settings, prefix: str) -> tuple[float, float]:
        # Recorded while the database is locked, with a small RAM backlog: the records go to the journal.
        lock = DatabaseLock(settings.database_url)
        async with PersistenceSidecar(settings, log_events=False) as sidecar:
            await lock.acquire()
            for offset in range(0, count, 1000):
                for i in range(offset, offset + 1000):
                    sidecar.record_trade(trade_mapping(i, prefix))
                await asyncio.sleep(0)
            await sidecar.close(timeout=1.0)
        await lock.release()
        # The recording phase is the host's own work: its sidecar is let go and its garbage collected before the
        # probe starts, as before each burst, so the figure is the start-up's and the replay's, not a full collection
        # owed by the 100,000 records just recorded in the same process (nor the old sidecar's deallocation).
        del sidecar
        gc.collect()
        # A new sidecar on the healthy database replays the journal; the probe runs through start() and the flush.
        probe = LoopStallProbe()
        probe.start()
        started = time.perf_counter()
        sidecar = PersistenceSidecar(settings)
        await sidecar.start()
        await sidecar.flush(timeout=600)
        elapsed = time.perf_counter() - started
        stall = await probe.stop()
        apart.append(probe.largest_without_a_full_collection)
        collections.append(probe.describe_collections())
        landed = await sidecar.trades.count()
        await sidecar.close()
        assert landed == count
        return stall, elapsed

    def one_round() -> None:
        n = next(counter)
        settings = sqlite_settings(
            tmp_path / f"replay-{n}.db", max_pending=1000, query_timeout_ms=250, shutdown_timeout=1.0
        )
        run(loop, migrated(settings))
        stall, elapsed = run(loop, journal_then_replay(settings, f"J{n}"))
        stalls.append(stall)
        durations.append(elapsed)

    benchmark.pedantic(one_round, rounds=max(ROUNDS // 2, 2), iterations=1)
    stall = statistics.median(stalls)
    figures.append(
        {
            "figure": "largest loop stall during start-up and a journal replay of 100,000 records",
            "target": "≤ 20 ms, default GC",
            "measured": ms(stall),
            "baseline": (
                f"per round: {', '.join(ms(value) for value in stalls)}; replay took "
                f"{statistics.median(durations):.1f} s ({count / statistics.median(durations):,.0f} records/s); "
                f"the largest stall with no full collection of the heap inside it: {ms(statistics.median(apart))} "
                f"(per round {', '.join(ms(value) for value in apart)}; {'; '.join(collections)})"
            ),
            "values": {
                "largest_stall_ms": stall * 1000,
                "per_round_ms": [value * 1000 for value in stalls],
                "replay_seconds": statistics.median(durations),
                "largest_stall_without_a_full_collection_ms": [value * 1000 for value in apart],
                "full_collections": collections,
            },
        }
    )
