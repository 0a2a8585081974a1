"""Migrations: the packaged schema, idempotence, concurrent migrators, host logging, and a data-keeping upgrade."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from persistence.db import create_database
from persistence.migrations import current_revision, head_revision, upgrade
from persistence.repositories import Repositories
from persistence.schema import metadata
from tests.conftest import create_postgres_database, drop_postgres_database, make_settings
from tests.factories import make_trade

REPO_ROOT = Path(__file__).resolve().parent.parent
TABLES = {"trades", "signals", "performance_snapshots", "parameter_history", "dead_letters"}
INDEXES = {
    "trades": {"idx_trades_symbol_time", "idx_trades_session", "idx_trades_pattern"},
    "signals": {"idx_signals_generated_at"},
    "performance_snapshots": {"idx_snapshots_time"},
}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database that has never been migrated."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
        return
    url = create_postgres_database("persistence_migration")
    yield url
    drop_postgres_database(url)


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
