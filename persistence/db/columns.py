"""Column types that are exact on every backend: :class:`ExactNumeric` and :class:`UTCDateTime`.

SQLite has no decimal type; SQLAlchemy's ``Numeric`` there stores a float, which is not exact. ``ExactNumeric``
therefore stores a decimal on SQLite as a 64-bit integer count of ``10**-scale`` units (the value times 10**8):
exact, compact, and ordered numerically by the integer comparison, negatives included. On PostgreSQL it is a
native ``NUMERIC(18, 8)``. Both hold the same range, which :mod:`persistence.records.models` enforces on the way in.

``UTCDateTime`` keeps timestamps in UTC: a naive ISO string in UTC on SQLite (the fixed-width format sorts
chronologically), ``timestamptz`` on PostgreSQL; values come back timezone-aware in UTC on both.

Migrations import these types, so their storage must never change in place; a new representation is a new type.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, DateTime, Numeric
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

from persistence.records.parser import (
    DECIMAL_CONTEXT,
    DECIMAL_PRECISION,
    DECIMAL_QUANTUM,
    DECIMAL_SCALE,
    to_exact_decimal,
)

_DECIMAL_CACHE_SIZE = 4096
"""Sizes, stops and ratios repeat across trades; prices mostly do not, so the cache is kept small (about 0.7 MiB)."""
_decimals: dict[int, Decimal] = {}


def to_scaled_int(value: object) -> int:
    """The SQLite storage of an exact decimal: an integer count of ``10**-8`` units. Never rounds."""
    if isinstance(value, Decimal):
        scaled = value.scaleb(DECIMAL_SCALE, DECIMAL_CONTEXT)
        as_int = int(scaled)
        if as_int == scaled and -_SCALED_LIMIT < as_int < _SCALED_LIMIT:
            return as_int
    return int(to_exact_decimal(value).scaleb(DECIMAL_SCALE, DECIMAL_CONTEXT))


def to_sqlite_datetime(value: datetime) -> str:
    """The SQLite storage of a timestamp: naive UTC in SQLAlchemy's fixed-width format (it sorts by time).

    ``YYYY-MM-DD HH:MM:SS.ffffff``, microseconds always present; a naive value is taken as UTC.
    """
    if value.tzinfo is not UTC and value.tzinfo is not None and value.utcoffset():
        value = value.astimezone(UTC)
    # %-formatting is three times cheaper than isoformat(sep=..., timespec=...) and gives the same text.
    return "%04d-%02d-%02d %02d:%02d:%02d.%06d" % (  # noqa: UP031
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


_KEPT_DATETIMES_MAX = 8192
"""A few batches' worth of timestamps (three or four a record); the table is emptied when it fills."""
_kept_datetimes: dict[datetime, str] = {}


def to_sqlite_datetime_kept(value: datetime) -> str:
    """:func:`to_sqlite_datetime`, the text also kept until :func:`take_sqlite_datetime` takes it.

    The writer stores a row's timestamps, then hashes the same version into the audit trail, whose canonical text
    of a timestamp is the stored one with ``T`` and ``Z``: the second encoding of the value becomes a lookup. Only
    UTC values are kept (records hold nothing else): two equal UTC datetimes are one instant, so one text.
    """
    if value.tzinfo is not UTC:
        return to_sqlite_datetime(value)
    text = "%04d-%02d-%02d %02d:%02d:%02d.%06d" % (  # noqa: UP031 - see to_sqlite_datetime
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )
    if len(_kept_datetimes) >= _KEPT_DATETIMES_MAX:
        _kept_datetimes.clear()
    _kept_datetimes[value] = text
    return text


def take_sqlite_datetime(value: datetime) -> str | None:
    """The stored text of a UTC ``value`` kept by :func:`to_sqlite_datetime_kept`, forgotten now; else ``None``."""
    return _kept_datetimes.pop(value, None) if value.tzinfo is UTC else None


def decimal_cache() -> dict[int, Decimal]:
    """The cache behind :func:`decode_decimal` (stored scaled integer → Decimal), for decoders that look up inline."""
    return _decimals


def decode_decimal(value: int) -> Decimal:
    """A stored scaled integer as its Decimal; equal stored values share one (immutable) Decimal."""
    number = _decimals.get(value)
    if number is None:
        if len(_decimals) >= _DECIMAL_CACHE_SIZE:
            _decimals.clear()
        number = _decimals[value] = Decimal(value).scaleb(-DECIMAL_SCALE, DECIMAL_CONTEXT)
    return number


def decode_datetime(value: str) -> datetime:
    """A stored UTC timestamp as an aware datetime."""
    # Parsing an explicit offset is several times cheaper than datetime.replace(tzinfo=UTC).
    return datetime.fromisoformat(value + "+00:00")


_SCALED_LIMIT = 10**DECIMAL_PRECISION


class ExactNumeric(TypeDecorator[Decimal]):
    """An exact decimal with 18 significant digits, 8 after the point, on every backend."""

    impl = Numeric(DECIMAL_PRECISION, DECIMAL_SCALE, asdecimal=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(DECIMAL_PRECISION, DECIMAL_SCALE, asdecimal=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return to_scaled_int(value)
        return value if isinstance(value, Decimal) and value.is_finite() else to_exact_decimal(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return decode_decimal(int(value))
        number = value if isinstance(value, Decimal) else Decimal(str(value))
        return number.quantize(DECIMAL_QUANTUM, context=DECIMAL_CONTEXT)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and returned timezone-aware in UTC; naive input is taken as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(DateTime(timezone=False))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        if moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)
