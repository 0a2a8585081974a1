"""The history API: a FastAPI router an orchestrator includes in its own app, and an app for ``serve`` and ``demo``.

Every ``/api`` answer, errors included, is the wrapper ``{"data": …, "error": null | {"code", "message"},
"correlation_id": "…"}``. For history reads ``data`` is the list of records itself, with ``"page": {"limit",
"offset", "total"}`` and ``"source": "database" | "memory"`` beside it. The wrapper is put on by the router's own
route class, so it holds wherever the router is included, whatever error handlers the host app has. No input
yields a 500: parameters are validated before any SQL is built (sorting only by a column from a fixed set,
``limit`` 1-1000, ISO 8601 dates that exist in UTC, no NUL in a filter), a query parameter the endpoint does not
take is refused, and anything else is a 422 in the wrapper. A trade is fetched by an id holding any characters
(``/`` included, through a path converter; an id that cannot be stored is a 404), and ``…/versions`` after the id
lists its audited versions, oldest first (a path whose last ``/versions`` came with its slash encoded, ``%2F``, names
a trade whose id ends in ``/versions``). The trade and signal lists filter on ``instance_id``, the orchestrator that
last wrote the row. An ``X-Correlation-ID`` header is
honoured (else one is generated), echoed in the response header and body, and is the correlation id of whatever is
recorded while the request runs. While the circuit breaker is open, or when the database cannot be read, trade
reads answer from the authoritative in-memory ``trade_history`` with the same
:class:`~persistence.tables.queries.TradeQuery` (same filters, sort and pagination; it counts as this process's own for
``instance_id``); signals and versions have no in-memory copy and answer 503. When ``PERSISTENCE_API_TOKEN``
is set, ``/api/*`` needs ``Authorization: Bearer <token>``; ``/metrics`` stays open. Decimals are JSON strings,
timestamps ISO 8601 in UTC. The app's ``/docs`` and ``/redoc`` load their assets from the installed
``fastapi-offline`` package, never a CDN.
"""

import contextlib
import hmac
import re
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar
from urllib.parse import unquote_to_bytes

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from persistence.audit.trail import AuditLog
from persistence.config import Settings
from persistence.errors import (
    ApiError,
    DatabaseUnavailableError,
    InvalidQueryError,
    QueryTimeoutError,
    SidecarClosedError,
)
from persistence.observe.correlation import correlation_scope, current_correlation_id, new_correlation_id
from persistence.observe.logger import get_logger
from persistence.observe.metrics import render
from persistence.records.iso8601 import parse_iso8601
from persistence.records.models import Record, Signal, Trade, UpperSession
from persistence.records.parser import is_storable_text, rules_of
from persistence.sidecar import PersistenceSidecar
from persistence.tables.queries import MAX_PAGE_SIZE, SignalQuery, SignalSortColumn, TradeQuery, TradeSortColumn
from persistence.write.faults import classify

__all__ = [
    "API_PREFIX",
    "CORRELATION_HEADER",
    "Envelope",
    "ErrorBody",
    "HistoryEnvelope",
    "PageInfo",
    "TradeVersion",
    "create_app",
    "create_router",
]

log = get_logger("persistence.api")

API_PREFIX = "/api/v1"
CORRELATION_HEADER = "X-Correlation-ID"
_CORRELATION_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

SortOrder = Literal["asc", "desc"]
Source = Literal["database", "memory"]

DataT = TypeVar("DataT")


# ---------------------------------------------------------------------------------------------- response models


class ErrorBody(BaseModel):
    """What went wrong: a stable machine-readable ``code`` and a message for people."""

    code: str = Field(examples=["invalid_parameter"])
    message: str


class Envelope(BaseModel, Generic[DataT]):
    """The wrapper of every ``/api`` answer."""

    data: DataT | None = None
    error: ErrorBody | None = None
    correlation_id: str


class PageInfo(BaseModel):
    """Where a page of a history read lies: its size and start as asked, and how many records match in all."""

    limit: int
    offset: int
    total: int = Field(description="how many records match the filters, over every page")


