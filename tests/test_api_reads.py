"""The history API's reads over real HTTP (httpx through the ASGI app) on a real database: filters, pagination,
sorting, refusals, the wrapper, correlation ids, health, /metrics, the OpenAPI document and the offline docs.

The tests that change the sidecar or need a fault of their own are in test_api.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from persistence import PersistenceSidecar
from persistence.app.api import HistoryEnvelope, create_app, create_router
from persistence.migrations import head_revision
from persistence.records.models import Trade
from persistence.tables.queries import SIGNAL_SORT_COLUMNS, TRADE_SORT_COLUMNS
from tests.support.api import HISTORY, SIGNALS, assert_error, client_for, expected, ids, seed
from tests.support.databases import create_postgres_database, drop_postgres_database, make_settings
from tests.support.factories import BASE_TIME, make_trade
from tests.support.sidecars import build, stored_trade_ids

# Every test here only reads: they share one started, seeded sidecar per backend (and one more holding odd trade
# ids), on databases of their own, all on the module's event loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def databases(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two new databases of one backend, ``seed`` and ``strange``, for this module alone; dropped after."""
    if request.param == "sqlite":
        directory = tmp_path_factory.mktemp("api")
        yield {name: f"sqlite+aiosqlite:///{directory / name}.db" for name in ("seed", "strange")}
        return
    urls = {name: create_postgres_database(f"persistence_api_{name}") for name in ("seed", "strange")}
    yield urls
    for url in urls.values():
        drop_postgres_database(url)


