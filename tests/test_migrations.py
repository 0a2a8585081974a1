"""Migrations: the packaged schema, idempotence, concurrent migrators, host logging, a data-keeping upgrade, and
downgrades (refused when they would drop data, unless forced)."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from persistence.db.engine import Database, create_database
from persistence.db.schema import metadata
from persistence.errors import DowngradeDataLossError
from persistence.migrations import current_revision, head_revision, migrate_to, upgrade
from persistence.tables.repositories import Repositories
from tests.support.cli import run_in_process
from tests.support.databases import make_settings
from tests.support.factories import make_trade

REPO_ROOT = Path(__file__).resolve().parent.parent
TABLES = {"trades", "signals", "performance_snapshots", "parameter_history", "dead_letters"}
INDEXES = {
    "trades": {"idx_trades_symbol_time", "idx_trades_session", "idx_trades_pattern"},
    "signals": {"idx_signals_generated_at"},
    "performance_snapshots": {"idx_snapshots_time"},
}


async def test_upgrade_creates_the_five_tables_indexes_and_checks(fresh_url: str) -> None:
    database = create_database(make_settings(database_url=fresh_url))
    try:
        assert await current_revision(database) is None
        assert await upgrade(database) == head_revision()
        async with database.read() as connection:

            def inspect_schema(sync_connection: object) -> tuple[set[str], dict[str, set[str]], int]:
                inspector = inspect(sync_connection)
                indexes = {table: {ix["name"] for ix in inspector.get_indexes(table)} for table in INDEXES}
                checks = sum(len(inspector.get_check_constraints(table)) for table in TABLES)
                return set(inspector.get_table_names()), indexes, checks  # type: ignore[return-value]

            tables, indexes, checks = await connection.run_sync(inspect_schema)
        assert tables >= TABLES
        for table, expected in INDEXES.items():
            assert expected <= indexes[table], table
        assert checks >= 7
    finally:
        await database.dispose()


async def test_the_migrations_produce_exactly_the_declared_schema(fresh_url: str) -> None:
    database = create_database(make_settings(database_url=fresh_url))
    try:
        await upgrade(database)
        async with database.read() as connection:
            diff = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync, opts={"compare_type": True}), metadata)
            )
        assert diff == []
    finally:
        await database.dispose()


async def test_upgrade_is_idempotent_and_keeps_data(fresh_url: str) -> None:
    database = create_database(make_settings(database_url=fresh_url))
    try:
        await upgrade(database)
        trade = make_trade()
        await Repositories(database).trades.save_trade(trade)
        assert await upgrade(database) == head_revision()
        assert await upgrade(database) == head_revision()
        assert await Repositories(database).trades.get_trade_by_id(trade.trade_id) == trade
        async with database.read() as connection:
            assert (await connection.execute(text("SELECT count(*) FROM alembic_version"))).scalar_one() == 1
    finally:
        await database.dispose()


async def test_a_current_database_is_upgraded_without_alembic_work_on_the_hosts_loop(
    fresh_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every start but the first finds the schema current: the version files are read in a worker thread and
    Alembic's command (env.py loaded, the plan made, on the loop's thread) is not run at all."""
    database = create_database(make_settings(database_url=fresh_url))
    loop_thread = threading.get_ident()
    read_on: list[int] = []
    loading = ScriptDirectory._load_revisions  # where Alembic reads and compiles the version files

    def load(self: ScriptDirectory) -> Any:
        read_on.append(threading.get_ident())
        return loading(self)

    def refused(*_: object, **__: object) -> None:
        raise AssertionError("alembic's upgrade ran on a current database")

    try:
        head = await upgrade(database)
        assert head == head_revision()
        monkeypatch.setattr(ScriptDirectory, "_load_revisions", load)
        monkeypatch.setattr(command, "upgrade", refused)
        assert await upgrade(database) == head
        assert read_on and loop_thread not in read_on
        read_on.clear()
        plan = await migrate_to(database, head)  # the same at the command's entry: nothing to do, nothing on the loop
        assert plan.direction == "none" and read_on and loop_thread not in read_on
    finally:
        await database.dispose()