class HistoryEnvelope(Envelope[DataT], Generic[DataT]):
    """The wrapper of a history read: ``data`` is the list (or one record), paging and the source beside it."""

    page: PageInfo | None = Field(None, description="paging of a list; absent for a single record")
    source: Source | None = Field(
        None, description="`database` normally; `memory` when the database could not be used (breaker open, …)"
    )


class TradeVersion(BaseModel):
    """One audited version of a trade: the ``audit_log`` entry that recorded it, its version parsed."""

    seq: int = Field(description="the entry's place in its instance's chain: 1, 2, 3, … with no gap")
    instance_id: str = Field(
        description="the orchestrator (`PERSISTENCE_INSTANCE_ID`) that wrote this version;"
        " `pre-audit` for a trade as it stood when the audit trail began"
    )
    entity: str = Field(description="always `trade`", examples=["trade"])
    natural_key: str = Field(description="the trade's `trade_id`")
    recorded_at: str = Field(
        description="when the version was committed: UTC, microseconds always present (the text the hash covers)",
        json_schema_extra={"format": "date-time"},
        examples=["2026-03-02T08:00:00.000000Z"],
    )
    version: dict[str, Any] = Field(
        description="the trade as written: every field of a trade, decimals as strings with exactly eight places,"
        " timestamps UTC as in `recorded_at`; exactly the canonical JSON the hash covers, parsed"
    )
    prev_hash: str = Field(description="`hash` of the entry before it in the chain; 64 zeros for a chain's first")
    hash: str = Field(
        description="SHA-256 (hex) of `prev_hash`, the entry's other columns and the version's canonical JSON"
    )
    key_prev_hash: str | None = Field(
        default=None,
        description="`hash` of the trade's version before this one, whichever instance wrote it; 64 zeros for its"
        " first; null for an entry written before the trade's versions were linked (migration 0005)",
    )


class DatabaseHealth(BaseModel):
    """Whether the database answered its last operation, and where it is (password masked)."""

    reachable: bool | None = Field(description="null while persistence is disabled")
    url: str


class RecordCounts(BaseModel):
    """What became of the records since start-up."""

    persisted: int
    journaled: int
    dead_lettered: int
    dropped: int


class Health(BaseModel):
    """The sidecar's state: the flag, the breaker, the backlog, the database and its schema."""

    enabled: bool
    started: bool
    closed: bool
    breaker: Literal["closed", "open", "half_open"]
    queue: int = Field(description="records waiting in RAM")
    journal: int = Field(description="records waiting in the on-disk journal")
    db: DatabaseHealth
    schema_revision: str | None = Field(description="the Alembic revision the database is at")
    history: int = Field(description="trades in the in-memory trade_history")
    oldest_unpersisted_age_seconds: float = Field(description="the live loss window")
    counts: RecordCounts
    journal_error: str | None = Field(
        None, description="why the journal directory could not be written at start (degraded), else null"
    )


class PersistenceToggle(BaseModel):
    """The run-time persistence flag."""

    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool


class PersistenceState(BaseModel):
    """The flag after the change, and the breaker."""

    enabled: bool
    breaker: Literal["closed", "open", "half_open"]


# ---------------------------------------------------------------------------------------------- errors


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    503: "database_unavailable",
    504: "query_timeout",
}


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        content=model.model_dump_json(),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def error_response(
    status: int, code: str, message: str, correlation_id: str, headers: dict[str, str] | None = None
) -> Response:
    """An error in the wrapper, with the correlation id in the header and the body."""
    body = Envelope[None](data=None, error=ErrorBody(code=code, message=message), correlation_id=correlation_id)
    return _json(body, status, {**(headers or {}), CORRELATION_HEADER: correlation_id})


def validation_message(errors: Sequence[Any]) -> str:
    """One readable line from FastAPI's validation errors: ``where: why; …``."""
    problems: list[str] = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part not in ("query", "path", "body", "header")]
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "missing":
            message = "is required"
        if error.get("type") == "json_invalid":
            message = "is not valid JSON"
        problems.append(f"{'.'.join(loc) or 'request'}: {message}")
    return "; ".join(problems) or "invalid request"