async def _seeded(url: str, directory: Path, *extra: Trade) -> AsyncIterator[PersistenceSidecar]:
    """A started sidecar on ``url`` holding the seed records and ``extra``, closed after."""
    settings = make_settings(
        database_url=url,
        journal_dir=directory / "journal",
        backup_dir=directory / "backups",
        query_timeout_ms=300,
        shutdown_timeout=5.0,
    )
    current = build(settings, [])
    await current.start()
    try:
        for trade in extra:
            current.record_trade(trade)
        yield await seed(current)
    finally:
        await current.close(timeout=2.0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sidecar(
    databases: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[PersistenceSidecar]:
    """The twelve seed trades and three signals, all committed; shared by every test of the module on a backend."""
    async for current in _seeded(databases["seed"], tmp_path_factory.mktemp("api-sidecar")):
        yield current


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(sidecar: PersistenceSidecar) -> AsyncIterator[httpx.AsyncClient]:
    """One app and one client for the module (building the app is most of what a read test would cost)."""
    async with client_for(create_app(sidecar=sidecar)) as http:
        yield http


STRANGE_IDS = ("ORD/2026/0001", "history", "ORD/", "a b%20c?d#e&f=g", "ünï/cødé", "v1.2\\x", "x" * 64)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def strange_sidecar(
    databases: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[PersistenceSidecar]:
    """The seed records and trades whose ids hold slashes, spaces, escapes and non-ASCII letters."""
    strange = [
        make_trade(trade_id=trade_id, signal_id=f"SIG/{n}", entry_time=BASE_TIME - timedelta(days=1 + n))
        for n, trade_id in enumerate(STRANGE_IDS)
    ]
    async for current in _seeded(databases["strange"], tmp_path_factory.mktemp("api-strange"), *strange):
        yield current


# ---------------------------------------------------------------------------------------------- filters


async def test_trade_history_without_filters_is_newest_first_with_total_and_source_database(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get(HISTORY)
    assert response.status_code == 200
    body = response.json()
    assert body["error"] is None and body["source"] == "database"
    assert ids(response) == expected(lambda row, i: True)
    assert (body["page"]["limit"], body["page"]["offset"], body["page"]["total"]) == (100, 0, 12)


@pytest.mark.parametrize(
    ("params", "predicate"),
    [
        ({"symbol": "EURUSD"}, lambda row, i: row["symbol"] == "EURUSD"),
        ({"session": "TOKYO"}, lambda row, i: row["session"] == "TOKYO"),
        ({"session": "london"}, lambda row, i: row["session"] == "LONDON"),
        ({"pattern_type": "reversal"}, lambda row, i: row["pattern_type"] == "reversal"),
        ({"start_date": "2026-03-02T15:00:00Z"}, lambda row, i: i >= 7),
        ({"end_date": "2026-03-02T10:00:00+00:00"}, lambda row, i: i <= 2),
        ({"start_date": "2026-03-02T11:00:00", "end_date": "2026-03-02T13:00:00Z"}, lambda row, i: 3 <= i <= 5),
        ({"start_date": "2026-03-02T12:00:00+03:00", "end_date": "2026-03-02T09:30:00Z"}, lambda row, i: i == 1),
        ({"start_date": "2026-03-05"}, lambda row, i: False),
        ({"start_date": "2026-03-02T10:00:00+01:00"}, lambda row, i: i >= 1),
        (
            {"symbol": "EURUSD", "session": "LONDON", "pattern_type": "breakout"},
            lambda row, i: (row["symbol"], row["session"], row["pattern_type"]) == ("EURUSD", "LONDON", "breakout"),
        ),
    ],
    ids=[
        "symbol",
        "session",
        "session-any-case",
        "pattern_type",
        "start_date",
        "end_date",
        "date-range-naive-is-utc",
        "date-range-with-offsets",
        "date-only-nothing-after",
        "start_date-with-offset",
        "all-filters",
    ],
)
async def test_every_trade_filter_selects_exactly_the_matching_trades(
    client: httpx.AsyncClient, params: dict[str, str], predicate: Callable[[dict[str, Any], int], bool]
) -> None:
    response = await client.get(HISTORY, params=params)
    assert response.status_code == 200, response.text
    assert ids(response) == expected(predicate)
    assert response.json()["page"]["total"] == len(expected(predicate))


async def test_pagination_walks_every_trade_once_with_limit_and_offset(client: httpx.AsyncClient) -> None:
    seen: list[str] = []
    for offset in range(0, 12, 5):
        response = await client.get(HISTORY, params={"limit": 5, "offset": offset, "sort_by": "trade_id"})
        page = response.json()["page"]
        assert page == {"limit": 5, "offset": offset, "total": 12}
        seen += ids(response)
    assert seen == sorted((f"API-{i:02d}" for i in range(12)), reverse=True)
    past_the_end = await client.get(HISTORY, params={"offset": 12})
    assert ids(past_the_end) == [] and past_the_end.json()["page"]["total"] == 12
    biggest = await client.get(HISTORY, params={"limit": 1000})
    assert len(ids(biggest)) == 12


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_sorting_by_pnl_is_numeric_with_negatives_and_nulls_last(client: httpx.AsyncClient, order: str) -> None:
    response = await client.get(HISTORY, params={"sort_by": "pnl", "sort_order": order})
    pnls = [item["pnl"] for item in response.json()["data"]]
    assert pnls[-1] is None
    values = [Decimal(p) for p in pnls[:-1]]
    assert values == sorted(values, reverse=order == "desc")
    if order == "asc":
        assert pnls[:3] == ["-1000.00000000", "-120.50000000", "-99.99000000"]
    else:
        assert pnls[:2] == ["980.12345678", "100.00000000"]


async def test_every_whitelisted_sort_column_is_accepted(client: httpx.AsyncClient) -> None:
    for column in TRADE_SORT_COLUMNS:
        response = await client.get(HISTORY, params={"sort_by": column, "sort_order": "asc", "limit": 3})
        assert response.status_code == 200, (column, response.text)
    for column in SIGNAL_SORT_COLUMNS:
        response = await client.get(SIGNALS, params={"sort_by": column, "limit": 3})
        assert response.status_code == 200, (column, response.text)


async def test_decimals_are_json_strings_exactly_as_recorded(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/trades/API-03")
    trade = response.json()["data"]
    assert trade["pnl"] == "980.12345678" and isinstance(trade["entry_price"], str)
    assert trade["entry_time"] == "2026-03-02T11:00:00Z"


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("path", "params", "mentions"),
    [
        (HISTORY, {"start_date": "yesterday"}, "start_date"),
        (HISTORY, {"end_date": "2026-13-45T00:00:00Z"}, "end_date"),
        (HISTORY, {"start_date": "1709366400"}, "start_date"),
        (HISTORY, {"start_date": "2026-03-03T00:00:00Z", "end_date": "2026-03-02T00:00:00Z"}, "start_date"),
        (HISTORY, {"limit": "0"}, "limit"),
        (HISTORY, {"limit": "1001"}, "limit"),
        (HISTORY, {"limit": "ten"}, "limit"),
        (HISTORY, {"offset": "-1"}, "offset"),
        (HISTORY, {"sort_by": "account_id"}, "sort_by"),
        (HISTORY, {"sort_by": "id"}, "sort_by"),
        (HISTORY, {"sort_order": "sideways"}, "sort_order"),
        (HISTORY, {"session": "MOON"}, "session"),
        (SIGNALS, {"executed": "perhaps"}, "executed"),
        (SIGNALS, {"sort_by": "pnl"}, "sort_by"),
        (SIGNALS, {"limit": "0"}, "limit"),
        (SIGNALS, {"start_date": "last tuesday"}, "start_date"),
    ],
)
async def test_a_refused_parameter_is_a_422_in_the_wrapper_naming_it(
    client: httpx.AsyncClient, path: str, params: dict[str, str], mentions: str
) -> None:
    body = assert_error(await client.get(path, params=params), 422, "invalid_parameter")
    assert mentions in body["error"]["message"]


async def test_sql_injection_in_sort_by_is_refused_and_the_table_is_intact(
    client: httpx.AsyncClient, sidecar: PersistenceSidecar
) -> None:
    for attack in (
        "entry_time; DROP TABLE trades; --",
        "pnl desc, (SELECT 1)",
        "entry_time) UNION SELECT * FROM signals --",
        "CASE WHEN 1=1 THEN pnl END",
    ):
        assert_error(await client.get(HISTORY, params={"sort_by": attack}), 422, "invalid_parameter")
        assert_error(await client.get(HISTORY, params={"sort_order": f"asc; {attack}"}), 422, "invalid_parameter")
    assert len(await stored_trade_ids(sidecar)) == 12
    assert len(ids(await client.get(HISTORY))) == 12


async def test_an_absent_trade_is_a_404_in_the_wrapper_and_a_present_one_is_found(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/api/v1/trades/NO-SUCH-TRADE"), 404, "not_found")
    found = await client.get("/api/v1/trades/API-07")
    assert found.status_code == 200 and found.json()["data"]["trade_id"] == "API-07"
    assert found.json()["source"] == "database"


async def test_unknown_paths_and_methods_under_api_answer_in_the_wrapper(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/api/v1/nothing-here"), 404, "not_found")
    assert_error(await client.delete(HISTORY), 405, "method_not_allowed")
    assert_error(await client.put("/api/v1/persistence", content=b"{not json"), 422, "invalid_parameter")
    assert_error(await client.put("/api/v1/persistence", json={"enabled": "yes"}), 422, "invalid_parameter")
    assert_error(await client.put("/api/v1/persistence", json={}), 422, "invalid_parameter")


async def test_the_router_keeps_the_wrapper_inside_a_host_app_with_its_own_error_handlers(
    sidecar: PersistenceSidecar,
) -> None:
    host = FastAPI()

    @host.exception_handler(RequestValidationError)
    async def host_handler(_request: Any, _exc: Exception) -> JSONResponse:
        return JSONResponse({"host": "shape"}, status_code=400)

    host.include_router(create_router(sidecar))
    async with client_for(host) as http:
        assert_error(await http.get(HISTORY, params={"limit": 0}), 422, "invalid_parameter")
        assert_error(await http.get("/api/v1/trades/NOPE"), 404, "not_found")
        assert ids(await http.get(HISTORY, params={"limit": 2})) == ["API-11", "API-10"]


async def test_an_unexpected_error_is_a_500_in_the_wrapper_without_internals(sidecar: PersistenceSidecar) -> None:
    def broken_provider() -> PersistenceSidecar:
        raise RuntimeError("secret internal detail")

    host = FastAPI()
    host.include_router(create_router(broken_provider))
    async with client_for(host) as http:
        with capture_logs() as logs:
            body = assert_error(await http.get(HISTORY), 500, "internal_error")
    assert "secret internal detail" not in body["error"]["message"]
    assert any(entry["event"] == "api_request_failed" for entry in logs)


# ---------------------------------------------------------------------------------------------- correlation ids


async def test_the_correlation_id_header_is_echoed_in_header_and_body(client: httpx.AsyncClient) -> None:
    response = await client.get(HISTORY, headers={"X-Correlation-ID": "order-flow-42"})
    assert response.headers["X-Correlation-ID"] == "order-flow-42"
    assert response.json()["correlation_id"] == "order-flow-42"
    error = await client.get(HISTORY, params={"limit": 0}, headers={"X-Correlation-ID": "bad-request-7"})
    assert error.headers["X-Correlation-ID"] == "bad-request-7" == error.json()["correlation_id"]
    missing = await client.get("/api/v1/none", headers={"X-Correlation-ID": "lost-1"})
    assert missing.json()["correlation_id"] == "lost-1"


async def test_a_correlation_id_is_generated_when_none_or_a_malformed_one_is_sent(client: httpx.AsyncClient) -> None:
    first, second = await client.get(HISTORY), await client.get(HISTORY)
    assert first.json()["correlation_id"] != second.json()["correlation_id"]
    assert first.headers["X-Correlation-ID"] == first.json()["correlation_id"]
    odd = await client.get(HISTORY, headers={"X-Correlation-ID": "x" * 500})
    assert odd.json()["correlation_id"] != "x" * 500 and len(odd.json()["correlation_id"]) <= 128


# ---------------------------------------------------------------------------------------------- the token


async def test_without_a_token_api_is_open(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/v1/health")).status_code == 200


# ---------------------------------------------------------------------------------------------- memory fallback


async def test_signal_history_filters_sorts_and_pages(client: httpx.AsyncClient) -> None:
    assert ids(await client.get(SIGNALS)) == ["SIG-2", "SIG-1", "SIG-0"]
    assert ids(await client.get(SIGNALS, params={"executed": "true"})) == ["SIG-2", "SIG-0"]
    assert ids(await client.get(SIGNALS, params={"executed": "false"})) == ["SIG-1"]
    assert ids(await client.get(SIGNALS, params={"symbol": "GBPUSD"})) == ["SIG-2"]
    assert ids(await client.get(SIGNALS, params={"end_date": "2026-03-02T09:00:00Z"})) == ["SIG-1", "SIG-0"]
    by_confidence = await client.get(SIGNALS, params={"sort_by": "confidence", "sort_order": "asc"})
    assert ids(by_confidence) == ["SIG-1", "SIG-2", "SIG-0"]
    page = await client.get(SIGNALS, params={"limit": 1, "offset": 1})
    assert ids(page) == ["SIG-1"] and page.json()["page"]["total"] == 3 and page.json()["source"] == "database"
    assert page.json()["data"][0]["confidence"] == "0.55000000"


# ---------------------------------------------------------------------------------------------- health, flag, metrics


async def test_health_reports_flag_breaker_backlog_database_and_schema(client: httpx.AsyncClient) -> None:
    body = (await client.get("/api/v1/health")).json()
    data = body["data"]
    assert body["error"] is None
    assert data["enabled"] is True and data["breaker"] == "closed"
    assert data["queue"] == 0 and data["journal"] == 0
    assert data["db"]["reachable"] is True and data["schema_revision"] == head_revision()
    assert data["counts"]["persisted"] == 12 + 3 + 2


async def test_health_is_the_sidecars_own_report_in_the_same_shape(
    client: httpx.AsyncClient, sidecar: PersistenceSidecar
) -> None:
    data = (await client.get("/api/v1/health")).json()["data"]
    report = sidecar.health().to_dict()
    for moving in ("oldest_unpersisted_age_seconds",):
        data.pop(moving), report.pop(moving)
    assert data == report
    assert data["schema_revision"] == head_revision() and "schema" not in data


async def test_metrics_is_prometheus_text_that_parses(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    assert {"persistence_writes", "persistence_circuit_breaker_state", "persistence_enabled"} <= set(families)
    writes = {
        (s.labels["entity"], s.labels["outcome"]): s.value
        for s in families["persistence_writes"].samples
        if s.name == "persistence_writes_total"
    }
    assert writes[("trade", "success")] == 12


# ---------------------------------------------------------------------------------------------- OpenAPI and lifespan


async def test_openapi_lists_the_endpoints_parameters_and_response_models(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    paths = document["paths"]
    assert {
        "/api/v1/trades/history",
        "/api/v1/trades/{trade_id}",
        "/api/v1/signals/history",
        "/api/v1/health",
        "/api/v1/persistence",
        "/metrics",
    } <= set(paths)
    assert "put" in paths["/api/v1/persistence"]
    history = paths["/api/v1/trades/history"]["get"]
    params = {p["name"]: p for p in history["parameters"]}
    assert set(params) == {
        "start_date",
        "end_date",
        "symbol",
        "session",
        "pattern_type",
        "trade_id",
        "signal_id",
        "instance_id",
        "limit",
        "offset",
        "sort_by",
        "sort_order",
    }
    assert params["limit"]["schema"]["minimum"] == 1 and params["limit"]["schema"]["maximum"] == 1000
    assert params["sort_by"]["schema"]["enum"] == list(TRADE_SORT_COLUMNS)
    assert params["sort_order"]["schema"]["enum"] == ["asc", "desc"]
    signal_params = {p["name"] for p in paths["/api/v1/signals/history"]["get"]["parameters"]}
    assert {
        "executed",
        "symbol",
        "signal_id",
        "instance_id",
        "start_date",
        "end_date",
        "limit",
        "offset",
        "sort_by",
        "sort_order",
    } == signal_params

    schemas = document["components"]["schemas"]
    ok = history["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
    envelope = schemas[ok]["properties"]
    assert {"data", "error", "correlation_id", "page", "source"} <= set(envelope)
    assert envelope["data"]["anyOf"][0]["type"] == "array"
    assert set(history["responses"]) >= {"200", "401", "422", "504"}
    trade_schema = next(
        schema for name, schema in schemas.items() if name.startswith("Trade") and "pnl" in schema.get("properties", {})
    )
    pnl = trade_schema["properties"]["pnl"]
    assert {"type": "string"} in pnl.get("anyOf", [pnl]), pnl
    assert "securitySchemes" in document["components"]


async def test_a_real_answer_validates_against_the_documented_model(client: httpx.AsyncClient) -> None:
    body = (await client.get(HISTORY, params={"limit": 3})).json()
    parsed = HistoryEnvelope[list[Trade]].model_validate(body)
    assert parsed.data is not None and len(parsed.data) == 3 and parsed.source == "database"
    assert parsed.page is not None and (parsed.page.limit, parsed.page.offset, parsed.page.total) == (3, 0, 12)


# ---------------------------------------------------------------------------------------------- the contract


async def test_history_data_is_the_list_itself_with_page_and_source_beside_it(client: httpx.AsyncClient) -> None:
    for path, total in ((HISTORY, 12), (SIGNALS, 3)):
        response = await client.get(path, params={"limit": 2, "offset": 1})
        body = response.json()
        assert set(body) == {"data", "error", "correlation_id", "page", "source"}, body
        assert isinstance(body["data"], list) and len(body["data"]) == 2
        assert body["page"] == {"limit": 2, "offset": 1, "total": total}
        assert body["source"] == "database" and body["error"] is None


CALENDAR_EDGES = ("9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00")


@pytest.mark.parametrize("edge", CALENDAR_EDGES)
@pytest.mark.parametrize("parameter", ["start_date", "end_date"])
@pytest.mark.parametrize("path", [HISTORY, SIGNALS])
async def test_a_date_past_the_calendars_edge_is_a_422_naming_it(
    client: httpx.AsyncClient, path: str, parameter: str, edge: str
) -> None:
    body = assert_error(await client.get(path, params={parameter: edge}), 422, "invalid_parameter")
    assert parameter in body["error"]["message"]


async def test_the_last_and_first_representable_instants_are_accepted(client: httpx.AsyncClient) -> None:
    params = {"start_date": "0001-01-01T00:00:00Z", "end_date": "9999-12-31T23:59:59Z"}
    assert ids(await client.get(HISTORY, params=params)) == expected(lambda row, i: True)
    assert len((await client.get(SIGNALS, params=params)).json()["data"]) == 3


@pytest.mark.parametrize(
    ("path", "parameter"),
    [
        (HISTORY, "symbol"),
        (HISTORY, "pattern_type"),
        (HISTORY, "trade_id"),
        (HISTORY, "signal_id"),
        (HISTORY, "instance_id"),
        (SIGNALS, "symbol"),
        (SIGNALS, "signal_id"),
        (SIGNALS, "instance_id"),
    ],
)
async def test_nul_in_a_filter_is_a_422_naming_it_on_every_backend(
    client: httpx.AsyncClient, path: str, parameter: str
) -> None:
    body = assert_error(await client.get(path, params={parameter: "EUR\x00USD"}), 422, "invalid_parameter")
    assert parameter in body["error"]["message"]


@pytest.mark.parametrize("raw_path", ["/api/v1/trades/%00", "/api/v1/trades/API-01%00", "/api/v1/trades/" + "x" * 65])
async def test_a_path_id_that_cannot_exist_is_a_404(client: httpx.AsyncClient, raw_path: str) -> None:
    assert_error(await client.get(raw_path), 404, "not_found")


@pytest.mark.parametrize(
    ("path", "params", "misspelt", "allowed"),
    [
        (HISTORY, {"symbl": "EURUSD"}, "symbl", "symbol"),
        (HISTORY, {"symbol": "EURUSD", "sort": "pnl"}, "sort", "sort_by"),
        (SIGNALS, {"execute": "true"}, "execute", "executed"),
        ("/api/v1/health", {"verbose": "1"}, "verbose", "none"),
        ("/api/v1/trades/API-01", {"fields": "pnl"}, "fields", "none"),
        ("/api/v1/trades/API-01/versions", {"page": "2"}, "page", "offset"),
        (HISTORY, {"instance": "desk-a"}, "instance", "instance_id"),
    ],
)
async def test_an_unknown_query_parameter_is_a_422_naming_it_and_the_allowed_ones(
    client: httpx.AsyncClient, path: str, params: dict[str, str], misspelt: str, allowed: str
) -> None:
    body = assert_error(await client.get(path, params=params), 422, "invalid_parameter")
    message = body["error"]["message"]
    assert repr(misspelt) in message and allowed in message.split("allowed:")[1]


@pytest.mark.parametrize("trade_id", STRANGE_IDS)
async def test_every_stored_trade_is_fetched_by_its_id_whatever_its_characters(
    strange_sidecar: PersistenceSidecar, trade_id: str
) -> None:
    from urllib.parse import quote

    async with client_for(create_app(sidecar=strange_sidecar)) as http:
        filtered = await http.get(HISTORY, params={"trade_id": trade_id})
        assert ids(filtered) == [trade_id] and filtered.json()["page"]["total"] == 1
        if trade_id == "history":  # /trades/history is the history route: the trade_id filter reaches this one
            return
        encoded = await http.get("/api/v1/trades/" + quote(trade_id, safe=""))
        assert encoded.status_code == 200, encoded.text
        assert encoded.json()["data"]["trade_id"] == trade_id
        literal = await http.get("/api/v1/trades/" + quote(trade_id, safe="/"))
        assert literal.status_code == 200 and literal.json()["data"]["trade_id"] == trade_id


async def test_history_filters_by_signal_id_and_an_id_of_history_is_reachable(
    strange_sidecar: PersistenceSidecar,
) -> None:
    async with client_for(create_app(sidecar=strange_sidecar)) as http:
        by_signal = await http.get(HISTORY, params={"signal_id": "SIG/1"})
        assert ids(by_signal) == ["history"]
        assert ids(await http.get(HISTORY, params={"trade_id": "history"})) == ["history"]
        assert ids(await http.get(HISTORY, params={"trade_id": "no-such-trade"})) == []
        assert ids(await http.get(SIGNALS, params={"signal_id": "SIG-1"})) == ["SIG-1"]


# ---------------------------------------------------------------------------------------------- offline docs


async def test_the_docs_pages_reference_no_external_host_and_their_assets_answer(client: httpx.AsyncClient) -> None:
    import re

    for page in ("/docs", "/redoc"):
        response = await client.get(page)
        assert response.status_code == 200 and "text/html" in response.headers["content-type"]
        html = response.text
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.IGNORECASE), html
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
        assert assets and all(asset.startswith("/") for asset in assets), assets
        for asset in assets:
            answer = await client.get(asset)
            assert answer.status_code == 200 and len(answer.content) > 1000, asset
        spec = re.search(r"""(?:url: |spec-url=)["']([^"']+)["']""", html)
        assert spec is not None and (await client.get(spec.group(1))).json()["openapi"].startswith("3.")
    swagger = (await client.get("/docs")).text
    assert '"validatorUrl": null' in swagger


@pytest.mark.parametrize(
    ("path", "params", "mentions"),
    [
        (HISTORY, {"limit": "9" * 40}, "limit"),
        (HISTORY, {"offset": "9" * 40}, "offset"),
        (HISTORY, {"offset": "1e400"}, "offset"),
        (HISTORY, {"start_date": "99999-01-01T00:00:00Z"}, "start_date"),
        (SIGNALS, {"offset": "9" * 40}, "offset"),
        (SIGNALS, {"end_date": "0000-01-01"}, "end_date"),
    ],
)
async def test_oversized_numbers_and_impossible_dates_are_a_422(
    client: httpx.AsyncClient, path: str, params: dict[str, str], mentions: str
) -> None:
    body = assert_error(await client.get(path, params=params), 422, "invalid_parameter")
    assert mentions in body["error"]["message"]
