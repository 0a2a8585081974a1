"""What the audit trail costs: sustained throughput with and without it, in the same run, SQLite and PostgreSQL;
and ``audit verify`` of 1,000,000 entries (``BENCH_AUDIT_VERIFY_COUNT``), its memory and its speed beside a ceiling,
on SQLite and on PostgreSQL.

"Without" is the same sidecar and write path with the trail's own work taken out for the measurement: no chain
appended (no head read, no canonical JSON, no hashes, no ``audit_log`` rows) and no read of the stored rows before
the write (every key of the run is new, so that read finds nothing, and what is written is the same). What is left
is an ``INSERT … ON CONFLICT DO NOTHING`` per batch, the write path before the trail. Rounds alternate the two and
each round's ratio is taken pair by pair; the figure is the median ratio.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any
from unittest import mock

import asyncpg
import pytest
from sqlalchemy import insert
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url

from benchmarks.harness import (
    BENCH_INSTANCE,
    bench_settings,
    migrated,
    run,
    sidecar_burst,
    sqlite_settings,
    trade_mapping,
)
from persistence import Settings
from persistence.app.cli.audit import VERIFY_JOBS
from persistence.audit.chain import GENESIS, AuditHead, VersionEncoder, linked_entries
from persistence.audit.trail import AuditLog, column_kinds
from persistence.db.rowcodec import DriverBatch
from persistence.db.schema import audit_log, trades
from persistence.records.models import Trade
from persistence.tables.versioned import VersionedTable

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
POSTGRES_URL = os.environ.get("PERSISTENCE_TEST_POSTGRES_URL")
COUNT = 20_000
VERIFY_COUNT = int(os.environ.get("BENCH_AUDIT_VERIFY_COUNT", "1000000"))
VERIFY_ROUNDS = int(os.environ.get("BENCH_AUDIT_VERIFY_ROUNDS", "3"))
REPO_ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def without_the_trail() -> Iterator[None]:
    """The write path with the trail's work removed (see the module docstring); only for this measurement."""

    async def no_entries(self: AuditLog, connection: Any, versions: Any) -> None:
        return None

    async def nothing_stored(self: VersionedTable[Any], connection: Any, keys: Any, links: Any) -> dict[str, Any]:
        return {}

    # SQLite's transaction runs on the driver's thread: its head read and entries are these two.
    def no_head(self: AuditLog, session: Any) -> None:
        return None

    def no_entries_on(self: AuditLog, session: Any, versions: Any, head: Any) -> Any:
        return head

    with (
        mock.patch.object(AuditLog, "append", no_entries),
        mock.patch.object(VersionedTable, "stored", nothing_stored),
        mock.patch.object(AuditLog, "head_on", no_head),
        mock.patch.object(AuditLog, "append_on", no_entries_on),
    ):
        yield


def _measure(
    loop: asyncio.AbstractEventLoop, make_settings: Any, prefix: str, rounds: int
) -> tuple[list[float], list[float]]:
    with_trail: list[float] = []
    without: list[float] = []
    for n in range(rounds):
        for audited in (n % 2 == 0, n % 2 != 0):  # alternate which goes first
            settings = make_settings(f"{prefix}{n}{'a' if audited else 'n'}")
            run(loop, migrated(settings))
            if audited:
                _, elapsed = run(loop, sidecar_burst(settings, COUNT, f"{prefix}A{n}"))
                with_trail.append(COUNT / elapsed)
            else:
                with without_the_trail():
                    _, elapsed = run(loop, sidecar_burst(settings, COUNT, f"{prefix}N{n}"))
                without.append(COUNT / elapsed)
    return with_trail, without


def _figure(backend: str, with_trail: list[float], without: list[float]) -> dict[str, Any]:
    ratios = [audited / plain for audited, plain in zip(with_trail, without, strict=True)]
    cost = 1 - statistics.median(ratios)
    return {
        "figure": f"audit trail cost: sustained throughput, {COUNT:,} trades ({backend})",
        "target": "≤ 10 % lower with the trail (SPEC: the trail costs at most 10 % of sustained throughput)",
        "measured": f"{statistics.median(with_trail):,.0f} trades/s with the trail",
        "baseline": f"without the trail (same run): {statistics.median(without):,.0f} trades/s",
        "ratio": f"{cost:.0%} lower (median of {len(ratios)} paired rounds)",
        "values": {
            "with_trail_per_s": with_trail,
            "without_trail_per_s": without,
            "paired_ratios": ratios,
            "cost": cost,
        },
    }