def correlation_id_of(request: Request) -> str:
    """The request's ``X-Correlation-ID`` when it is a sensible token, else a fresh one."""
    given = request.headers.get(CORRELATION_HEADER, "").strip()
    return given if _CORRELATION_ID.fullmatch(given) else new_correlation_id()


class EnvelopeRoute(APIRoute):
    """Runs the endpoint in a correlation scope and turns every failure into the wrapper.

    The router brings this with it, so the wrapper holds in any host app: FastAPI's default error shape never
    reaches an ``/api`` client, whatever exception handlers the host has installed.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The endpoint, wrapped."""
        endpoint = super().get_route_handler()
        allowed = sorted(_query_parameter_names(self.dependant))

        async def handler(request: Request) -> Response:
            cid = correlation_id_of(request)
            with correlation_scope(cid):
                try:
                    _refuse_unknown_parameters(request, allowed)
                    response = await endpoint(request)
                except ApiError as exc:
                    response = error_response(exc.status, exc.code, exc.message, cid, exc.headers)
                except RequestValidationError as exc:
                    response = error_response(422, "invalid_parameter", validation_message(exc.errors()), cid)
                except StarletteHTTPException as exc:
                    code = _HTTP_CODES.get(exc.status_code, "http_error")
                    response = error_response(exc.status_code, code, str(exc.detail), cid, dict(exc.headers or {}))
                except Exception:
                    log.exception("api_request_failed", path=request.url.path, correlation_id=cid)
                    response = error_response(500, "internal_error", "internal error; see the server log", cid)
            response.headers[CORRELATION_HEADER] = cid
            return response

        return handler


def _query_parameter_names(dependant: Dependant) -> set[str]:
    """The query parameters an endpoint takes, its dependencies' included."""
    names = {param.alias for param in dependant.query_params}
    for dependency in dependant.dependencies:
        names |= _query_parameter_names(dependency)
    return names


def _refuse_unknown_parameters(request: Request, allowed: Sequence[str]) -> None:
    """A misspelt filter (``?symbl=EURUSD``) must not silently return every record: refuse what is not known."""
    unknown = sorted(set(request.query_params) - set(allowed))
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        known = ", ".join(allowed) if allowed else "none"
        raise ApiError(422, "invalid_parameter", f"unknown query parameter {names}; allowed: {known}")


# ---------------------------------------------------------------------------------------------- parameters


def _iso8601(value: object) -> object:
    """Accept ISO 8601 text only (not the epoch numbers pydantic would also take); naive means UTC."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 date-time")
    return parse_iso8601(value)  # ValueError, also for a time past the calendar's ends once in UTC


IsoDateTime = Annotated[datetime, BeforeValidator(_iso8601)]
_DATE_HELP = "ISO 8601, e.g. 2026-03-02T08:00:00Z or 2026-03-02 (a time without an offset is UTC)"

StartDate = Annotated[IsoDateTime | None, Query(description=f"earliest entry time, inclusive; {_DATE_HELP}")]
EndDate = Annotated[IsoDateTime | None, Query(description=f"latest entry time, inclusive; {_DATE_HELP}")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description=f"page size, 1 to {MAX_PAGE_SIZE}")]
Offset = Annotated[int, Query(ge=0, le=2_000_000_000, description="records to skip")]


def _field_query(model: type[Record], field: str, description: str | None = None) -> Any:
    """A filter on a record's text field, as long as the field may be (stated once, in the model)."""
    (rule,) = (rule for rule in rules_of(model) if rule.name == field)
    return Query(min_length=max(rule.min_length, 1), max_length=rule.max_length, description=description)


SymbolFilter = Annotated[str | None, _field_query(Trade, "symbol", "e.g. EURUSD")]
TradeIdFilter = Annotated[
    str | None,
    _field_query(Trade, "trade_id", "one trade by its id (any characters; reaches an id like `history`)"),
]
SignalIdFilter = Annotated[str | None, _field_query(Signal, "signal_id", "by the signal's id")]
PatternTypeFilter = Annotated[str | None, _field_query(Trade, "pattern_type")]
InstanceIdFilter = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=64,
        description="only rows this orchestrator (its `PERSISTENCE_INSTANCE_ID`) wrote last;"
        " `pre-audit` for rows from before the audit trail",
    ),
]
Order = Annotated[SortOrder, Query(description="asc or desc")]


