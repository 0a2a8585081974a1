"""The history API over real HTTP (httpx through the ASGI app) on a real database: filters, pagination, sorting,
refusals, the wrapper, correlation ids, the token, the memory fallback, the flag, /metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from persistence import PersistenceSidecar
from persistence.app.api import create_app
from persistence.config import Settings
from persistence.testing import FakeClock
from tests.support import DatabaseLock, background_checkpoints_done, eventually, sqlite_file
from tests.support.api import (
    HISTORY,
    SEED,
    SIGNALS,
    ReadLock,
    assert_error,
    client_for,
    expected,
    ids,
    seed,
    seed_trades,
)
from tests.support.factories import BASE_TIME, make_trade
from tests.support.sidecars import build

SettingsFactory = Callable[..., Settings]


@pytest.fixture
async def sidecar(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> PersistenceSidecar:
    """A started sidecar of this test's own holding the seed trades and signals, all committed (for tests that change
    it; the read-only tests share one per backend in test_api_reads.py)."""
    current = build(sidecar_settings(clean_database_url), sidecars)
    await current.start()
    return await seed(current)


@pytest.fixture
async def client(sidecar: PersistenceSidecar) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(create_app(sidecar=sidecar)) as http:
        yield http


# ---------------------------------------------------------------------------------------------- filters


# ---------------------------------------------------------------------------------------------- refusals


# ---------------------------------------------------------------------------------------------- correlation ids


# ---------------------------------------------------------------------------------------------- the token


async def test_with_a_token_api_needs_the_bearer_and_metrics_stays_open(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    current = build(sidecar_settings(sqlite_url, api_token="s3cret-token"), sidecars)
    await current.start()
    async with client_for(create_app(sidecar=current)) as http:
        for path in (HISTORY, SIGNALS, "/api/v1/health", "/api/v1/trades/X"):
            body = assert_error(await http.get(path), 401, "unauthorized")
            assert "s3cret" not in str(body)
            assert_error(await http.get(path, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
            assert_error(await http.get(path, headers={"Authorization": "Basic s3cret-token"}), 401, "unauthorized")
        unauthorized_put = await http.put("/api/v1/persistence", json={"enabled": False})
        assert_error(unauthorized_put, 401, "unauthorized")
        assert current.enabled
        good = {"Authorization": "Bearer s3cret-token"}
        assert (await http.get(HISTORY, headers=good)).status_code == 200
        assert (await http.get("/api/v1/health", headers=good)).json()["data"]["enabled"] is True
        assert (await http.get("/metrics")).status_code == 200


# ---------------------------------------------------------------------------------------------- memory fallback


async def test_while_the_breaker_is_open_trade_reads_come_from_memory_and_signals_are_503(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    clock = FakeClock()
    current = build(sidecar_settings(clean_database_url, breaker_failure_threshold=1), sidecars, clock=clock)
    await current.start()
    for trade in seed_trades():
        current.record_trade(trade)
    await current.flush(10)
    async with client_for(create_app(sidecar=current)) as http:
        async with DatabaseLock(clean_database_url):
            unsaved = make_trade(trade_id="UNSAVED", symbol="EURUSD", pnl=Decimal("-5000"), entry_time=BASE_TIME)
            current.record_trade(unsaved)
            await eventually(lambda: current.breaker_state == "open")

            with capture_logs() as logs:
                response = await http.get(
                    HISTORY,
                    params={"symbol": "EURUSD", "sort_by": "pnl", "sort_order": "asc", "limit": 3, "offset": 1},
                    headers={"X-Correlation-ID": "during-outage"},
                )
            body = response.json()
            assert response.status_code == 200 and body["source"] == "memory"
            eurusd = sorted(
                [
                    (Decimal(r["pnl"]), f"API-{i:02d}")
                    for i, r in enumerate(SEED)
                    if r["symbol"] == "EURUSD" and r["pnl"]
                ]
            )
            # UNSAVED (-5000) is first, only in memory; offset 1 skips it.
            assert ids(response) == [trade_id for _, trade_id in eurusd[:3]]
            assert body["page"]["total"] == 1 + sum(1 for r in SEED if r["symbol"] == "EURUSD")
            assert {"event": "history_read_from_memory", "correlation_id": "during-outage"}.items() <= logs[0].items()

            first = await http.get(HISTORY, params={"symbol": "EURUSD", "sort_by": "pnl", "sort_order": "asc"})
            assert ids(first)[0] == "UNSAVED" and first.json()["data"][-1]["pnl"] is None
            dated = await http.get(HISTORY, params={"start_date": "2026-03-02T17:00:00Z", "session": "NY"})
            assert ids(dated) == ["API-10", "API-09"] and dated.json()["source"] == "memory"

            by_id = await http.get("/api/v1/trades/UNSAVED")
            assert by_id.status_code == 200 and by_id.json()["source"] == "memory"
            assert by_id.json()["data"]["pnl"] == "-5000.00000000"
            assert_error(await http.get("/api/v1/trades/NOWHERE"), 503, "database_unavailable")
            assert_error(await http.get(SIGNALS), 503, "database_unavailable")
            assert (await http.get("/api/v1/health")).json()["data"]["breaker"] == "open"
        clock.advance(30)
        await current.flush(15)
        after = await http.get(HISTORY, params={"symbol": "EURUSD", "sort_by": "pnl", "sort_order": "asc"})
        assert after.json()["source"] == "database" and ids(after)[0] == "UNSAVED"


async def test_when_the_database_cannot_be_read_trade_reads_come_from_memory(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    current = build(sidecar_settings(sqlite_url), sidecars)
    await current.start()
    for trade in seed_trades():
        current.record_trade(trade)
    await current.flush(10)
    assert current.database is not None
    async with client_for(create_app(sidecar=current)) as http:
        # Exclusive locking mode needs every other connection closed first; reads then open new ones and fail.
        await background_checkpoints_done()
        await current.database.dispose()
        with ReadLock(sqlite_file(sqlite_url)):
            response = await http.get(HISTORY, params={"pattern_type": "reversal", "limit": 2})
            assert response.status_code == 200 and response.json()["source"] == "memory"
            assert ids(response) == expected(lambda row, i: row["pattern_type"] == "reversal")[:2]
            assert current.breaker_state == "closed"
            assert (await http.get("/api/v1/trades/API-01")).json()["source"] == "memory"
            assert_error(await http.get(SIGNALS), 503, "database_unavailable")
        assert (await http.get(HISTORY)).json()["source"] == "database"


@pytest.mark.postgres
async def test_a_signal_query_that_times_out_is_a_504_in_the_wrapper(
    postgres_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    current = build(sidecar_settings(postgres_url, query_timeout_ms=300), sidecars)
    await current.start()
    async with client_for(create_app(sidecar=current)) as http, DatabaseLock(postgres_url):
        assert_error(await http.get(SIGNALS), 504, "query_timeout")
        # Trades have the in-memory history to answer from instead.
        assert (await http.get(HISTORY)).json()["source"] == "memory"


# ---------------------------------------------------------------------------------------------- health, flag, metrics


async def test_put_persistence_flips_the_flag_and_back(client: httpx.AsyncClient, sidecar: PersistenceSidecar) -> None:
    off = await client.put("/api/v1/persistence", json={"enabled": False})
    assert off.status_code == 200 and off.json()["data"]["enabled"] is False
    assert sidecar.enabled is False
    assert sidecar.record_trade(make_trade()).status == "disabled"
    assert sidecar.registry.get_sample_value("persistence_enabled") == 0.0
    assert (await client.get("/api/v1/health")).json()["data"]["enabled"] is False
    on = await client.put("/api/v1/persistence", json={"enabled": True})
    assert on.json()["data"]["enabled"] is True and sidecar.enabled is True
    assert await sidecar.record_trade(make_trade(trade_id="AFTER-ON")) == "persisted"
    assert sidecar.registry.get_sample_value("persistence_enabled") == 1.0


async def test_put_persistence_on_a_closed_sidecar_is_a_409(
    client: httpx.AsyncClient, sidecar: PersistenceSidecar
) -> None:
    await sidecar.close()
    assert_error(await client.put("/api/v1/persistence", json={"enabled": False}), 409, "sidecar_closed")


# ---------------------------------------------------------------------------------------------- OpenAPI and lifespan


async def test_the_app_lifespan_starts_and_closes_its_own_sidecar(
    sqlite_url: str, sidecar_settings: SettingsFactory
) -> None:
    app = create_app(sidecar_settings(sqlite_url))
    current: PersistenceSidecar = app.state.sidecar
    async with app.router.lifespan_context(app), client_for(app) as http:
        assert (await http.get("/api/v1/health")).json()["data"]["started"] is True
        assert await current.record_trade(make_trade()) == "persisted"
    assert current.health().closed is True
    with sqlite3.connect(sqlite_file(sqlite_url)) as connection:
        assert connection.execute("SELECT COUNT(*) FROM trades").fetchone()[0] == 1
    await asyncio.sleep(0)


# ---------------------------------------------------------------------------------------------- the contract


async def test_the_memory_fallback_honours_the_id_filters(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    current = build(sidecar_settings(clean_database_url, breaker_failure_threshold=1), sidecars, clock=FakeClock())
    await current.start()
    current.record_trade(make_trade(trade_id="ORD/2026/0001", signal_id="SIG/saved"))
    await current.flush(10)
    async with client_for(create_app(sidecar=current)) as http, DatabaseLock(clean_database_url):
        current.record_trade(make_trade(trade_id="history", signal_id="SIG/memory"))
        await eventually(lambda: current.breaker_state == "open")
        response = await http.get(HISTORY, params={"signal_id": "SIG/memory"})
        assert response.json()["source"] == "memory" and ids(response) == ["history"]
        response = await http.get(HISTORY, params={"trade_id": "ORD/2026/0001"})
        assert response.json()["source"] == "memory" and ids(response) == ["ORD/2026/0001"]
        assert response.json()["page"] == {"limit": 100, "offset": 0, "total": 1}


# ---------------------------------------------------------------------------------------------- offline docs
