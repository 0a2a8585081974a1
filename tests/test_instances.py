"""Several orchestrators on one database: the ``instance_id`` filters of the history API and the queries, start-up
loading only this orchestrator's trades, and ``GET /api/v1/trades/{trade_id}/versions`` over real HTTP."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import text

from persistence import PersistenceSidecar
from persistence.app.api import HistoryEnvelope, TradeVersion, create_app
from persistence.audit.chain import BASELINE_INSTANCE
from persistence.config import Settings
from persistence.errors import InvalidQueryError
from persistence.tables.queries import SignalQuery, TradeQuery
from persistence.testing import FakeClock
from tests.support import DatabaseLock, eventually
from tests.support.api import assert_error, client_for, ids
from tests.support.factories import BASE_TIME, make_signal, make_trade
from tests.support.sidecars import build

SettingsFactory = Callable[..., Settings]
HISTORY = "/api/v1/trades/history"
SIGNALS = "/api/v1/signals/history"
DESK_A, DESK_B = "desk-a", "desk-b"


def versions_path(trade_id: str) -> str:
    return f"/api/v1/trades/{quote(trade_id, safe='')}/versions"


def desk(
    name: str,
    database_url: str,
    sidecar_settings: SettingsFactory,
    sidecars: list[Any],
    clock: FakeClock | None = None,
    **overrides: Any,
) -> PersistenceSidecar:
    """A sidecar for the orchestrator ``name``, with its own journal, on the shared database."""
    settings = sidecar_settings(
        database_url, instance_id=name, journal_dir=sidecar_settings(database_url).journal_dir / name, **overrides
    )
    return build(settings, sidecars, clock=clock)


async def started_desks(
    database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> tuple[PersistenceSidecar, PersistenceSidecar]:
    """Desk A and desk B on one database, both started."""
    a = desk(DESK_A, database_url, sidecar_settings, sidecars)
    b = desk(DESK_B, database_url, sidecar_settings, sidecars)
    await a.start()
    await b.start()
    return a, b


async def record_desk(current: PersistenceSidecar, prefix: str, count: int, *, hours: int = 0) -> list[str]:
    """``count`` trades and one signal per trade, recorded and committed by ``current``; the trade ids."""
    trade_ids = [f"{prefix}-{n}" for n in range(count)]
    for n, trade_id in enumerate(trade_ids):
        current.record_trade(make_trade(trade_id=trade_id, entry_time=BASE_TIME + timedelta(hours=hours + n)))
        current.record_signal(
            make_signal(signal_id=f"SIG-{trade_id}", generated_at=BASE_TIME + timedelta(hours=hours + n))
        )
    await current.flush(10)
    return trade_ids


# ---------------------------------------------------------------------------------------------- filters


async def test_two_instances_on_one_database_each_filter_returns_only_its_rows(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    a, b = await started_desks(clean_database_url, sidecar_settings, sidecars)
    a_ids = await record_desk(a, "A", 3)
    b_ids = await record_desk(b, "B", 2, hours=10)
    newest_first = [*reversed(b_ids), *reversed(a_ids)]
    async with client_for(create_app(sidecar=a)) as http:
        for instance, expected in ((DESK_A, a_ids), (DESK_B, b_ids)):
            trades = await http.get(HISTORY, params={"instance_id": instance})
            assert trades.json()["source"] == "database"
            assert ids(trades) == list(reversed(expected)) and trades.json()["page"]["total"] == len(expected)
            signals = await http.get(SIGNALS, params={"instance_id": instance})
            assert ids(signals) == [f"SIG-{trade_id}" for trade_id in reversed(expected)]
        assert ids(await http.get(HISTORY)) == newest_first
        assert len((await http.get(SIGNALS)).json()["data"]) == 5
        assert ids(await http.get(HISTORY, params={"instance_id": "desk-c"})) == []
        assert ids(await http.get(SIGNALS, params={"instance_id": "desk-c"})) == []
        combined = await http.get(HISTORY, params={"instance_id": DESK_B, "trade_id": "A-0"})
        assert ids(combined) == []
    page = await b.trades.query(TradeQuery(instance_id=DESK_A, sort_order="asc"), with_total=True)
    assert [trade.trade_id for trade in page.items] == a_ids and page.total == 3
    signal_page = await b.signals.query(SignalQuery(instance_id=DESK_B, sort_order="asc"))
    assert [signal.signal_id for signal in signal_page.items] == [f"SIG-{trade_id}" for trade_id in b_ids]


async def test_the_instance_filter_follows_the_orchestrator_that_wrote_the_row_last(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    a, b = await started_desks(clean_database_url, sidecar_settings, sidecars)
    await record_desk(a, "A", 2)
    b.record_trade(make_trade(trade_id="A-1", entry_time=BASE_TIME, exit_price=Decimal("1.1")))
    await b.flush(10)
    assert [t.trade_id for t in (await a.trades.query(instance_id=DESK_A)).items] == ["A-0"]
    assert [t.trade_id for t in (await a.trades.query(instance_id=DESK_B)).items] == ["A-1"]


@pytest.mark.parametrize("path", [HISTORY, SIGNALS])
async def test_an_instance_filter_with_nul_is_a_422_naming_it(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any], path: str
) -> None:
    current = desk(DESK_A, clean_database_url, sidecar_settings, sidecars)
    await current.start()
    await record_desk(current, "A", 1)
    async with client_for(create_app(sidecar=current)) as http:
        body = assert_error(await http.get(path, params={"instance_id": "desk\x00a"}), 422, "invalid_parameter")
        assert "instance_id" in body["error"]["message"]
        assert len((await http.get(path, params={"instance_id": DESK_A})).json()["data"]) == 1


@pytest.mark.parametrize("query", [TradeQuery, SignalQuery])
@pytest.mark.parametrize("value", ["desk\x00a", "\udc80"])
def test_the_query_objects_refuse_nul_and_surrogates_in_the_instance_filter(
    query: type[TradeQuery] | type[SignalQuery], value: str
) -> None:
    with pytest.raises(InvalidQueryError) as refused:
        query(instance_id=value)
    assert refused.value.parameter == "instance_id"


def test_in_memory_the_history_is_this_processs_own_for_the_instance_filter() -> None:
    history = [make_trade(trade_id=f"M-{n}", entry_time=BASE_TIME + timedelta(hours=n)) for n in range(3)]
    own = TradeQuery(instance_id=DESK_A, sort_order="asc", limit=2)
    assert own.page(history, DESK_A) == (history[:2], 3)
    assert TradeQuery(instance_id=DESK_B).page(history, DESK_A) == ([], 0)
    assert TradeQuery(instance_id=DESK_A).page(history, None) == ([], 0)
    assert TradeQuery(sort_order="asc").page(history, DESK_A) == (history, 3)
    assert TradeQuery(instance_id=DESK_A, trade_id="M-1").page(history, DESK_A) == ([history[1]], 1)


async def test_while_the_breaker_is_open_the_instance_filter_answers_from_memory(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    current = desk(DESK_A, clean_database_url, sidecar_settings, sidecars, FakeClock(), breaker_failure_threshold=1)
    await current.start()
    saved = await record_desk(current, "A", 2)
    async with client_for(create_app(sidecar=current)) as http, DatabaseLock(clean_database_url):
        current.record_trade(make_trade(trade_id="A-unsaved", entry_time=BASE_TIME + timedelta(days=1)))
        await eventually(lambda: current.breaker_state == "open")
        own = await http.get(HISTORY, params={"instance_id": DESK_A})
        assert own.json()["source"] == "memory" and ids(own) == ["A-unsaved", *reversed(saved)]
        other = await http.get(HISTORY, params={"instance_id": DESK_B})
        assert other.json()["source"] == "memory" and ids(other) == []
        assert other.json()["page"] == {"limit": 100, "offset": 0, "total": 0}


# ---------------------------------------------------------------------------------------------- start-up


async def test_start_up_loads_only_this_instances_trades_and_those_from_before_the_trail(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    baseline = desk(BASELINE_INSTANCE, clean_database_url, sidecar_settings, sidecars)
    await baseline.start()
    await record_desk(baseline, "OLD", 2, hours=-10)
    a, b = await started_desks(clean_database_url, sidecar_settings, sidecars)
    a_ids = await record_desk(a, "A", 3)
    b_ids = await record_desk(b, "B", 3, hours=10)
    assert b.database is not None
    async with b.database.write() as connection:  # a row written by something other than a sidecar: no instance
        await connection.execute(text("UPDATE trades SET instance_id = NULL WHERE trade_id = 'OLD-1'"))
    for current in (baseline, a, b):
        await current.close()

    restarted_a = desk(DESK_A, clean_database_url, sidecar_settings, sidecars)
    restarted_b = desk(DESK_B, clean_database_url, sidecar_settings, sidecars)
    await restarted_a.start()
    await restarted_b.start()
    assert [t.trade_id for t in restarted_a.trade_history] == ["OLD-0", "OLD-1", *a_ids]
    assert [t.trade_id for t in restarted_b.trade_history] == ["OLD-0", "OLD-1", *b_ids]
    assert restarted_a.runtime is not None and restarted_a.runtime.history_loaded == 5


async def test_the_history_window_is_filled_with_this_instances_newest_trades_not_cut_by_others(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    a = desk(DESK_A, clean_database_url, sidecar_settings, sidecars)
    await a.start()
    a_ids = await record_desk(a, "A", 3)
    await a.close()
    b = desk(DESK_B, clean_database_url, sidecar_settings, sidecars)
    await b.start()
    await record_desk(b, "B", 3, hours=10)  # updated after every trade of desk-a
    await b.close()
    restarted = desk(DESK_A, clean_database_url, sidecar_settings, sidecars, history_max=2)
    await restarted.start()
    assert [t.trade_id for t in restarted.trade_history] == a_ids[1:]
    everyone = await restarted.trades.get_latest_trades(2)
    assert [t.trade_id for t in everyone] == ["B-1", "B-2"]


# ---------------------------------------------------------------------------------------------- versions


@pytest.fixture
async def opened_and_closed(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> PersistenceSidecar:
    """A sidecar of desk-a whose trade ``ORD/2026/7`` was committed open, then closed (two audited versions)."""
    current = desk(DESK_A, clean_database_url, sidecar_settings, sidecars)
    await current.start()
    opened = make_trade(trade_id="ORD/2026/7", entry_time=BASE_TIME, entry_price=Decimal("1.08"))
    current.record_trade(opened)
    await current.flush(10)
    current.record_trade(make_trade(trade_id="OTHER", entry_time=BASE_TIME))
    await current.flush(10)
    closed = opened.model_copy(
        update={
            "exit_time": BASE_TIME + timedelta(hours=2),
            "exit_price": Decimal("1.09"),
            "pnl": Decimal("1000"),
            "updated_at": opened.updated_at + timedelta(hours=2),
        }
    )
    current.record_trade(closed)
    await current.flush(10)
    return current


async def test_versions_lists_a_trades_open_then_closed_versions_oldest_first(
    opened_and_closed: PersistenceSidecar,
) -> None:
    async with client_for(create_app(sidecar=opened_and_closed)) as http:
        response = await http.get(versions_path("ORD/2026/7"), headers={"X-Correlation-ID": "versions-1"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"data", "error", "correlation_id", "page", "source"}
    assert body["error"] is None and body["source"] == "database"
    assert body["correlation_id"] == response.headers["X-Correlation-ID"] == "versions-1"
    assert body["page"] == {"limit": 100, "offset": 0, "total": 2}
    opened, closed = body["data"]
    assert (opened["version"]["exit_price"], opened["version"]["pnl"]) == (None, None)
    assert (closed["version"]["exit_price"], closed["version"]["pnl"]) == ("1.09000000", "1000.00000000")
    assert opened["version"]["entry_price"] == closed["version"]["entry_price"] == "1.08000000"
    assert {opened["instance_id"], closed["instance_id"]} == {DESK_A}
    assert {opened["entity"], closed["entity"], opened["natural_key"], closed["natural_key"]} == {
        "trade",
        "ORD/2026/7",
    }
    assert opened["seq"] < closed["seq"] and opened["recorded_at"] <= closed["recorded_at"]
    assert len(opened["hash"]) == len(closed["hash"]) == 64 and opened["hash"] != closed["hash"]
    parsed = HistoryEnvelope[list[TradeVersion]].model_validate(body)
    assert parsed.data is not None and [v.seq for v in parsed.data] == [opened["seq"], closed["seq"]]


async def test_versions_are_the_audit_logs_entries_and_page_like_the_other_lists(
    opened_and_closed: PersistenceSidecar,
) -> None:
    assert opened_and_closed.runtime is not None
    entries = await opened_and_closed.runtime.repositories.audit.versions("trade", "ORD/2026/7")
    async with client_for(create_app(sidecar=opened_and_closed)) as http:
        whole = (await http.get(versions_path("ORD/2026/7"))).json()
        second = (await http.get(versions_path("ORD/2026/7"), params={"limit": 1, "offset": 1})).json()
        literal = await http.get("/api/v1/trades/ORD/2026/7/versions")
    assert whole["data"] == [entry.to_json() for entry in entries]
    assert second["data"] == whole["data"][1:] and second["page"] == {"limit": 1, "offset": 1, "total": 2}
    assert literal.json()["data"] == whole["data"]


async def test_a_trade_whose_id_ends_in_versions_is_fetched_and_its_versions_listed(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    current = desk(DESK_A, clean_database_url, sidecar_settings, sidecars)
    await current.start()
    current.record_trade(make_trade(trade_id="ORD", pnl=Decimal("1")))
    current.record_trade(make_trade(trade_id="ORD/versions", pnl=Decimal("2")))
    await current.flush(10)
    async with client_for(create_app(sidecar=current)) as http:
        itself = await http.get("/api/v1/trades/ORD%2Fversions")
        assert itself.status_code == 200, itself.text
        assert itself.json()["data"]["trade_id"] == "ORD/versions" and itself.json()["source"] == "database"
        assert (await http.get("/api/v1/trades/ORD%2fversions")).json()["data"]["trade_id"] == "ORD/versions"
        of_it = await http.get(versions_path("ORD/versions"))
        assert [v["version"]["pnl"] for v in of_it.json()["data"]] == ["2.00000000"]
        of_ord = await http.get("/api/v1/trades/ORD/versions")
        assert [v["natural_key"] for v in of_ord.json()["data"]] == ["ORD"]
        body = assert_error(
            await http.get("/api/v1/trades/ORD%2Fversions", params={"limit": 1}), 422, "invalid_parameter"
        )
        assert "'limit'" in body["error"]["message"]


async def test_versions_of_a_trade_with_no_audited_version_is_a_404_in_the_wrapper(
    opened_and_closed: PersistenceSidecar,
) -> None:
    async with client_for(create_app(sidecar=opened_and_closed)) as http:
        assert_error(await http.get(versions_path("NO/SUCH/TRADE")), 404, "not_found")
        assert_error(await http.get("/api/v1/trades/%00/versions"), 404, "not_found")
        assert_error(await http.get(versions_path("x" * 65)), 404, "not_found")
        body = assert_error(
            await http.get(versions_path("ORD/2026/7"), params={"sort": "seq"}), 422, "invalid_parameter"
        )
        assert "limit" in body["error"]["message"].split("allowed:")[1]


async def test_versions_are_a_503_while_the_database_is_unavailable(
    clean_database_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    # A short shutdown timeout: turning persistence off waits that long for the unwritten A-1 before journaling it.
    current = desk(
        DESK_A,
        clean_database_url,
        sidecar_settings,
        sidecars,
        FakeClock(),
        breaker_failure_threshold=1,
        shutdown_timeout=0.3,
    )
    await current.start()
    await record_desk(current, "A", 1)
    async with client_for(create_app(sidecar=current)) as http:
        async with DatabaseLock(clean_database_url):
            current.record_trade(make_trade(trade_id="A-1"))
            await eventually(lambda: current.breaker_state == "open")
            assert_error(await http.get(versions_path("A-0")), 503, "database_unavailable")
        await current.set_enabled(False)
        assert_error(await http.get(versions_path("A-0")), 503, "database_unavailable")


async def test_the_versions_endpoint_and_its_fields_are_documented(
    opened_and_closed: PersistenceSidecar,
) -> None:
    async with client_for(create_app(sidecar=opened_and_closed)) as http:
        document = (await http.get("/openapi.json")).json()
    operation = document["paths"]["/api/v1/trades/{trade_id}/versions"]["get"]
    assert {p["name"] for p in operation["parameters"]} == {"trade_id", "limit", "offset"}
    assert set(operation["responses"]) >= {"200", "404", "422", "503", "504"}
    fields = document["components"]["schemas"]["TradeVersion"]["properties"]
    assert set(fields) == {
        "seq",
        "instance_id",
        "entity",
        "natural_key",
        "recorded_at",
        "version",
        "prev_hash",
        "hash",
        "key_prev_hash",
    }
    assert all(field.get("description") for field in fields.values()), fields
    history = document["paths"]["/api/v1/trades/history"]["get"]
    instance = next(p for p in history["parameters"] if p["name"] == "instance_id")
    assert instance["description"]
