"""Shared fixtures: a migrated database on every backend (a SQLite file per test; PostgreSQL when
``PERSISTENCE_TEST_POSTGRES_URL`` is set, in a throwaway database created for the session and dropped after).

Helpers that tests import live in ``tests/support/``; this file holds fixtures, and the ``--shard`` option with which
:mod:`tests.support.shards` runs the suite in several processes at once."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

from persistence.config import Settings
from persistence.db.engine import Database, create_database
from persistence.migrations import upgrade
from persistence.tables.repositories import Repositories
from tests.support import sqlite_file as sqlite_path_of
from tests.support.databases import (
    FUZZ,
    create_postgres_database,
    drop_postgres_database,
    empty_every_table,
    make_settings,
    reset_postgres,
)
from tests.support.shards import parse_shard, split

hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
hypothesis_settings.register_profile("fuzz", max_examples=2000, derandomize=False, print_blob=True)
hypothesis_settings.load_profile("fuzz" if FUZZ else "ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shard",
        default=None,
        metavar="K/N",
        help="run only this shard's tests: every N-th from the K-th, counted from 0 (see tests/support/shards.py)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``--shard K/N``: only this shard's tests (the others run in the other shards)."""
    option = config.getoption("shard")
    if option is None:
        return
    shard, shards = parse_shard(option)
    pinned = ["soak_figures" in getattr(item, "fixturenames", ()) for item in items]
    kept, dropped = split(items, shard, shards, pinned)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def _files_under(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file under ``folder`` (relative path) with its size and modification time; empty if there is none."""
    if not folder.is_dir():
        return {}
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
        if path.is_file()
    }


@pytest.fixture(scope="session", autouse=True)
def the_folder_the_suite_runs_in_is_not_written() -> Iterator[None]:
    """No test leaves the defaults' ``./data`` (database, journal, audit checkpoints) in the folder the suite was
    started from, the checkout: a test's sidecar keeps everything in a temporary folder (``make_settings``). The
    suite fails at its end if a file there was created or changed."""
    folder = Path.cwd() / "data"
    before = _files_under(folder)
    yield
    after = _files_under(folder)
    written = sorted(name for name, stamp in after.items() if before.get(name) != stamp)
    assert not written, f"tests wrote into {folder}: {written}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database that has never been migrated: a new SQLite file, or a new PostgreSQL database dropped after."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
        return
    url = create_postgres_database("persistence_fresh")
    yield url
    drop_postgres_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'trading.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'trading.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(scope="session")
def migrated_sqlite_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file the migrations brought to head, once per session; ``database`` copies it for each test."""
    path = tmp_path_factory.mktemp("migrated") / "trading.db"

    async def migrate() -> None:
        db = create_database(make_settings(database_url=f"sqlite+aiosqlite:///{path}"))
        try:
            await upgrade(db)
        finally:
            await db.dispose()

    asyncio.run(migrate())
    assert not path.with_name("trading.db-wal").exists(), "the template is whole in one file"
    return path


@pytest.fixture
async def database(database_url: str, migrated_sqlite_file: Path) -> AsyncIterator[Database]:
    """A migrated, empty database. On SQLite a copy of the file the migrations made once for the session (the same
    bytes a fresh upgrade writes; the migrations themselves are tested on fresh databases in test_migrations.py);
    on PostgreSQL the session's database, upgraded and emptied."""
    if database_url.startswith("sqlite"):
        shutil.copyfile(migrated_sqlite_file, sqlite_path_of(database_url))
    db = create_database(make_settings(database_url=database_url, query_timeout_ms=5000))
    if db.dialect_name == "postgresql":
        await upgrade(db)
        async with db.write() as connection:
            await empty_every_table(connection)
    try:
        yield db
    finally:
        await db.dispose()


@pytest.fixture
def repos(database: Database) -> Repositories:
    return Repositories(database)


# ---------------------------------------------------------------------------------------------- sidecars


@pytest.fixture
def sidecar_settings(tmp_path: Path) -> Any:
    """Settings for a sidecar on a given URL, with short timeouts and its journal in ``tmp_path``."""

    def build(database_url: str, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "journal_dir": tmp_path / "journal",
            "backup_dir": tmp_path / "backups",
            "audit_anchor_dir": tmp_path / "anchors",
            "query_timeout_ms": 300,
            "shutdown_timeout": 5.0,
        }
        values.update(overrides)
        return make_settings(**values)

    return build


@pytest.fixture
async def sidecars() -> AsyncIterator[list[Any]]:
    """A list tests append their sidecars to; every one is closed at the end."""
    created: list[Any] = []
    yield created
    for sidecar in created:
        await sidecar.close(timeout=2.0)


@pytest.fixture
async def clean_database_url(database_url: str) -> str:
    """``database_url`` with every table emptied (PostgreSQL is shared by the session)."""
    if database_url.startswith("postgresql"):
        await reset_postgres(database_url)
    return database_url