@contextlib.contextmanager
def _invalid_query() -> Iterator[None]:
    """A query the query object refuses (a date range out of order, NUL in a filter, …) is a 422."""
    try:
        yield
    except InvalidQueryError as exc:
        raise ApiError(422, "invalid_parameter", str(exc)) from None


_ID_MAX_LENGTH = 64
"""The longest ``trade_id`` that can be stored."""


def _storable_id(value: str) -> bool:
    """Whether an id could be in the table at all (a NUL, a surrogate or an overlong id never is)."""
    return 0 < len(value) <= _ID_MAX_LENGTH and is_storable_text(value)


# ---------------------------------------------------------------------------------------------- the router

SidecarSource = PersistenceSidecar | Callable[[], PersistenceSidecar]
_bearer = HTTPBearer(auto_error=False, description="needed when PERSISTENCE_API_TOKEN is set")


def create_router(sidecar: SidecarSource, *, metrics: bool = True) -> APIRouter:
    """The history API over ``sidecar`` (or a callable returning it), to ``include_router`` in any FastAPI app.

    ``metrics=False`` leaves out ``GET /metrics``, for hosts that already serve their own. The token comes from
    the sidecar's ``Settings.api_token`` at each request.
    """

    def get_sidecar() -> PersistenceSidecar:
        return sidecar if isinstance(sidecar, PersistenceSidecar) else sidecar()

    def authorize(
        current: Annotated[PersistenceSidecar, Depends(get_sidecar)],
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        token = current.settings.api_token
        if token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            raise ApiError(
                401,
                "unauthorized",
                "a valid 'Authorization: Bearer <token>' header is required",
                {"WWW-Authenticate": "Bearer"},
            )

    Current = Annotated[PersistenceSidecar, Depends(get_sidecar)]
    router = APIRouter()
    api = APIRouter(prefix=API_PREFIX, route_class=EnvelopeRoute, dependencies=[Depends(authorize)])
    error_responses: dict[int | str, dict[str, Any]] = {
        status: {"model": Envelope[None], "description": description}
        for status, description in (
            (401, "missing or wrong bearer token (when a token is configured)"),
            (422, "invalid parameter"),
            (500, "internal error"),
        )
    }

    @api.get(
        "/trades/history",
        response_model=HistoryEnvelope[list[Trade]],
        responses={**error_responses, 504: {"model": Envelope[None], "description": "query timeout"}},
        summary="Trades with filters, pagination and sorting",
    )
    async def trade_history(
        current: Current,
        start_date: StartDate = None,
        end_date: EndDate = None,
        symbol: SymbolFilter = None,
        session: Annotated[UpperSession | None, Query(description="trading session")] = None,
        pattern_type: PatternTypeFilter = None,
        trade_id: TradeIdFilter = None,
        signal_id: SignalIdFilter = None,
        instance_id: InstanceIdFilter = None,
        limit: Limit = 100,
        offset: Offset = 0,
        sort_by: Annotated[TradeSortColumn, Query(description="column to sort by")] = "entry_time",
        sort_order: Order = "desc",
    ) -> Response:
        """Trades whose entry time is in the range and that match every filter, one page, sorted.

        ``data`` is the list of trades; ``page`` beside it says ``limit``, ``offset`` and the ``total`` matching.
        """
        with _invalid_query():
            query = TradeQuery(
                start_date=start_date,
                end_date=end_date,
                symbol=symbol,
                session=session,
                pattern_type=pattern_type,
                trade_id=trade_id,
                signal_id=signal_id,
                instance_id=instance_id,
                limit=limit,
                offset=offset,
                sort_by=sort_by,
                sort_order=sort_order,
            )
        found: tuple[list[Trade], int] | None = None
        if current.breaker_state == "open":
            log.info("history_read_from_memory", reason="breaker_open", correlation_id=current_correlation_id())
        else:
            with _database_read(memory_fallback=True):
                result = await current.trades.query(query, with_total=True)
                found = (result.items, result.total or 0)
        source: Source = "database"
        if found is None:
            source = "memory"
            found = query.page(current.trade_history, current.settings.instance_id)
        items, total = found
        return _ok(
            HistoryEnvelope[list[Trade]], items, page=PageInfo(limit=limit, offset=offset, total=total), source=source
        )

    @api.get(
        "/trades/{trade_id:path}/versions",
        response_model=HistoryEnvelope[list[TradeVersion]],
        responses={
            **error_responses,
            404: {"model": Envelope[None], "description": "no audited version of that trade"},
            503: {"model": Envelope[None], "description": "database unavailable (versions have no in-memory copy)"},
            504: {"model": Envelope[None], "description": "query timeout"},
        },
        summary="Every audited version of one trade, oldest first",
    )
    async def trade_versions(
        request: Request,
        current: Current,
        trade_id: Annotated[
            str,
            Path(
                description="the trade's id, whatever characters it holds; send it percent-encoded (`/` as `%2F`)."
                " A path whose last `/versions` has its slash encoded (`/trades/ORD%2Fversions`) is the trade"
                " `ORD/versions` itself, not the versions of `ORD`."
            ),
        ],
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> Response:
        """Every version of the trade in the audit trail, oldest first: what it was when opened, each amendment.

        ``data`` is the list of versions; ``page`` beside it says ``limit``, ``offset`` and the ``total`` versions.
        """
        if not _names_versions(request):
            _refuse_unknown_parameters(request, [])
            return await _one_trade(current, f"{trade_id}/versions")
        if not _storable_id(trade_id):
            raise ApiError(404, "not_found", "no trade with that trade_id (it cannot be stored)")
        if current.breaker_state == "open":
            raise ApiError(503, "database_unavailable", "the database is unavailable (circuit breaker open)")
        with _database_read(memory_fallback=False):
            entries = await _audit_of(current).versions(Trade.entity, trade_id)
        if not entries:
            raise ApiError(404, "not_found", f"no audited version of trade {trade_id!r}")
        versions = [TradeVersion.model_validate(entry.to_json()) for entry in entries[offset : offset + limit]]
        page = PageInfo(limit=limit, offset=offset, total=len(entries))
        return _ok(HistoryEnvelope[list[TradeVersion]], versions, page=page, source="database")

    @api.get(
        "/trades/{trade_id:path}",
        response_model=HistoryEnvelope[Trade],
        responses={
            **error_responses,
            404: {"model": Envelope[None], "description": "no such trade"},
            503: {"model": Envelope[None], "description": "database unavailable and the trade is not in memory"},
        },
        summary="One trade by its trade_id",
    )
    async def trade_by_id(
        current: Current,
        trade_id: Annotated[
            str,
            Path(
                description="the trade's id, whatever characters it holds: a `/` may be sent as is or as `%2F`."
                " An id of `history` is reached with `GET /trades/history?trade_id=history`."
            ),
        ],
    ) -> Response:
        """The current version of one trade; from memory when the database cannot be used or lags behind."""
        return await _one_trade(current, trade_id)

    @api.get(
        "/signals/history",
        response_model=HistoryEnvelope[list[Signal]],
        responses={
            **error_responses,
            503: {"model": Envelope[None], "description": "database unavailable (signals have no in-memory copy)"},
            504: {"model": Envelope[None], "description": "query timeout"},
        },
        summary="Signals with filters, pagination and sorting",
    )
    async def signal_history(
        current: Current,
        executed: Annotated[bool | None, Query(description="only signals that were (or were not) executed")] = None,
        symbol: SymbolFilter = None,
        signal_id: SignalIdFilter = None,
        instance_id: InstanceIdFilter = None,
        start_date: Annotated[IsoDateTime | None, Query(description=f"earliest generation time; {_DATE_HELP}")] = None,
        end_date: Annotated[IsoDateTime | None, Query(description=f"latest generation time; {_DATE_HELP}")] = None,
        limit: Limit = 100,
        offset: Offset = 0,
        sort_by: Annotated[SignalSortColumn, Query(description="column to sort by")] = "generated_at",
        sort_order: Order = "desc",
    ) -> Response:
        """Signals generated in the range that match every filter, one page, sorted.

        ``data`` is the list of signals; ``page`` beside it says ``limit``, ``offset`` and the ``total`` matching.
        """
        with _invalid_query():
            query = SignalQuery(
                executed=executed,
                symbol=symbol,
                signal_id=signal_id,
                instance_id=instance_id,
                start_date=start_date,
                end_date=end_date,
                limit=limit,
                offset=offset,
                sort_by=sort_by,
                sort_order=sort_order,
            )
        if current.breaker_state == "open":
            raise ApiError(503, "database_unavailable", "the database is unavailable (circuit breaker open)")
        with _database_read(memory_fallback=False):
            result = await current.signals.query(query, with_total=True)
        page = PageInfo(limit=limit, offset=offset, total=result.total or 0)
        return _ok(HistoryEnvelope[list[Signal]], result.items, page=page, source="database")

    @api.get("/health", response_model=Envelope[Health], responses=error_responses, summary="The sidecar's state")
    async def health(current: Current) -> Response:
        """Enabled flag, breaker state, queue and journal depth, database reachability and schema revision."""
        return _ok(Envelope[Health], health_of(current))

    @api.put(
        "/persistence",
        response_model=Envelope[PersistenceState],
        responses={**error_responses, 409: {"model": Envelope[None], "description": "the sidecar is closed"}},
        summary="Switch persistence on or off at run time",
    )
    async def set_persistence(current: Current, toggle: PersistenceToggle) -> Response:
        """Turn persistence on or off; turning it off flushes first (journaling what cannot be written)."""
        try:
            await current.set_enabled(toggle.enabled)
        except SidecarClosedError as exc:
            raise ApiError(409, "sidecar_closed", str(exc)) from None
        state = PersistenceState(enabled=current.enabled, breaker=_breaker(current.breaker_state))
        return _ok(Envelope[PersistenceState], state)

    router.include_router(api)

    if metrics:

        @router.get(
            "/metrics",
            response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
            summary="Prometheus metrics",
            include_in_schema=True,
        )
        async def prometheus_metrics(current: Current) -> Response:
            """The sidecar's metrics in the Prometheus text format (never behind the token)."""
            body, content_type = render(current.registry)
            return Response(content=body, media_type=content_type)

    return router


async def _one_trade(current: PersistenceSidecar, trade_id: str) -> Response:
    """The current version of one trade in the wrapper; from memory when the database cannot be used or lags."""
    if not _storable_id(trade_id):
        raise ApiError(404, "not_found", "no trade with that trade_id (it cannot be stored)")
    trade: Trade | None = None
    source: Source = "database"
    database_usable = current.breaker_state != "open"
    if database_usable:
        database_usable = False
        with _database_read(memory_fallback=True):
            trade = await current.trades.get_trade_by_id(trade_id)
            database_usable = True
    if trade is None:
        trade = current.trade_history.get(trade_id)
        source = "memory"
    if trade is None:
        if not database_usable:
            raise ApiError(503, "database_unavailable", "the database cannot be read and the trade is not in memory")
        raise ApiError(404, "not_found", f"no trade with trade_id {trade_id!r}")
    return _ok(HistoryEnvelope[Trade], trade, source=source)


def _names_versions(request: Request) -> bool:
    """Whether the path's last segment, as the client sent it, is ``versions``.

    Starlette decodes ``%2F`` before routing, so ``/trades/ORD%2Fversions`` reaches the versions route as the
    versions of ``ORD``; the raw path tells the two apart: there the last segment is ``ORD%2Fversions``.
    """
    raw = request.scope.get("raw_path")
    if not isinstance(raw, bytes):
        return True
    return unquote_to_bytes(raw.partition(b"?")[0].rsplit(b"/", 1)[-1]) == b"versions"


def _audit_of(current: PersistenceSidecar) -> AuditLog:
    """The audit trail of the sidecar's database; unavailable while persistence is off or not started."""
    runtime = current.runtime
    if runtime is None:
        raise DatabaseUnavailableError("persistence is disabled or not started: there is no database to read")
    return runtime.repositories.audit


def _ok(envelope: type[Envelope[Any]], data: Any, **extra: Any) -> Response:
    cid = current_correlation_id() or new_correlation_id()
    return _json(envelope.model_construct(data=data, error=None, correlation_id=cid, **extra))


def _breaker(state: str) -> Literal["closed", "open", "half_open"]:
    if state == "open":
        return "open"
    if state == "half_open":
        return "half_open"
    return "closed"


def health_of(sidecar: PersistenceSidecar) -> Health:
    """``sidecar.health()`` (a :class:`~persistence.write.runtime.HealthReport`) in the API's response model: one
    shape."""
    return Health.model_validate(sidecar.health().to_dict())


@contextlib.contextmanager
def _database_read(*, memory_fallback: bool) -> Iterator[None]:
    """Sort database read errors: bad parameters 422, a timeout 504, unavailability memory (or 503)."""
    try:
        yield
    except InvalidQueryError as exc:
        raise ApiError(422, "invalid_parameter", str(exc)) from None
    except QueryTimeoutError as exc:
        if memory_fallback:
            log.warning("history_read_from_memory", reason="query_timeout", correlation_id=current_correlation_id())
            return
        raise ApiError(504, "query_timeout", str(exc)) from None
    except Exception as exc:
        if not database_unavailable(exc):
            raise
        if memory_fallback:
            log.warning("history_read_from_memory", reason=type(exc).__name__, correlation_id=current_correlation_id())
            return
        raise ApiError(503, "database_unavailable", "the database is unavailable; try again later") from None


def database_unavailable(error: BaseException) -> bool:
    """Whether a read failed because of the database's state (not a bug here): unreachable, locked, timed out."""
    if isinstance(error, DatabaseUnavailableError | OSError | TimeoutError):
        return True
    return isinstance(error, sa_exc.DBAPIError) and classify(error) == "transient"


# ---------------------------------------------------------------------------------------------- the app


def create_app(settings: Settings | None = None, *, sidecar: PersistenceSidecar | None = None) -> FastAPI:
    """An app serving the history API and ``/metrics``, whose lifespan starts and closes a sidecar.

    With ``settings`` (or neither argument: ``Settings()`` from the environment) the app owns its sidecar: the
    lifespan starts it and closes it. A ``sidecar`` passed in is started if needed but left open at shutdown:
    whoever created it closes it. Errors outside the router's routes (an unknown ``/api`` path, a wrong method)
    are answered in the wrapper too.
    """
    owned = sidecar is None
    current = sidecar if sidecar is not None else PersistenceSidecar(settings if settings is not None else Settings())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await current.start()
        try:
            yield
        finally:
            if owned:
                await current.close()

    # FastAPIOffline is FastAPI with /docs and /redoc whose Swagger UI and ReDoc assets come from the installed
    # fastapi-offline package (under /static-offline-docs), not a CDN: the page works on a machine with no internet.
    app = FastAPIOffline(
        title="persistence-sidecar history API",
        version="1",
        description="Trades and signals persisted by the sidecar, its health, its run-time flag and its metrics.",
        lifespan=lifespan,
        # No call to the public swagger.io validator either: nothing on the page leaves the machine.
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.sidecar = current
    app.include_router(create_router(current))

    async def http_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, StarletteHTTPException):
            raise exc
        if not request.url.path.startswith("/api"):
            return await http_exception_handler(request, exc)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        cid = correlation_id_of(request)
        return error_response(exc.status_code, code, str(exc.detail), cid, dict(exc.headers or {}))

    async def validation_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, RequestValidationError):
            raise exc
        if not request.url.path.startswith("/api"):
            return await request_validation_exception_handler(request, exc)
        return error_response(422, "invalid_parameter", validation_message(exc.errors()), correlation_id_of(request))

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    return app
