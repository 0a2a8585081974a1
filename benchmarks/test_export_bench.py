"""Export: N trades (1,000,000 by default) to Parquet, against the ceiling measured in the same run.

The ceiling is pyarrow writing the same rows read by raw ``sqlite3``: one cursor over the same SELECT, the same chunk
size, the cheapest exact conversion there is (the stored integers reinterpreted as ``decimal128(18, 8)``, the stored
UTC text parsed by pyarrow), the same Parquet writer settings and row groups. The export goes through the sidecar's
``export()``: the async engine, its driver connection, worker threads, an atomic rename. Target: ≥ 50 % of the
ceiling's speed. A second figure is the export's RSS growth, measured in a child process (target ≤ 150 MiB).
``BENCH_EXPORT_TRADES`` sets N.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import insert
from sqlalchemy.dialects import sqlite as sqlite_dialect

from benchmarks.harness import migrated, run, sqlite_settings, trade_mapping
from persistence.db.engine import create_database
from persistence.db.rowcodec import DriverBatch
from persistence.db.schema import trades
from persistence.records.models import Trade
from persistence.tools.export import DEFAULT_CHUNK_ROWS, EXPORTABLES, PARQUET_ROW_GROUP_ROWS, arrow_schema, export

TRADES = int(os.environ.get("BENCH_EXPORT_TRADES", "1000000"))
ROUNDS = min(int(os.environ.get("BENCH_ROUNDS", "5")), 3)
FILL_CHUNK = 20_000


def fill(path: Path, count: int) -> None:
    """Insert ``count`` trades with the sidecar's own encoder, a chunk at a time (memory stays flat)."""
    batch = DriverBatch(insert(trades), trades, sqlite_dialect.dialect(paramstyle="qmark"))
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        for start in range(0, count, FILL_CHUNK):
            records = [Trade.parse(trade_mapping(i, "X")) for i in range(start, min(start + FILL_CHUNK, count))]
            connection.execute("BEGIN IMMEDIATE")
            rows = [{**record.__dict__, "instance_id": "bulk-filled"} for record in records]
            connection.executemany(batch.sql, batch.encode(rows))
            connection.execute("COMMIT")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


def ceiling_export(database: Path, output: Path) -> int:
    """pyarrow writing the rows read by raw sqlite3: the fastest exact export of this table there is."""
    spec = EXPORTABLES["trades"]
    schema = arrow_schema(spec)
    decimal, unscaled, naive = pa.decimal128(18, 8), pa.decimal128(19, 0), pa.timestamp("us")

    def decimals(values: Sequence[Any]) -> Any:
        return pa.array(values, pa.int64()).cast(unscaled).view(decimal)

    def times(kind: Any) -> Callable[[Sequence[Any]], Any]:
        return lambda values: pa.array(values, pa.string()).cast(naive).cast(kind)

    def plain(kind: Any) -> Callable[[Sequence[Any]], Any]:
        return lambda values: pa.array(values, kind)

    converters: list[Callable[[Sequence[Any]], Any]] = []
    for field in schema:
        if pa.types.is_decimal(field.type):
            converters.append(decimals)
        elif pa.types.is_timestamp(field.type):
            converters.append(times(field.type))
        else:
            converters.append(plain(field.type))
    names = ", ".join(f'"{field.name}"' for field in schema)
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    rows_written = 0
    try:
        cursor = connection.execute(f'SELECT {names} FROM trades ORDER BY "id"')
        with pq.ParquetWriter(output, schema, compression="zstd") as writer:
            group: list[Any] = []
            while rows := cursor.fetchmany(DEFAULT_CHUNK_ROWS):
                columns = list(zip(*rows, strict=True))
                arrays = [convert(column) for convert, column in zip(converters, columns, strict=True)]
                group.append(pa.RecordBatch.from_arrays(arrays, schema=schema))
                rows_written += len(rows)
                if sum(batch.num_rows for batch in group) >= PARQUET_ROW_GROUP_ROWS:
                    writer.write_table(pa.Table.from_batches(group), row_group_size=PARQUET_ROW_GROUP_ROWS * 2)
                    group = []
            if group:
                writer.write_table(pa.Table.from_batches(group), row_group_size=PARQUET_ROW_GROUP_ROWS * 2)
    finally:
        connection.close()
    return rows_written


async def sidecar_export(database_path: Path, output: Path) -> int:
    database = create_database(sqlite_settings(database_path))
    try:
        result = await export(database, "trades", output, "parquet")
        return result.rows
    finally:
        await database.dispose()


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database holding N trades, shared by the figures below."""
    database = tmp_path_factory.mktemp("export") / "export.db"
    loop = asyncio.new_event_loop()
    try:
        run(loop, migrated(sqlite_settings(database)))
    finally:
        loop.close()
    fill(database, TRADES)
    return database


def test_export_of_trades_to_parquet_against_the_raw_sqlite3_pyarrow_ceiling(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]], filled: Path
) -> None:
    database = filled
    exports: list[float] = []
    ceilings: list[float] = []
    counter = iter(range(1000))

    def one_round() -> None:
        n = next(counter)
        # Alternate which goes first so neither always gets the warmer page cache.
        order = ("sidecar", "ceiling") if n % 2 == 0 else ("ceiling", "sidecar")
        for which in order:
            output = tmp_path / f"{which}-{n}.parquet"
            started = time.perf_counter()
            if which == "sidecar":
                assert run(loop, sidecar_export(database, output)) == TRADES
                exports.append(time.perf_counter() - started)
            else:
                assert ceiling_export(database, output) == TRADES
                ceilings.append(time.perf_counter() - started)
            output.unlink()

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    exported, ceiling = statistics.median(exports), statistics.median(ceilings)
    share = ceiling / exported
    benchmark.extra_info.update(export_s=exported, ceiling_s=ceiling, share_of_ceiling=share)
    figures.append(
        {
            "figure": f"export of {TRADES:,} trades to Parquet (SQLite)",
            "target": "≥ 50 % of the ceiling's speed",
            "measured": f"{exported:.2f} s ({TRADES / exported:,.0f} rows/s)",
            "baseline": f"pyarrow writing the rows read by raw sqlite3: {ceiling:.2f} s"
            f" ({TRADES / ceiling:,.0f} rows/s)",
            "ratio": f"{share:.0%} of the ceiling's speed",
        }
    )
    assert share >= 0.5


def test_export_memory_growth_in_a_child_process(
    benchmark: Any, tmp_path: Path, figures: list[dict[str, Any]], filled: Path
) -> None:
    growths: list[float] = []

    def one_round() -> None:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.children.export_memory",
                f"sqlite+aiosqlite:///{filled}",
                str(tmp_path / "memory.parquet"),
            ],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
            capture_output=True,
            text=True,
            check=True,
        )
        rows, before, peak = (int(value) for value in done.stdout.split())
        assert rows == TRADES
        growths.append((peak - before) / 1024)

    benchmark.pedantic(one_round, rounds=1, iterations=1)
    growth = max(growths)
    benchmark.extra_info.update(rss_growth_mib=growth)
    figures.append(
        {
            "figure": f"export of {TRADES:,} trades: RSS growth (child process, peak minus before)",
            "target": "≤ 150 MiB",
            "measured": f"{growth:.1f} MiB",
        }
    )
    assert growth <= 150