def test_concurrent_migrators_in_separate_processes_corrupt_nothing(fresh_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": fresh_url, "PYTHONPATH": str(REPO_ROOT)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "persistence", "migrate"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outcomes = [process.communicate(timeout=120) for process in processes]
    for process, (out, err) in zip(processes, outcomes, strict=True):
        assert process.returncode == 0, err
        assert f"schema at revision {head_revision()}" in out
    if fresh_url.startswith("sqlite"):
        path = fresh_url.split(":///", 1)[1]
        with sqlite3.connect(path) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert connection.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
            names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            assert names >= TABLES


async def test_migrating_leaves_the_host_applications_logging_alone(sqlite_url: str) -> None:
    host = logging.getLogger("orchestrator.trading")
    handler = logging.NullHandler()
    host.addHandler(handler)
    host.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    known = {
        name: logger.disabled
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    database = create_database(make_settings(database_url=sqlite_url))
    try:
        await upgrade(database)
    finally:
        await database.dispose()
        host.removeHandler(handler)
    assert host.disabled is False
    assert host.level == logging.DEBUG
    assert root.level == root_level and root.handlers == root_handlers
    for name, was_disabled in known.items():
        assert logging.getLogger(name).disabled == was_disabled, name


DUMMY_MIGRATION = '''
"""Dummy follow-up migration used by the tests: adds a column and an index to trades."""
import sqlalchemy as sa
from alembic import op

revision = "9001"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trades") as batch:
        batch.add_column(sa.Column("broker_note", sa.String(64), nullable=True))
        batch.create_index("idx_trades_broker_note", ["broker_note"])


def downgrade() -> None:
    with op.batch_alter_table("trades") as batch:
        batch.drop_index("idx_trades_broker_note")
        batch.drop_column("broker_note")
'''


async def test_a_second_migration_keeps_the_data_of_a_populated_database(fresh_url: str, tmp_path: Path) -> None:
    extra = tmp_path / "extra_versions"
    extra.mkdir()
    (extra / "9001_dummy.py").write_text(dedent(DUMMY_MIGRATION.format(head=head_revision())))
    database = create_database(make_settings(database_url=fresh_url))
    try:
        await upgrade(database)
        repos = Repositories(database)
        recorded = [make_trade(pnl=f"-{i}.12345678") for i in range(50)]
        async with database.write() as connection:
            await repos.trades.upsert(connection, recorded)

        assert await upgrade(database, extra_version_locations=[extra]) == "9001"
        assert await upgrade(database, extra_version_locations=[extra]) == "9001"  # idempotent too

        async with database.read() as connection:
            columns = await connection.run_sync(lambda sync: {c["name"] for c in inspect(sync).get_columns("trades")})
        assert "broker_note" in columns
        for trade in recorded:
            assert await repos.trades.get_trade_by_id(trade.trade_id) == trade
        assert await repos.trades.count() == 50
    finally:
        await database.dispose()


# ---------------------------------------------------------------------------------------------- downgrades


async def _at_dummy_revision(url: str, extra: Path) -> Database:
    extra.mkdir(exist_ok=True)
    (extra / "9001_dummy.py").write_text(dedent(DUMMY_MIGRATION.format(head=head_revision())))
    database = create_database(make_settings(database_url=url))
    await upgrade(database, extra_version_locations=[extra])
    await Repositories(database).trades.save_trade(make_trade(trade_id="T-KEPT", pnl="-3.14159265"))
    return database


async def _columns(database: Database) -> set[str]:
    async with database.read() as connection:
        return await connection.run_sync(lambda sync: {c["name"] for c in inspect(sync).get_columns("trades")})


async def test_a_downgrade_that_would_drop_a_column_holding_data_is_refused_unless_forced(
    fresh_url: str, tmp_path: Path
) -> None:
    extra = tmp_path / "extra_versions"
    database = await _at_dummy_revision(fresh_url, extra)
    try:
        async with database.write() as connection:
            await connection.execute(text("UPDATE trades SET broker_note = 'called the desk'"))
        below = head_revision()  # the revision the dummy migration follows
        with pytest.raises(DowngradeDataLossError) as refused:
            await migrate_to(database, below, extra_version_locations=[extra])
        assert refused.value.losses == ["trades.broker_note"]
        assert "trades.broker_note" in str(refused.value) and "--force" in str(refused.value)
        assert await current_revision(database) == "9001" and "broker_note" in await _columns(database)

        plan = await migrate_to(database, below, force=True, extra_version_locations=[extra])
        assert (plan.current, plan.target, plan.direction) == ("9001", below, "downgrade")
        assert await current_revision(database) == below and "broker_note" not in await _columns(database)
        kept = await Repositories(database).trades.get_trade_by_id("T-KEPT")
        assert kept is not None and str(kept.pnl) == "-3.14159265"
    finally:
        await database.dispose()


async def test_a_downgrade_dropping_only_empty_columns_and_indexes_needs_no_force(
    fresh_url: str, tmp_path: Path
) -> None:
    extra = tmp_path / "extra_versions"
    database = await _at_dummy_revision(fresh_url, extra)
    try:
        below = head_revision()
        assert (await migrate_to(database, below, extra_version_locations=[extra])).direction == "downgrade"
        assert await current_revision(database) == below
        assert await Repositories(database).trades.count() == 1
        assert (await migrate_to(database, "head", extra_version_locations=[extra])).direction == "upgrade"
        assert await current_revision(database) == "9001"
        assert (await migrate_to(database, "9001", extra_version_locations=[extra])).direction == "none"
    finally:
        await database.dispose()


def test_migrate_to_base_on_a_database_with_data_is_refused_without_force(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "DATABASE_URL": f"sqlite+aiosqlite:///{path}",
        "PERSISTENCE_BACKUP_DIR": str(tmp_path / "backups"),
    }
    # The command by its main() in this process; migrate runs in real subprocesses in the tests around this one.
    assert run_in_process("migrate", cwd=tmp_path, env=env).returncode == 0
    with sqlite3.connect(path) as connection:
        connection.execute(
            "INSERT INTO parameter_history (id, change_time, parameter_mode, changed_by, created_at)"
            " VALUES ('p1', '2026-01-01 00:00:00.000000', 'safe', 'manual', '2026-01-01 00:00:00.000000')"
        )
    refused = run_in_process("migrate", "--to", "base", cwd=tmp_path, env=env)
    assert refused.returncode == 1
    assert "would drop parameter_history, which hold data; pass --force" in refused.stderr
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*) FROM parameter_history").fetchone() == (1,)
    one = run_in_process("migrate", "--to", "0001", cwd=tmp_path, env=env)
    assert one.returncode == 0, one.stderr
    assert (
        f"schema downgraded from revision {head_revision()} to 0001" in one.stdout
        and "backed up the database to" in one.stdout
    )
    forced = run_in_process("migrate", "--to", "base", "--force", cwd=tmp_path, env=env)
    assert forced.returncode == 0, forced.stderr
    assert "schema downgraded from revision 0001 to base" in forced.stdout
    with sqlite3.connect(path) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "parameter_history" not in tables and "trades" not in tables
    assert len(list((tmp_path / "backups").glob("bot-*.db"))) == 2


def test_migrate_waits_for_another_migrators_lock_longer_than_the_busy_timeout(tmp_path: Path) -> None:
    """Another process holds the SQLite file's lock for 2 s (a migrator creating a new schema under load): the
    revision read waits for it, as the migration itself would, instead of failing at the 1 s busy timeout."""
    path = tmp_path / "bot.db"
    env = {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{path}", "PYTHONPATH": str(REPO_ROOT)}
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("CREATE TABLE held (x)")
    migrator = subprocess.Popen(
        [sys.executable, "-m", "persistence", "migrate"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2)
    finally:
        holder.execute("COMMIT")
        holder.close()
    out, err = migrator.communicate(timeout=120)
    assert migrator.returncode == 0, err
    assert f"schema at revision {head_revision()}" in out
