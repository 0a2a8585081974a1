"""Pooled PostgreSQL connections are pinged only after sitting idle, against a real server whose backends are killed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from persistence.db.engine import create_database
from persistence.db.pool_ping import IDLE_SECONDS, ping_when_idle
from tests.support.databases import POSTGRES_ENV, POSTGRES_SKIP_REASON, make_settings

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not os.environ.get(POSTGRES_ENV), reason=POSTGRES_SKIP_REASON),
]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[tuple[AsyncEngine, Clock, list[object]]]:
    clock = Clock()
    built = create_async_engine(postgres_url, pool_size=1, max_overflow=0)
    ping_when_idle(built, idle_seconds=IDLE_SECONDS, clock=clock)
    pings: list[object] = []
    ping = built.sync_engine.dialect.do_ping

    def counted(dbapi_connection: object) -> bool:
        pings.append(dbapi_connection)
        return ping(dbapi_connection)

    built.sync_engine.dialect.do_ping = counted  # type: ignore[method-assign]
    yield built, clock, pings
    await built.dispose()


async def backend_of(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def kill(postgres_url: str, pid: int) -> None:
    connection = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        assert await connection.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await connection.close()


async def pooled_then_killed(engine: AsyncEngine, postgres_url: str) -> int:
    """Use the pool's one connection, return it, then kill its backend (as a restart would); its pid."""
    pid = await backend_of(engine)
    await kill(postgres_url, pid)
    return pid


async def test_a_connection_used_a_moment_ago_is_not_pinged(engine: tuple[AsyncEngine, Clock, list[object]]) -> None:
    built, clock, pings = engine
    first = await backend_of(built)
    for _ in range(5):
        clock.now += IDLE_SECONDS / 2
        assert await backend_of(built) == first
    assert pings == []


async def test_an_idle_connection_that_died_is_replaced_before_use(
    engine: tuple[AsyncEngine, Clock, list[object]], postgres_url: str
) -> None:
    built, clock, pings = engine
    first = await pooled_then_killed(built, postgres_url)
    clock.now += IDLE_SECONDS + 0.1
    second = await backend_of(built)  # no error: the ping found it gone and the pool connected anew
    assert second != first
    assert len(pings) == 1
    assert await backend_of(built) == second
    assert len(pings) == 1  # the new connection was not idle


async def test_a_connection_that_died_within_the_window_fails_once_then_the_pool_recovers(
    engine: tuple[AsyncEngine, Clock, list[object]], postgres_url: str
) -> None:
    built, _clock, pings = engine
    first = await pooled_then_killed(built, postgres_url)
    with pytest.raises(DBAPIError) as failure:
        await backend_of(built)
    assert failure.value.connection_invalidated  # what the writer's retry sees as transient
    assert await backend_of(built) != first
    assert pings == []


async def test_the_sidecars_engine_replaces_a_connection_that_died_while_idle(postgres_url: str) -> None:
    database = create_database(make_settings(database_url=postgres_url))
    try:
        first = await pooled_then_killed(database.engine, postgres_url)
        await asyncio.sleep(IDLE_SECONDS + 0.1)  # the real clock: one idle window
        assert await backend_of(database.engine) != first  # no error: pinged and replaced
    finally:
        await database.dispose()