def test_audit_trail_cost_on_sqlite(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    measured: dict[str, list[float]] = {}

    def once() -> None:
        audited, plain = _measure(
            loop, lambda name: sqlite_settings(tmp_path / f"{name}.db"), "AS", max(ROUNDS // 2, 3)
        )
        measured.update(with_trail=audited, without=plain)

    benchmark.pedantic(once, rounds=1, iterations=1)
    figures.append(_figure("SQLite", measured["with_trail"], measured["without"]))


@pytest.mark.skipif(not POSTGRES_URL, reason="PERSISTENCE_TEST_POSTGRES_URL is not set")
def test_audit_trail_cost_on_postgresql(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    from tests.support.databases import create_postgres_database, drop_postgres_database

    created: list[str] = []
    measured: dict[str, list[float]] = {}

    def settings_for(name: str) -> Settings:
        url = create_postgres_database("persistence_audit_bench")
        created.append(url)
        return bench_settings(url, tmp_path / f"journal-{name}")

    def once() -> None:
        audited, plain = _measure(loop, settings_for, "AP", max(ROUNDS // 2, 3))
        measured.update(with_trail=audited, without=plain)

    try:
        benchmark.pedantic(once, rounds=1, iterations=1)
    finally:
        for url in created:
            drop_postgres_database(url)
    figures.append(_figure("PostgreSQL", measured["with_trail"], measured["without"]))


def fill_audited(path: Path | str, count: int, chunk: int = 20_000) -> None:
    """``count`` trades and their audit entries in a migrated SQLite file, as the sidecar writes them, fast."""
    trade_batch = DriverBatch(insert(trades), trades, sqlite_dialect.dialect(paramstyle="qmark"))
    entry_batch = DriverBatch(insert(audit_log), audit_log, sqlite_dialect.dialect(paramstyle="qmark"))
    fields = tuple(Trade.model_fields)
    encode = VersionEncoder(fields, column_kinds(trades)).encode
    head: AuditHead | None = None
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        for start in range(0, count, chunk):
            rows = [
                {**Trade.parse(trade_mapping(i, "V")).__dict__, "instance_id": BENCH_INSTANCE}
                for i in range(start, min(start + chunk, count))
            ]
            entries = linked_entries(
                head,
                BENCH_INSTANCE,
                [("trade", row["trade_id"], encode(row), GENESIS) for row in rows],
                datetime.now(UTC),
            )
            head = AuditHead(BENCH_INSTANCE, entries[-1]["seq"], entries[-1]["hash"])
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(trade_batch.sql, trade_batch.encode(rows))
            connection.executemany(entry_batch.sql, entry_batch.encode(entries))
            connection.execute("COMMIT")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


def verify_ceiling(path: str) -> float:
    """The same rows fetched and hashed by the simplest code: raw ``sqlite3``, every entry's SHA-256 recomputed
    with ``hashlib`` (header as canonical JSON) and checked, every row of ``trades`` fetched. Seconds."""
    started = time.perf_counter()
    connection = sqlite3.connect(path)
    try:
        previous = "0" * 64
        cursor = connection.execute(
            "SELECT instance_id, seq, entity, natural_key, payload, recorded_at, prev_hash, hash, key_prev_hash "
            "FROM audit_log ORDER BY instance_id, seq"
        )
        for instance, seq, entity, key, payload, at, prev_hash, digest, link in cursor:
            header = (
                f'{{"entity":{encode_basestring_ascii(entity)},"instance_id":{encode_basestring_ascii(instance)},'
                f'"key_prev_hash":"{link}","natural_key":{encode_basestring_ascii(key)},'
                f'"recorded_at":"{at[:10]}T{at[11:]}Z","seq":{seq}}}'
            )
            if (
                prev_hash != previous
                or digest != hashlib.sha256(f"{prev_hash}\n{header}\n{payload}".encode()).hexdigest()
            ):
                raise AssertionError(f"entry {seq} does not verify")
            previous = digest
        for _ in connection.execute("SELECT * FROM trades ORDER BY trade_id"):
            pass
    finally:
        connection.close()
    return time.perf_counter() - started


def verify_in_a_child(database_url: str, count: int, jobs: int) -> dict[str, float]:
    """``audit verify`` with ``jobs`` processes, in a fresh child (as the command line runs it): seconds, the growth of
    the verifying process's RSS and the largest peak RSS of the processes that checked rows (MiB)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.children.verify_memory", database_url, str(jobs)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    entries, rows, before, peak, elapsed, child_peak = done.stdout.split()
    assert int(entries) == count and int(rows) == count
    return {
        "seconds": float(elapsed),
        "growth_mib": (int(peak) - int(before)) / 1024,
        "child_peak_mib": int(child_peak) / 1024,
    }


def verify_figure(
    backend: str, count: int, runs: list[dict[str, float]], single: list[float], ceilings: list[float], ceiling: str
) -> dict[str, Any]:
    """The figure of ``audit verify`` as the command line runs it (``--jobs`` default), beside one process and the
    ceiling, each round's ratios taken pair by pair."""
    seconds = [each["seconds"] for each in runs]
    ratios = [ours / ceiling for ours, ceiling in zip(seconds, ceilings, strict=True)]
    speedups = [one / ours for one, ours in zip(single, seconds, strict=True)]
    measured = {
        "seconds": statistics.median(seconds),
        "one_process_seconds": statistics.median(single),
        "ceiling_seconds": statistics.median(ceilings),
        "ratio": statistics.median(ratios),
        "growth_mib": max(each["growth_mib"] for each in runs),
        "child_peak_mib": max(each["child_peak_mib"] for each in runs),
    }
    return {
        "figure": f"audit verify of {count:,} entries and their rows ({backend}), --jobs {VERIFY_JOBS} (the default)",
        "target": "≤ 10 s for 1,000,000; streams: memory bounded whatever the size of the trail",
        "measured": f"{measured['seconds']:.1f} s; RSS grew by {measured['growth_mib']:.0f} MiB, each rows process "
        f"peaked at {measured['child_peak_mib']:.0f} MiB",
        "baseline": f"ceiling ({ceiling}, one process, same run): {measured['ceiling_seconds']:.1f} s; "
        f"--jobs 1: {measured['one_process_seconds']:.1f} s",
        "ratio": f"{measured['ratio']:.1f}× the ceiling, {statistics.median(speedups):.2f}× faster than one process "
        f"(medians of {len(ratios)}); {count / measured['seconds']:,.0f} entries and rows checked per second",
        "values": {
            **measured,
            "seconds_each": seconds,
            "one_process_each": single,
            "ceiling_each": ceilings,
            "ratios": ratios,
            "speedups": speedups,
        },
    }


def test_audit_verify_of_1000000_entries_streams_in_bounded_memory(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    count = VERIFY_COUNT
    path = tmp_path / "audited.db"
    settings = sqlite_settings(path)
    run(loop, migrated(settings))
    # Filled in a child process too: a million rows built here would leave this process's heap (and the benchmarks
    # after this one) heavier.
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from benchmarks.test_audit_bench import fill_audited; fill_audited({str(path)!r}, {count})",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=True,
    )
    runs: list[dict[str, float]] = []
    single: list[float] = []
    ceilings: list[float] = []

    def once() -> None:
        # Alternating in each round: the default, one process, the ceiling (the machine's speed moves within a run).
        runs.append(verify_in_a_child(settings.database_url, count, VERIFY_JOBS))
        single.append(verify_in_a_child(settings.database_url, count, 1)["seconds"])
        ceiling = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from benchmarks.test_audit_bench import verify_ceiling; print(verify_ceiling({str(path)!r}))",
            ],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            text=True,
            check=True,
        )
        ceilings.append(float(ceiling.stdout))

    benchmark.pedantic(once, rounds=VERIFY_ROUNDS, iterations=1)
    figure = verify_figure("SQLite", count, runs, single, ceilings, "raw sqlite3 fetch + hashlib")
    figures.append(figure)
    assert figure["values"]["growth_mib"] < 150 and figure["values"]["child_peak_mib"] < 250


async def fill_audited_postgres(database_url: str, count: int, chunk: int = 20_000) -> None:
    """``count`` trades and their audit entries in a migrated PostgreSQL database, as the sidecar writes them, by
    binary ``COPY``."""
    url = make_url(database_url)
    connection = await asyncpg.connect(host=url.host, port=url.port or 5432, user=url.username, database=url.database)
    fields = tuple(Trade.model_fields)
    encode = VersionEncoder(fields, column_kinds(trades)).encode
    trade_columns = [*fields, "instance_id"]
    entry_columns = [column.name for column in audit_log.c if column.name != "id"]
    head: AuditHead | None = None
    try:
        for start in range(0, count, chunk):
            rows = [
                {**Trade.parse(trade_mapping(i, "V")).__dict__, "instance_id": BENCH_INSTANCE}
                for i in range(start, min(start + chunk, count))
            ]
            versions = [("trade", row["trade_id"], encode(row), GENESIS) for row in rows]
            entries = linked_entries(head, BENCH_INSTANCE, versions, datetime.now(UTC))
            head = AuditHead(BENCH_INSTANCE, entries[-1]["seq"], entries[-1]["hash"])
            async with connection.transaction():
                await connection.copy_records_to_table(
                    "trades",
                    records=[tuple(row[name] for name in trade_columns) for row in rows],
                    columns=trade_columns,
                )
                await connection.copy_records_to_table(
                    "audit_log",
                    records=[tuple(entry[name] for name in entry_columns) for entry in entries],
                    columns=entry_columns,
                )
        # As autovacuum (on by default) does to a table that grows by inserts: the visibility map set, so index-only
        # scans stay in the index. The same database is read by verify and by its ceiling.
        await connection.execute("VACUUM ANALYZE")
    finally:
        await connection.close()


async def verify_ceiling_postgres(database_url: str) -> float:
    """The PostgreSQL ceiling: asyncpg fetches every entry in chain order (a cursor), every SHA-256 recomputed with
    ``hashlib`` and checked, every row of ``trades`` fetched. Seconds."""
    url = make_url(database_url)
    connection = await asyncpg.connect(host=url.host, port=url.port or 5432, user=url.username, database=url.database)
    started = time.perf_counter()
    try:
        async with connection.transaction():
            previous = "0" * 64
            entries = (
                "SELECT instance_id, seq, entity, natural_key, payload, "
                """to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), prev_hash, hash, """
                "key_prev_hash FROM audit_log ORDER BY instance_id, seq"
            )
            async for instance, seq, entity, key, payload, at, prev_hash, digest, link in connection.cursor(
                entries, prefetch=20_000
            ):
                header = (
                    f'{{"entity":{encode_basestring_ascii(entity)},"instance_id":{encode_basestring_ascii(instance)},'
                    f'"key_prev_hash":"{link}","natural_key":{encode_basestring_ascii(key)},'
                    f'"recorded_at":"{at}","seq":{seq}}}'
                )
                if (
                    prev_hash != previous
                    or digest != hashlib.sha256(f"{prev_hash}\n{header}\n{payload}".encode()).hexdigest()
                ):
                    raise AssertionError(f"entry {seq} does not verify")
                previous = digest
            async for _ in connection.cursor("SELECT * FROM trades ORDER BY trade_id", prefetch=20_000):
                pass
    finally:
        await connection.close()
    return time.perf_counter() - started


@pytest.mark.skipif(not POSTGRES_URL, reason="PERSISTENCE_TEST_POSTGRES_URL is not set")
def test_audit_verify_of_1000000_entries_on_postgresql(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    from tests.support.databases import create_postgres_database, drop_postgres_database

    count = VERIFY_COUNT
    url = create_postgres_database("persistence_verify_bench")
    try:
        settings = bench_settings(url, tmp_path / "journal")
        run(loop, migrated(settings))
        run(loop, fill_audited_postgres(url, count))
        runs: list[dict[str, float]] = []
        single: list[float] = []
        ceilings: list[float] = []

        def once() -> None:
            runs.append(verify_in_a_child(url, count, VERIFY_JOBS))
            single.append(verify_in_a_child(url, count, 1)["seconds"])
            ceilings.append(run(loop, verify_ceiling_postgres(url)))

        benchmark.pedantic(once, rounds=VERIFY_ROUNDS, iterations=1)
    finally:
        drop_postgres_database(url)
    figure = verify_figure("PostgreSQL", count, runs, single, ceilings, "asyncpg cursor + hashlib")
    figures.append(figure)
    assert figure["values"]["growth_mib"] < 150 and figure["values"]["child_peak_mib"] < 250
