"""The command line as a user runs it, from a clean working directory: every command.

Each command runs in a real subprocess at least once here (``run_cli``); the other checks of what a command prints
and the status it exits with call its ``main()`` in this process (``cli``), which sees the same environment,
working directory and streams (``tests.support.cli``)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from persistence import PersistenceSidecar
from persistence.write.journal import Journal
from tests.support.cli import run_in_process
from tests.support.databases import make_settings
from tests.support.factories import BASE_TIME, make_trade
from tests.support.portability import small_tmpfs

REPO_ROOT = Path(__file__).resolve().parent.parent


def cli_environment(**env: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "PERSISTENCE_", "ENABLE_"))}
    environment.update(env, PYTHONPATH=str(REPO_ROOT))
    return environment


def run_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m persistence ARGS`` in a subprocess: for what only a real process shows (its start from a clean
    directory, its environment, its signals, a backup beside a writer in another process)."""
    return subprocess.run(
        [sys.executable, "-m", "persistence", *args],
        cwd=cwd,
        env=cli_environment(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The same command by its ``main()`` in this process (``tests.support.cli``): its output and exit status."""
    return run_in_process(*args, cwd=cwd, env=cli_environment(**env))


def test_migrate_creates_the_default_database_with_the_five_tables(tmp_path: Path) -> None:
    result = run_cli("migrate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    database = tmp_path / "data" / "trading_system.db"
    assert database.exists()
    with sqlite3.connect(database) as connection:
        names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"trades", "signals", "performance_snapshots", "parameter_history", "dead_letters"} <= names


def test_status_reports_revision_and_counts(tmp_path: Path) -> None:
    assert cli("migrate", cwd=tmp_path).returncode == 0
    result = run_cli("status", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["schema_revision"] == report["head_revision"]
    assert report["tables"]["trades"] == 0
    assert report["path"].endswith("trading_system.db") and report["size_bytes"] > 0


def test_status_prints_table_counts_as_rows_of_the_table(tmp_path: Path) -> None:
    assert cli("migrate", cwd=tmp_path).returncode == 0
    settings = make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'data' / 'trading_system.db'}")

    async def record() -> None:
        async with PersistenceSidecar(settings.model_copy(update={"journal_dir": tmp_path / "j"})) as sidecar:
            for n in range(3):
                sidecar.record_trade(make_trade(trade_id=f"STATUS-{n}"))
            await sidecar.flush(10)

    asyncio.run(record())
    result = cli("status", cwd=tmp_path, PERSISTENCE_API_PORT=str(free_port()))
    assert result.returncode == 0, result.stderr
    rows = dict(line.strip().split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert rows["trades"] == "3 rows" and rows["signals"] == "0 rows" and rows["dead_letters"] == "0 rows"
    assert "{" not in result.stdout, "no Python dict in the text output"


def test_a_configuration_error_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli("migrate", cwd=tmp_path, ENABLE_DATABASE_PERSISTENCE="maybe")
    assert result.returncode == 2
    assert "ENABLE_DATABASE_PERSISTENCE" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_status_never_prints_the_database_password(tmp_path: Path) -> None:
    result = run_cli(
        "status",
        cwd=tmp_path,
        DATABASE_URL="postgresql+asyncpg://trader:hunter2@127.0.0.1:1/nowhere",
        DATABASE_QUERY_TIMEOUT="500",
    )
    assert "hunter2" not in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------- help, status


@pytest.mark.parametrize("command", ["demo", "serve", "migrate", "status", "backup", "history"])
def test_every_command_has_help(tmp_path: Path, command: str) -> None:
    result = cli(command, "--help", cwd=tmp_path)
    assert result.returncode == 0 and "usage: persistence-sidecar " + command in result.stdout
    assert not (tmp_path / "data").exists()


def test_top_level_help_lists_every_command(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("demo", "serve", "migrate", "status", "backup", "history"):
        assert command in result.stdout


def test_status_reports_journal_depth_and_no_server_without_creating_the_journal(tmp_path: Path) -> None:
    assert cli("migrate", cwd=tmp_path).returncode == 0
    env = {"PERSISTENCE_API_PORT": str(free_port())}
    report = json.loads(cli("status", "--json", cwd=tmp_path, **env).stdout)
    assert report["journal_pending"] == 0 and report["server"]["running"] is False
    assert not (tmp_path / "data" / "journal").exists()
    text = cli("status", cwd=tmp_path, **env)
    assert text.returncode == 0 and "not running" in text.stdout


def test_status_counts_records_left_in_the_journal(tmp_path: Path) -> None:
    assert cli("migrate", cwd=tmp_path).returncode == 0
    journal = Journal(tmp_path / "data" / "journal")
    journal.append([{"kind": "trade", "n": n} for n in range(3)])
    journal.sync()
    journal.close()
    report = json.loads(cli("status", "--json", cwd=tmp_path, PERSISTENCE_API_PORT=str(free_port())).stdout)
    assert report["journal_pending"] == 3


@pytest.mark.parametrize(
    "database_url",
    ["postgresql+asyncpg://trader:hunter2@127.0.0.1:1/nowhere", "sqlite+aiosqlite:///{tmp}/a-directory"],
    ids=["postgres-refused", "sqlite-not-a-file"],
)
def test_status_on_an_unreachable_database_is_one_clear_line_and_exit_1(tmp_path: Path, database_url: str) -> None:
    (tmp_path / "a-directory").mkdir()
    result = cli("status", cwd=tmp_path, DATABASE_URL=database_url.format(tmp=tmp_path), DATABASE_QUERY_TIMEOUT="500")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "unreachable" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "hunter2" not in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------- serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until_serving(base: str, process: subprocess.Popen[str], token: str | None = None) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            get(f"{base}/api/v1/health", token)
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("serve never answered")


def test_serve_answers_over_a_real_port_with_the_token_and_stops_on_sigterm(tmp_path: Path) -> None:
    seed_trades(tmp_path / "data" / "trading_system.db", 3)
    port = free_port()
    env = {"PERSISTENCE_API_PORT": str(port), "PERSISTENCE_API_TOKEN": "serve-token"}
    process = subprocess.Popen(
        [sys.executable, "-m", "persistence", "serve"],
        cwd=tmp_path,
        env=cli_environment(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, process, "serve-token")
        status, body = get(f"{base}/api/v1/trades/history?sort_by=pnl&sort_order=asc", "serve-token")
        assert status == 200
        answer = json.loads(body)
        assert answer["source"] == "database" and answer["page"]["total"] == 3
        assert get(f"{base}/api/v1/health")[0] == 401
        assert get(f"{base}/metrics")[0] == 200
        status_report = cli("status", cwd=tmp_path, **env)
        assert f"running at {base}, breaker closed" in status_report.stdout, status_report.stdout
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert f"{base}/api/v1" in stdout and "stopped" in stdout
    assert "serve-token" not in stdout + stderr


def test_serve_on_a_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", cwd=tmp_path, PERSISTENCE_API_PORT=str(port))
    assert result.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------- backup


Seeder = Callable[[Path, int], None]


def seed_trades(database: Path, count: int, *, prefix: str = "SEED", instance_id: str | None = None) -> None:
    """``count`` trades recorded through a real sidecar into ``database`` (P&L alternating in sign), by the
    orchestrator ``instance_id`` when one is given (else the host name)."""

    async def record() -> None:
        named = {"instance_id": instance_id} if instance_id is not None else {}
        settings = make_settings(
            database_url=f"sqlite+aiosqlite:///{database}", journal_dir=database.parent / "journal", **named
        )
        async with PersistenceSidecar(settings, log_events=False) as sidecar:
            for n in range(count):
                sidecar.record_trade(
                    make_trade(
                        trade_id=f"{prefix}-{n:05d}",
                        symbol=("EURUSD", "GBPUSD")[n % 2],
                        session=("LONDON", "NY", "TOKYO")[n % 3],
                        pnl=Decimal(n * 10) * (-1 if n % 2 else 1),
                        entry_time=BASE_TIME + timedelta(minutes=n),
                    )
                )
            await sidecar.flush(30)

    asyncio.run(record())


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeder:
    """``seeded(database, count)``: what ``seed_trades(database, count)`` leaves in ``database``'s folder, recorded
    through a real sidecar once per module and copied into place for each test; each test changes only its copy."""
    made: dict[int, Path] = {}

    def place(database: Path, count: int) -> None:
        if count not in made:
            folder = tmp_path_factory.mktemp(f"seeded-{count}") / database.parent.name
            seed_trades(folder / database.name, count)
            made[count] = folder
        shutil.copytree(made[count], database.parent, dirs_exist_ok=True)

    return place


def test_backup_while_a_writer_is_busy_is_a_consistent_copy(tmp_path: Path, seeded: Seeder) -> None:
    database = tmp_path / "data" / "trading_system.db"
    seeded(database, 3000)
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        connection = sqlite3.connect(database, isolation_level=None, timeout=10)
        while not stop.is_set():
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(
                "INSERT INTO trades (trade_id, symbol, direction, entry_time, entry_price, position_size,"
                " created_at, updated_at) SELECT 'BUSY-' || ?, symbol, direction, entry_time, entry_price,"
                " position_size, created_at, updated_at FROM trades LIMIT 1",
                (written[0],),
            )
            connection.execute("COMMIT")
            written[0] += 1
        connection.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        before = written[0]
        result = run_cli("backup", str(tmp_path / "copy.db"), cwd=tmp_path)
        during = written[0] - before
    finally:
        stop.set()
        thread.join()
    assert result.returncode == 0, result.stderr
    assert "integrity ok" in result.stdout
    assert during > 0, "the writer was held up for the whole backup"
    with sqlite3.connect(tmp_path / "copy.db") as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        trades_in_copy = copy.execute("SELECT COUNT(*) FROM trades").fetchone()[0]
        busy_in_copy = copy.execute("SELECT COUNT(*) FROM trades WHERE trade_id LIKE 'BUSY-%'").fetchone()[0]
        assert copy.execute("SELECT COUNT(*) FROM trades WHERE trade_id LIKE 'SEED-%'").fetchone()[0] == 3000
    # A snapshot: the busy rows in the copy are exactly a prefix of what was written, none torn.
    assert trades_in_copy == 3000 + busy_in_copy and busy_in_copy <= written[0]
    assert run_cli("backup", str(tmp_path / "copy.db"), cwd=tmp_path).returncode == 1  # no silent overwrite


def test_a_backup_that_cannot_be_written_is_one_line_and_leaves_nothing_nor_harms_the_last_backup(
    tmp_path: Path, seeded: Seeder
) -> None:
    seeded(tmp_path / "data" / "trading_system.db", 3000)
    (tmp_path / "a-file").write_text("not a folder")
    for destination, cause in (
        ("missing/b.db", "the folder missing does not exist"),
        ("a-file/b.db", "a-file is a file, not a folder"),
    ):
        result = cli("backup", destination, cwd=tmp_path)
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr == f"persistence-sidecar: cannot back up to {destination}: {cause}; nothing was written\n"
    with small_tmpfs(tmp_path / "ro", "ro"):
        result = cli("backup", "ro/b.db", cwd=tmp_path)
        assert result.stderr == (
            "persistence-sidecar: cannot back up to ro/b.db: the file system is read-only; nothing was written\n"
        )
    with small_tmpfs(tmp_path / "full", size="64k") as full:
        (full / "b.db").write_bytes(b"the last good backup")
        result = cli("backup", "full/b.db", "--force", cwd=tmp_path)
        assert result.returncode == 1 and result.stderr == (
            "persistence-sidecar: cannot back up to full/b.db: no space left on the device (the disk is full);"
            " nothing was written\n"
        )
        assert [path.name for path in full.iterdir()] == ["b.db"]
        assert (full / "b.db").read_bytes() == b"the last good backup", "--force replaces only with a whole backup"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file", "data", "full", "ro"]


def test_backup_on_postgres_points_to_pg_dump_and_exits_2(tmp_path: Path) -> None:
    result = cli(
        "backup", str(tmp_path / "x.db"), cwd=tmp_path, DATABASE_URL="postgresql+asyncpg://u:pw-secret@127.0.0.1:1/db"
    )
    assert result.returncode == 2 and "pg_dump" in result.stderr
    assert "pw-secret" not in result.stderr and not (tmp_path / "x.db").exists()


# ---------------------------------------------------------------------------------------------- history


def test_history_prints_a_table_with_the_apis_filters_and_sorting(tmp_path: Path, seeded: Seeder) -> None:
    seeded(tmp_path / "data" / "trading_system.db", 12)
    result = run_cli(
        "history", "--symbol", "GBPUSD", "--sort-by", "pnl", "--sort-order", "asc", "--limit", "3", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["TRADE_ID", "SYMBOL", "DIR"]
    rows = [line.split()[0] for line in lines[2:5]]
    assert rows == ["SEED-00011", "SEED-00009", "SEED-00007"]  # P&L -110, -90, -70
    assert "3 trade(s) shown (1-3 of 6), sorted by pnl asc" in result.stdout
    dated = cli(
        "history",
        "--session",
        "tokyo",
        "--start-date",
        "2026-03-02T08:05:00Z",
        "--pattern-type",
        "breakout",
        cwd=tmp_path,
    )
    assert [line.split()[0] for line in dated.stdout.splitlines()[2:4]] == ["SEED-00011", "SEED-00008"]
    assert cli("history", "--symbol", "XAUUSD", cwd=tmp_path).stdout.strip() == "no trades match"


def test_history_filters_by_trade_id_and_prints_json_in_the_apis_shape(tmp_path: Path, seeded: Seeder) -> None:
    seeded(tmp_path / "data" / "trading_system.db", 12)
    result = cli("history", "--trade-id", "SEED-00003", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert [trade["trade_id"] for trade in answer["data"]] == ["SEED-00003"]
    assert answer["page"] == {"limit": 20, "offset": 0, "total": 1}


def test_history_filters_by_the_orchestrator_that_wrote_the_trades(tmp_path: Path) -> None:
    database = tmp_path / "data" / "trading_system.db"
    seed_trades(database, 3, prefix="DESKA", instance_id="desk-a")
    seed_trades(database, 2, prefix="DESKB", instance_id="desk-b")
    result = cli("history", "--instance-id", "desk-b", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert [trade["trade_id"] for trade in answer["data"]] == ["DESKB-00001", "DESKB-00000"]
    assert answer["page"]["total"] == 2
    table = cli("history", "--instance-id", "desk-a", cwd=tmp_path)
    assert [line.split()[0] for line in table.stdout.splitlines()[2:5]] == ["DESKA-00002", "DESKA-00001", "DESKA-00000"]
    assert "3 trade(s) shown (1-3 of 3)" in table.stdout
    assert cli("history", "--instance-id", "desk-c", cwd=tmp_path).stdout.strip() == "no trades match"
    # Bytes that are not UTF-8 arrive as lone surrogates: refused like NUL, never a traceback.
    refused = run_cli("history", "--instance-id", "desk-\udcff", cwd=tmp_path)
    assert refused.returncode == 2 and "instance_id" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("--sort-by", "pnl; DROP TABLE trades"),
        ("--sort-order", "up"),
        ("--limit", "0"),
        ("--limit", "1001"),
        ("--start-date", "yesterday"),
        ("--session", "MOON"),
        ("--start-date", "9999-12-31T23:59:59-05:00"),
        ("--end-date", "0001-01-01T00:00:00+05:00"),
    ],
)
def test_history_refuses_bad_arguments_with_exit_2(tmp_path: Path, args: tuple[str, str], seeded: Seeder) -> None:
    seeded(tmp_path / "data" / "trading_system.db", 1)
    result = cli("history", *args, cwd=tmp_path)
    assert result.returncode == 2 and args[0] in result.stderr and "Traceback" not in result.stderr
    with sqlite3.connect(tmp_path / "data" / "trading_system.db") as connection:
        assert connection.execute("SELECT COUNT(*) FROM trades").fetchone()[0] == 1


# ---------------------------------------------------------------------------------------------- reading never creates

READING_COMMANDS = [
    ("status",),
    ("history",),
    ("export", "trades", "-o", "out.parquet"),
    ("audit", "verify"),
    ("audit", "versions", "trade", "T-1"),
]


@pytest.mark.parametrize("command", READING_COMMANDS, ids=lambda command: " ".join(command[:2]))
def test_a_command_that_reads_a_database_that_does_not_exist_says_so_and_creates_nothing(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    result = cli(*command, cwd=tmp_path, DATABASE_URL="sqlite+aiosqlite:///typo/trading.db")
    result_here = cli(*command, cwd=tmp_path, DATABASE_URL="sqlite+aiosqlite:///typo.db")
    for done, path in ((result, "typo/trading.db"), (result_here, "typo.db")):
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.startswith(f"persistence-sidecar: the database {path} does not exist")
        assert len(done.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.postgres
@pytest.mark.parametrize("command", READING_COMMANDS, ids=lambda command: " ".join(command[:2]))
def test_a_command_that_reads_a_postgresql_database_that_does_not_exist_is_one_line(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    base = os.environ.get("PERSISTENCE_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("PERSISTENCE_TEST_POSTGRES_URL is not set; PostgreSQL tests skipped")
    missing = base.rsplit("/", 1)[0] + "/persistence_no_such_database"
    done = cli(*command, cwd=tmp_path, DATABASE_URL=missing)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(
        "persistence-sidecar: the database 'persistence_no_such_database' does not exist on the server"
    )
    assert len(done.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
