"""Databases for tests: settings that never read a .env file, throwaway PostgreSQL databases, emptying tables,
and the Hypothesis example counts (`make test` derandomized, `make fuzz` twenty times more)."""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.config import Settings
from persistence.db.engine import create_database
from persistence.db.schema import TABLES
from persistence.migrations import upgrade

# Property and model tests: `make test` runs them derandomized (the same examples every run, no example database),
# so CI is deterministic; `make fuzz` (HYPOTHESIS_PROFILE=fuzz) explores with random seeds and many more examples.
# A failure found there becomes an explicit test. conftest.py loads the profile.
FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"


async def empty_every_table(connection: AsyncConnection) -> None:
    """Empty every table of a PostgreSQL test database, ``audit_log`` too (its triggers are off for this session)."""
    await connection.execute(text("SET LOCAL session_replication_role = replica"))
    await connection.execute(text(f"TRUNCATE {', '.join(table.name for table in TABLES)} RESTART IDENTITY"))


async def reset_postgres(database_url: str) -> None:
    """Migrate the PostgreSQL test database at ``database_url`` and empty it (it is shared by the session): no poison
    trigger left on ``trades``, every table empty."""
    database = create_database(make_settings(database_url=database_url))
    try:
        await upgrade(database)
        async with database.write() as connection:
            await connection.execute(text("DROP TRIGGER IF EXISTS poison ON trades"))
            await empty_every_table(connection)
    finally:
        await database.dispose()


def examples(count: int) -> int:
    """``max_examples`` for a test that sets its own: the count under `make test`, 20 times more under `make fuzz`."""
    return count * 20 if FUZZ else count


POSTGRES_ENV = "PERSISTENCE_TEST_POSTGRES_URL"
POSTGRES_SKIP_REASON = f"{POSTGRES_ENV} is not set; PostgreSQL tests skipped"


_FOLDERS = tempfile.TemporaryDirectory(prefix="persistence-test-folders-")
"""Where a test's settings put what they do not name, once per test process (removed when the process ends)."""


def make_settings(**overrides: Any) -> Settings:
    """Settings for tests: never read a developer's .env file, and never write in the checkout: the checkpoints'
    folder (``./data/anchors`` by default) is a temporary one of this process unless the test names one."""
    overrides.setdefault("audit_anchor_dir", Path(_FOLDERS.name) / "anchors")
    return Settings(_env_file=None, **overrides)


async def _admin(url: URL, *statements: str) -> None:
    connection = await asyncpg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        database=url.database,
    )
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


def create_postgres_database(prefix: str = "persistence_test") -> str:
    """Create an empty PostgreSQL database for a test and return its async URL."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(POSTGRES_SKIP_REASON)
    url = make_url(base)
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    asyncio.run(_admin(url, f'CREATE DATABASE "{name}"'))
    return url.set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(database_url: str) -> None:
    url = make_url(database_url)
    base = make_url(os.environ[POSTGRES_ENV])
    asyncio.run(_admin(base, f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
