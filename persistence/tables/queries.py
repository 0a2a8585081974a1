"""The history queries as values: what to filter, how to sort and which page, built once and used twice.

:class:`TradeQuery` and :class:`SignalQuery` are checked when they are made (page bounds, a sort column from a
fixed set, a known session, a date range in order and representable in UTC), raising
:class:`~persistence.errors.InvalidQueryError` before any SQL exists. The same object then gives the SQL
conditions and ordering the repositories run, and, for trades, filters and pages the in-memory ``trade_history``
with the same semantics: entry-time range inclusive, exact matches, nulls last in both orders, ties broken by
recording order. The API's memory fallback therefore answers what the database would, with one approximation for
``instance_id``: records carry no instance id, so the in-memory history counts as wholly this process's (a filter on
this process's id keeps every trade in it, a filter on any other id none), although trades loaded at start-up from
before the audit trail carry ``pre-audit`` in the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Literal, get_args

from sqlalchemy import ColumnElement, Table

from persistence.db.schema import signals, trades
from persistence.errors import InvalidQueryError
from persistence.records.models import SESSIONS, Trade, to_utc
from persistence.records.parser import is_storable_text

__all__ = [
    "MAX_PAGE_SIZE",
    "SIGNAL_SORT_COLUMNS",
    "TRADE_SORT_COLUMNS",
    "SignalQuery",
    "SignalSortColumn",
    "SortOrder",
    "TradeQuery",
    "TradeSortColumn",
]

SortOrder = Literal["asc", "desc"]
TradeSortColumn = Literal[
    "entry_time",
    "exit_time",
    "created_at",
    "updated_at",
    "symbol",
    "trade_id",
    "entry_price",
    "exit_price",
    "position_size",
    "pnl",
    "pnl_percentage",
    "confidence_score",
    "risk_reward_ratio",
]
"""The only columns trades can be sorted by (the API's schema is generated from this type)."""
SignalSortColumn = Literal["generated_at", "created_at", "symbol", "signal_id", "confidence", "entry_price"]
"""The only columns signals can be sorted by."""
TRADE_SORT_COLUMNS: tuple[str, ...] = get_args(TradeSortColumn)
SIGNAL_SORT_COLUMNS: tuple[str, ...] = get_args(SignalSortColumn)
MAX_PAGE_SIZE = 1000


# ---------------------------------------------------------------------------------------------- the checks
# The query objects and the repositories' older single-purpose reads share these: one wording for every refusal.


def check_page(limit: int, offset: int) -> None:
    """Refuse a page size outside ``1..MAX_PAGE_SIZE`` or a negative offset."""
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidQueryError("limit", f"must be between 1 and {MAX_PAGE_SIZE}")
    if offset < 0:
        raise InvalidQueryError("offset", "must not be negative")


def check_sort(allowed: tuple[str, ...], sort_by: str, sort_order: str) -> None:
    """Refuse a sort column outside ``allowed`` or an order other than asc/desc."""
    if sort_by not in allowed:
        raise InvalidQueryError("sort_by", f"must be one of {', '.join(allowed)}")
    if sort_order not in ("asc", "desc"):
        raise InvalidQueryError("sort_order", "must be asc or desc")


def check_session(session: str) -> str:
    """A known trading session in upper case, or :class:`~persistence.errors.InvalidQueryError`."""
    if session.upper() not in SESSIONS:
        raise InvalidQueryError("session", f"must be one of {', '.join(SESSIONS)}")
    return session.upper()


def utc_range(start_date: datetime | None, end_date: datetime | None) -> tuple[datetime | None, datetime | None]:
    """Both ends in UTC (naive means UTC), in order and inside the calendar once converted."""
    start, end = _utc("start_date", start_date), _utc("end_date", end_date)
    if start is not None and end is not None and start > end:
        raise InvalidQueryError("start_date", "is after end_date")
    return start, end


def date_range(column: Any, start_date: datetime | None, end_date: datetime | None) -> list[ColumnElement[bool]]:
    """SQL conditions for ``start_date <= column <= end_date`` (either end may be open), checked as above."""
    start, end = utc_range(start_date, end_date)
    conditions: list[ColumnElement[bool]] = []
    if start is not None:
        conditions.append(column >= start)
    if end is not None:
        conditions.append(column <= end)
    return conditions


def order_by(table: Table, sort_by: str, sort_order: str) -> list[Any]:
    """``ORDER BY`` the column with nulls last, then the row id in the same direction (a stable order)."""
    column = table.c[sort_by]
    if sort_order == "asc":
        return [column.asc().nulls_last(), table.c.id.asc()]
    return [column.desc().nulls_last(), table.c.id.desc()]


def _utc(parameter: str, value: datetime | None) -> datetime | None:
    if value is None:
        return None
    try:
        return to_utc(value)
    except ValueError:  # an aware time past the calendar's ends once in UTC (9999-12-31T23:59:59-05:00)
        raise InvalidQueryError(
            parameter, "is outside the range of dates that can be stored (years 1-9999 UTC)"
        ) from None


def _text(parameter: str, value: str | None) -> None:
    if value is not None and not is_storable_text(value):
        raise InvalidQueryError(parameter, "must not contain NUL or unpaired surrogate characters")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Query:
    start_date: datetime | None = None
    end_date: datetime | None = None
    symbol: str | None = None
    instance_id: str | None = None
    limit: int = 100
    offset: int = 0
    sort_order: SortOrder = "desc"

    _table: ClassVar[Table]
    _sort_columns: ClassVar[tuple[str, ...]]
    _time_column: ClassVar[str]

    def _check(self, sort_by: str, texts: dict[str, str | None]) -> None:
        check_page(self.limit, self.offset)
        check_sort(self._sort_columns, sort_by, self.sort_order)
        for parameter, value in texts.items():
            _text(parameter, value)
        start, end = utc_range(self.start_date, self.end_date)
        object.__setattr__(self, "start_date", start)
        object.__setattr__(self, "end_date", end)

    def _shared(self) -> list[ColumnElement[bool]]:
        """The time range, and the instance that wrote the row: the conditions every query shares."""
        column = self._table.c[self._time_column]
        conditions: list[ColumnElement[bool]] = []
        if self.instance_id is not None:
            conditions.append(self._table.c.instance_id == self.instance_id)
        if self.start_date is not None:
            conditions.append(column >= self.start_date)
        if self.end_date is not None:
            conditions.append(column <= self.end_date)
        return conditions

    def _order_by(self, sort_by: str) -> list[Any]:
        return order_by(self._table, sort_by, self.sort_order)


@dataclass(frozen=True, slots=True, kw_only=True)
class TradeQuery(_Query):
    """Trades whose entry time is in ``[start_date, end_date]`` and that match every other given filter."""

    session: str | None = None
    pattern_type: str | None = None
    trade_id: str | None = None
    signal_id: str | None = None
    sort_by: str = "entry_time"

    _table: ClassVar[Table] = trades
    _sort_columns: ClassVar[tuple[str, ...]] = TRADE_SORT_COLUMNS
    _time_column: ClassVar[str] = "entry_time"

    def __post_init__(self) -> None:
        if self.session is not None:
            object.__setattr__(self, "session", check_session(self.session))
        texts = {
            "symbol": self.symbol,
            "pattern_type": self.pattern_type,
            "trade_id": self.trade_id,
            "signal_id": self.signal_id,
            "instance_id": self.instance_id,
        }
        self._check(self.sort_by, texts)

    def conditions(self) -> list[ColumnElement[bool]]:
        """The SQL ``WHERE`` conditions."""
        conditions = self._shared()
        for name in ("symbol", "session", "pattern_type", "trade_id", "signal_id"):
            value = getattr(self, name)
            if value is not None:
                conditions.append(trades.c[name] == value)
        return conditions

    def order_by(self) -> list[Any]:
        """The SQL ``ORDER BY``: the sort column with nulls last, then the row id in the same direction."""
        return self._order_by(self.sort_by)

    def matches(self, trade: Trade) -> bool:
        """Whether ``trade`` passes every filter but ``instance_id`` (what :meth:`conditions` selects in SQL).

        A trade carries no instance id: :meth:`page` applies that filter to the history as a whole.
        """
        return (
            (self.start_date is None or trade.entry_time >= self.start_date)
            and (self.end_date is None or trade.entry_time <= self.end_date)
            and (self.symbol is None or trade.symbol == self.symbol)
            and (self.session is None or trade.session == self.session)
            and (self.pattern_type is None or trade.pattern_type == self.pattern_type)
            and (self.trade_id is None or trade.trade_id == self.trade_id)
            and (self.signal_id is None or trade.signal_id == self.signal_id)
        )

    def page(self, history: Sequence[Trade], recorded_by: str | None = None) -> tuple[list[Trade], int]:
        """This query over the in-memory ``history`` (oldest first): one page, sorted, and how many match in all.

        ``recorded_by`` is the instance id of the process whose history it is: with an ``instance_id`` filter, the
        whole history matches when the two are equal and nothing does otherwise.
        """
        if self.instance_id is not None and self.instance_id != recorded_by:
            return [], 0
        descending = self.sort_order == "desc"
        sort_by = self.sort_by
        matching = [(position, trade) for position, trade in enumerate(history) if self.matches(trade)]
        valued = [item for item in matching if getattr(item[1], sort_by) is not None]
        nulls = [item for item in matching if getattr(item[1], sort_by) is None]
        valued.sort(key=lambda item: (getattr(item[1], sort_by), item[0]), reverse=descending)
        nulls.sort(key=lambda item: item[0], reverse=descending)
        ordered = [trade for _, trade in (*valued, *nulls)]
        return ordered[self.offset : self.offset + self.limit], len(ordered)


@dataclass(frozen=True, slots=True, kw_only=True)
class SignalQuery(_Query):
    """Signals generated in ``[start_date, end_date]`` that match every other given filter."""

    executed: bool | None = None
    signal_id: str | None = None
    sort_by: str = "generated_at"

    _table: ClassVar[Table] = signals
    _sort_columns: ClassVar[tuple[str, ...]] = SIGNAL_SORT_COLUMNS
    _time_column: ClassVar[str] = "generated_at"

    def __post_init__(self) -> None:
        texts = {"symbol": self.symbol, "signal_id": self.signal_id, "instance_id": self.instance_id}
        self._check(self.sort_by, texts)

    def conditions(self) -> list[ColumnElement[bool]]:
        """The SQL ``WHERE`` conditions."""
        conditions = self._shared()
        if self.executed is not None:
            conditions.append(signals.c.executed == self.executed)
        for name in ("symbol", "signal_id"):
            value = getattr(self, name)
            if value is not None:
                conditions.append(signals.c[name] == value)
        return conditions

    def order_by(self) -> list[Any]:
        """The SQL ``ORDER BY``: the sort column with nulls last, then the row id in the same direction."""
        return self._order_by(self.sort_by)
