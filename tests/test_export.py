"""Export: exact round trips to Parquet, CSV and JSONL, filters, streaming, atomicity, the missing extra, memory."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persistence.app.cli.progress import ProgressBar, render
from persistence.db.engine import Database, create_database
from persistence.errors import InvalidQueryError
from persistence.migrations import upgrade
from persistence.records.models import Trade
from persistence.tables.repositories import Repositories
from persistence.tools.export import iter_batches
from tests.support.cli import run_in_process
from tests.support.databases import create_postgres_database, drop_postgres_database, make_settings
from tests.support.factories import BASE_TIME
from tests.support.portability import as_rows, fill_trades_fast, record_everything, small_tmpfs, varied_trades

REPO_ROOT = Path(__file__).resolve().parent.parent
TRADE_COUNT = 20_500
DECIMAL = pa.decimal128(18, 8)
UTC_TIMESTAMP = pa.timestamp("us", tz="UTC")


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def recorded_source(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, list[Trade]]]:
    """A database of one backend holding the varied trades and a few of every other record, and the trades; for this
    module alone and recorded once (the export tests only read it). A new PostgreSQL database, dropped after."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('export') / 'recorded.db'}"
    else:
        url = create_postgres_database("persistence_export")
    trades = varied_trades(TRADE_COUNT)

    async def prepare() -> None:
        database = create_database(make_settings(database_url=url))
        try:
            await upgrade(database)
            await record_everything(database, trades)
        finally:
            await database.dispose()

    asyncio.run(prepare())
    yield url, trades
    if request.param == "postgres":
        drop_postgres_database(url)


@pytest.fixture
async def recorded_database(recorded_source: tuple[str, list[Trade]]) -> AsyncIterator[Database]:
    database = create_database(make_settings(database_url=recorded_source[0], query_timeout_ms=5000))
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def recorded(recorded_database: Database, recorded_source: tuple[str, list[Trade]]) -> tuple[Repositories, list[Trade]]:
    return Repositories(recorded_database), recorded_source[1]


def _normalise(row: dict[str, Any]) -> dict[str, Any]:
    """An exported row as its record's fields (timestamps in UTC), without the ``instance_id`` that wrote it."""
    return {
        key: value.astimezone(UTC) if isinstance(value, datetime) else value
        for key, value in row.items()
        if key != "instance_id"
    }


async def test_parquet_export_reads_back_every_trade_value_for_value(
    recorded: tuple[Repositories, list[Trade]], tmp_path: Path
) -> None:
    repos, trades = recorded
    output = tmp_path / "trades.parquet"
    result = await repos.trades.export(output, format="parquet")
    assert result.rows == TRADE_COUNT and result.path == output and output.stat().st_size == result.bytes
    table = pq.read_table(output)
    for name in ("entry_price", "exit_price", "pnl", "pnl_percentage", "risk_reward_ratio", "position_size"):
        assert table.schema.field(name).type == DECIMAL, name
    for name in ("entry_time", "exit_time", "created_at", "updated_at"):
        assert table.schema.field(name).type == UTC_TIMESTAMP, name
    assert set(table.column("instance_id").to_pylist()) == {repos.audit.instance_id}
    exported = {row["trade_id"]: _normalise(row) for row in table.to_pylist()}
    expected = as_rows(trades)
    assert exported.keys() == expected.keys()
    for trade_id, row in expected.items():
        assert exported[trade_id] == row, trade_id
    # The awkward values are there, exactly.
    assert any(row["pnl"] is not None and row["pnl"] < 0 for row in exported.values())
    assert any(row["pnl_percentage"] == Decimal("-0.00000001") for row in exported.values())
    assert any(row["risk_reward_ratio"] == Decimal("9999999999.99999999") for row in exported.values())
    assert not any(path.name.startswith(".") for path in tmp_path.iterdir())


async def test_csv_and_jsonl_write_decimals_as_plain_strings_and_timestamps_in_utc(
    recorded: tuple[Repositories, list[Trade]], tmp_path: Path
) -> None:
    repos, trades = recorded
    expected = as_rows(trades)
    await repos.trades.export(tmp_path / "trades.csv")
    await repos.trades.export(tmp_path / "trades.jsonl")
    with (tmp_path / "trades.csv").open(newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    json_rows = [json.loads(line) for line in (tmp_path / "trades.jsonl").read_text().splitlines()]
    assert len(csv_rows) == len(json_rows) == TRADE_COUNT
    for text_row, json_row in zip(csv_rows, json_rows, strict=True):
        recorded_row = expected[json_row["trade_id"]]
        for name in ("entry_price", "exit_price", "pnl", "pnl_percentage", "confidence_score", "take_profit"):
            value = recorded_row[name]
            if value is None:
                assert json_row[name] is None and text_row[name] == ""
                continue
            assert isinstance(json_row[name], str)
            assert "E" not in json_row[name] and json_row[name] == text_row[name]
            assert Decimal(json_row[name]) == value
            assert json_row[name] == format(value, "f")
        for name in ("entry_time", "exit_time", "updated_at"):
            value = recorded_row[name]
            if value is None:
                assert json_row[name] is None
                continue
            assert json_row[name].endswith("Z") and json_row[name] == text_row[name]
            assert datetime.fromisoformat(json_row[name]) == value


async def test_filters_export_exactly_the_matching_trades(
    recorded: tuple[Repositories, list[Trade]], tmp_path: Path
) -> None:
    repos, trades = recorded
    start, end = trades[1000].entry_time, trades[9000].entry_time
    output = tmp_path / "subset.parquet"
    result = await repos.trades.export(output, symbol="GBPUSD", session="london", start_date=start, end_date=end)
    wanted = {
        trade.trade_id
        for trade in trades
        if trade.symbol == "GBPUSD" and trade.session == "LONDON" and start <= trade.entry_time <= end
    }
    exported = pq.read_table(output).column("trade_id").to_pylist()
    assert set(exported) == wanted and len(exported) == result.rows > 0
    with pytest.raises(InvalidQueryError, match="start_date"):
        await repos.trades.export(tmp_path / "bad.parquet", start_date=end, end_date=start)
    with pytest.raises(InvalidQueryError, match="executed"):
        await repos.trades.export(tmp_path / "bad.parquet", executed=True)
    with pytest.raises(InvalidQueryError, match="NUL"):
        await repos.trades.export(tmp_path / "bad.parquet", symbol="EUR\x00USD")
    assert not (tmp_path / "bad.parquet").exists()


async def test_iter_batches_streams_in_chunks_in_recorded_order(
    recorded: tuple[Repositories, list[Trade]], recorded_database: Database
) -> None:
    _, trades = recorded
    sizes: list[int] = []
    ids: list[str] = []
    async for batch in iter_batches(recorded_database, "trades", chunk_rows=1000):
        assert isinstance(batch, pa.RecordBatch)
        sizes.append(batch.num_rows)
        ids.extend(batch.column("trade_id").to_pylist())
    assert max(sizes) == 1000 and sum(sizes) == TRADE_COUNT and len(sizes) == 21
    assert ids == [trade.trade_id for trade in trades]


async def test_signals_snapshots_and_parameter_changes_export_exactly(
    recorded: tuple[Repositories, list[Trade]], tmp_path: Path
) -> None:
    repos, _ = recorded
    signals = (await repos.signals.query(limit=1000)).items
    snapshots = await repos.snapshots.get_snapshots(limit=1000)
    changes = await repos.parameters.get_changes(limit=1000)
    for repository, records, name in (
        (repos.signals, signals, "signals"),
        (repos.snapshots, snapshots, "snapshots"),
        (repos.parameters, changes, "parameters"),
    ):
        output = tmp_path / f"{name}.parquet"
        result = await repository.export(output)  # type: ignore[attr-defined]
        assert result.rows == len(records) > 0, name
        exported = [_normalise(row) for row in pq.read_table(output).to_pylist()]
        assert sorted(exported, key=str) == sorted((dict(r.__dict__) for r in records), key=str), name
    executed = await repos.signals.export(tmp_path / "executed.jsonl", executed=True)
    lines = [json.loads(line) for line in (tmp_path / "executed.jsonl").read_text().splitlines()]
    assert executed.rows == len(lines) == sum(1 for s in signals if s.executed)
    assert all(row["executed"] for row in lines)


async def test_an_export_that_fails_half_way_leaves_no_file_behind(
    recorded: tuple[Repositories, list[Trade]], tmp_path: Path
) -> None:
    repos, _ = recorded
    output = tmp_path / "out.parquet"
    output.write_bytes(b"the previous export")

    def fail_after_first_batch(rows: int) -> None:
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        await repos.trades.export(output, progress=fail_after_first_batch)
    assert output.read_bytes() == b"the previous export"
    assert [path.name for path in tmp_path.iterdir() if path.name.endswith(".partial")] == []


KILLED_EXPORT = """
import asyncio, os, sys, time
from pathlib import Path
from persistence.config import Settings
from persistence.db.engine import create_database
from persistence.tools.export import export

def stall(rows):
    Path(sys.argv[2]).write_text(str(rows))
    time.sleep(600)  # killed here, half way through

async def main():
    database = create_database(Settings(_env_file=None, database_url=sys.argv[1]))
    await export(database, "trades", sys.argv[3], "parquet", chunk_rows=1000, progress=stall)

asyncio.run(main())
"""


async def test_an_export_killed_with_sigkill_leaves_no_file_at_the_output_path(
    recorded: tuple[Repositories, list[Trade]], recorded_source: tuple[str, list[Trade]], tmp_path: Path
) -> None:
    repos, _ = recorded
    database_url = recorded_source[0]
    marker, output = tmp_path / "half-way", tmp_path / "export" / "trades.parquet"
    output.parent.mkdir()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILLED_EXPORT,
        database_url,
        str(marker),
        str(output),
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.returncode is None, "the child ended before exporting"
            assert time.monotonic() < deadline, "the child never started exporting"
            await asyncio.sleep(0.02)
        assert int(marker.read_text()) == 1000
        child.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(child.wait(), 30) == -signal.SIGKILL
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert not output.exists()
    partial = list(output.parent.iterdir())
    assert len(partial) == 1 and partial[0].name.startswith(".trades.parquet.") and partial[0].name.endswith(".partial")
    result = await repos.trades.export(output)
    assert [path.name for path in output.parent.iterdir()] == ["trades.parquet"] and result.rows == TRADE_COUNT


def test_without_pyarrow_the_export_command_names_the_extra_to_install(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["pyarrow"] = None  # as if the extra were not installed
        import persistence
        from persistence.app.cli.main import main
        sys.exit(main(["export", "trades", "--output", "trades.parquet"]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "pip install 'persistence-sidecar[analysis]'" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "trades.parquet").exists()


def test_the_export_command_writes_the_file_and_prints_one_summary_line(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    database = create_database(make_settings(database_url=url))

    async def prepare() -> None:
        await upgrade(database)
        await record_everything(database, varied_trades(300))
        await database.dispose()

    asyncio.run(prepare())
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DATABASE_URL": url}
    command = [sys.executable, "-m", "persistence", "export", "trades", "--format", "csv", "-o", "t.csv"]
    done = subprocess.run([*command, "--symbol", "EURUSD"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("exported 75 trades to t.csv (csv, ") and " bytes) in " in lines[0]
    assert done.stderr == ""  # not a terminal: no progress bar
    rows = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    assert len(rows) == 75 and {row["symbol"] for row in rows} == {"EURUSD"}
    again = run_in_process(*command[3:], cwd=tmp_path, env=env)
    assert again.returncode == 1 and "exists; pass --force" in again.stderr
    wrong = run_in_process(*command[3:], "--force", "--executed", "true", cwd=tmp_path, env=env)
    assert wrong.returncode == 2 and "executed" in wrong.stderr


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_draws_on_a_terminal_only_and_clears_its_line() -> None:
    now = [0.0]
    terminal = _Terminal()
    bar = ProgressBar("export trades", 1000, out=terminal, clock=lambda: now[0], interval=0.1)
    now[0] = 1.0
    bar.update(250)
    now[0] = 1.05
    bar.update(300)  # within the interval: not drawn
    now[0] = 2.0
    bar.update(500)
    bar.close()
    drawn = terminal.getvalue()
    assert "250/1,000 rows" in drawn and "300/1,000" not in drawn and "500/1,000 rows" in drawn
    assert "250 rows/s" in drawn and "ETA 0:02" in drawn and drawn.endswith("\r\x1b[K")
    pipe = io.StringIO()
    quiet = ProgressBar("export trades", 1000, out=pipe, clock=lambda: now[0])
    quiet.update(10)
    quiet.close()
    assert pipe.getvalue() == ""
    assert render("copy trades", 50, None, 2.0) == "copy trades 50 rows 25 rows/s"


def _export_in_a_child(url: str, output: Path, *end_date: str) -> tuple[int, float]:
    """Rows exported and the RSS growth in MiB of a child exporting the trades (up to ``end_date``)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.children.export_memory", url, str(output), *end_date],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rows, before_kib, peak_kib = (int(value) for value in done.stdout.split())
    return rows, (peak_kib - before_kib) / 1024


@pytest.mark.slow
def test_exporting_three_times_the_trades_in_a_child_process_grows_rss_by_no_more(tmp_path: Path) -> None:
    count = 120_000
    path = tmp_path / "big.db"
    url = f"sqlite+aiosqlite:///{path}"
    database = create_database(make_settings(database_url=url))

    async def migrate() -> None:
        await upgrade(database)
        await database.dispose()

    asyncio.run(migrate())
    fill_trades_fast(path, count)  # six runs of 20,000 trades, entered 37 s apart from BASE_TIME each
    a_third = (BASE_TIME + timedelta(seconds=37 * 6_666)).isoformat()
    third_rows, third_growth = _export_in_a_child(url, tmp_path / "third.parquet", a_third)
    rows, growth = _export_in_a_child(url, tmp_path / "big.parquet")
    assert rows == count and abs(third_rows - count // 3) <= 6, third_rows
    assert pq.ParquetFile(tmp_path / "big.parquet").metadata.num_rows == count
    # The SPEC's bound is 150 MiB for 1,000,000 trades: streaming keeps the growth flat, whatever the count. Past the
    # allocator's warm-up (40,000 rows) three times the rows add a few MiB (measured: 6); holding the extra 80,000
    # rows would add over 100 MiB (measured with one chunk for the whole table: +103 MiB from 20,000 to 80,000).
    assert growth <= 150, growth
    assert growth - third_growth < 24, (third_growth, growth)


def test_the_docs_export_example_runs(tmp_path: Path) -> None:
    page = (REPO_ROOT / "docs" / "export.md").read_text()
    example = page.split("```python\n", 1)[1].split("```", 1)[0]
    url = f"sqlite+aiosqlite:///{tmp_path / 'readme.db'}"

    async def prepare() -> None:
        database = create_database(make_settings(database_url=url))
        await upgrade(database)
        await record_everything(database, varied_trades(100))
        await database.dispose()

    asyncio.run(prepare())
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DATABASE_URL": url}
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    first, summary, rows = done.stdout.splitlines()
    assert first == "25 decimal128(18, 8)" and rows == "25"
    assert summary.startswith("exported 25 trades to eurusd.parquet (parquet, ")


# ---------------------------------------------------------------------------------------------- one-line errors


@pytest.fixture(scope="module")
def exportable_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('export-errors') / 'bot.db'}"

    async def prepare() -> None:
        database = create_database(make_settings(database_url=url))
        try:
            await upgrade(database)
            await record_everything(database, varied_trades(3_000))
        finally:
            await database.dispose()

    asyncio.run(prepare())
    return url


def _export_to(output: str, fmt: str, url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The export command by its ``main()`` in this process: only its output and status are checked here (the
    command runs in a real subprocess in the summary-line test above)."""
    env = {**os.environ, "DATABASE_URL": url}
    return run_in_process("export", "trades", "--format", fmt, "-o", output, cwd=cwd, env=env)


def _assert_one_line(done: subprocess.CompletedProcess[str], output: str, cause: str) -> None:
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"persistence-sidecar: cannot write {output}: {cause}; nothing was written\n"


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_an_export_that_cannot_write_says_why_in_one_line_naming_the_users_path(
    tmp_path: Path, exportable_database: str, fmt: str
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    _assert_one_line(
        _export_to("missing/t.out", fmt, exportable_database, tmp_path),
        "missing/t.out",
        "the folder missing does not exist",
    )
    _assert_one_line(
        _export_to("a-file/sub/t.out", fmt, exportable_database, tmp_path),
        "a-file/sub/t.out",
        "a-file is a file, not a folder",
    )
    with small_tmpfs(tmp_path / "ro", "ro") as read_only:
        _assert_one_line(
            _export_to("ro/t.out", fmt, exportable_database, tmp_path), "ro/t.out", "the file system is read-only"
        )
        assert list(read_only.iterdir()) == []
    with small_tmpfs(tmp_path / "full") as full:
        _assert_one_line(
            _export_to("full/t.out", fmt, exportable_database, tmp_path),
            "full/t.out",
            "no space left on the device (the disk is full)",
        )
        assert list(full.iterdir()) == [], "the temporary file is removed"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file", "full", "ro"]


def test_a_csv_export_works_in_a_fresh_process_that_loaded_nothing_of_pyarrow_before(tmp_path: Path) -> None:
    """The CSV writer formats decimals and timestamps with ``pyarrow.compute``, which ``pyarrow`` alone does not load:
    in a process where nothing else imported it (the command line, a host's job), the export must load it itself."""
    script = textwrap.dedent(
        """
        import sys
        from datetime import UTC, datetime
        from pathlib import Path

        from persistence.tools.export_files import _iso_text, require_pyarrow

        assert "pyarrow.compute" not in sys.modules
        pa = require_pyarrow()
        column = pa.array([datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)], type=pa.timestamp("us", tz="UTC"))
        print(_iso_text(pa, column)[0].as_py())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2026-01-02T03:04:05.000000Z"
