"""The SQLite storage encodings: fixed-width UTC text that sorts by time, and exact scaled integers."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from persistence import PersistenceSidecar
from persistence.db.columns import decode_datetime, decode_decimal, to_scaled_int, to_sqlite_datetime
from persistence.errors import InvalidRecordError
from persistence.records.models import DECIMAL_LIMIT, DECIMAL_SCALE
from tests.support.factories import trade_data

zones = st.one_of(
    st.just(UTC),
    st.builds(lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-14 * 60, 14 * 60)),
    st.timezones(),
)
aware = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=zones)
exact = st.decimals(
    min_value=-DECIMAL_LIMIT + Decimal("1e-8"),
    max_value=DECIMAL_LIMIT - Decimal("1e-8"),
    places=DECIMAL_SCALE,
    allow_nan=False,
    allow_infinity=False,
)


@given(aware)
@example(datetime(1998, 10, 25, 2, 0, tzinfo=ZoneInfo("Asia/Atyrau"), fold=0))
@example(datetime(1998, 10, 25, 2, 0, tzinfo=ZoneInfo("Asia/Atyrau"), fold=1))
def test_an_aware_timestamp_is_stored_as_its_utc_time_in_isoformat(value: datetime) -> None:
    stored = to_sqlite_datetime(value)
    assert stored == value.astimezone(UTC).isoformat(sep=" ", timespec="microseconds")[:26]
    # The same instant, compared as instants: `==` across zones is False for an ambiguous local time (a fold).
    assert decode_datetime(stored) == value.astimezone(UTC)


@given(st.datetimes(min_value=datetime(1, 1, 1)))
def test_a_naive_timestamp_is_taken_as_utc(value: datetime) -> None:
    assert to_sqlite_datetime(value) == value.isoformat(sep=" ", timespec="microseconds")


@given(aware, aware)
def test_stored_timestamps_sort_as_the_times_do(first: datetime, second: datetime) -> None:
    assert (to_sqlite_datetime(first) < to_sqlite_datetime(second)) == (first < second)


@given(exact)
def test_a_decimal_is_stored_as_an_exact_scaled_integer(value: Decimal) -> None:
    stored = to_scaled_int(value)
    assert isinstance(stored, int)
    assert decode_decimal(stored) == value
    assert str(decode_decimal(stored)) == str(value.quantize(Decimal("1e-8")))


@pytest.mark.parametrize("value", [Decimal("0.000000001"), Decimal("1e10"), Decimal("NaN"), 1.0000000001])
def test_a_value_that_does_not_fit_is_refused_not_rounded(value: object) -> None:
    with pytest.raises(ValueError, match=r"digits|NaN"):
        to_scaled_int(value)


async def test_the_host_decimal_context_never_rounds_a_stored_or_read_value(sqlite_url: str) -> None:
    from decimal import localcontext

    from persistence.config import Settings
    from persistence.db.engine import create_database
    from persistence.migrations import upgrade
    from persistence.tables.repositories import Repositories
    from tests.support.factories import make_trade

    database = create_database(Settings(_env_file=None, database_url=sqlite_url))
    try:
        await upgrade(database)
        repos = Repositories(database)
        with localcontext() as context:
            context.prec = 6  # a host that set a low precision for its own arithmetic
            trade = make_trade(pnl=Decimal("9999999999.99999999"), position_size="12345678.12345678")
            assert str(trade.pnl) == "9999999999.99999999"
            assert to_scaled_int(Decimal("-12345678.12345678")) == -1_234_567_812_345_678
            assert str(decode_decimal(1_234_567_812_345_679)) == "12345678.12345679"
            await repos.trades.save_trade(trade)
            stored = await repos.trades.get_trade_by_id(trade.trade_id)
        assert stored is not None
        assert (str(stored.pnl), str(stored.position_size)) == ("9999999999.99999999", "12345678.12345678")
    finally:
        await database.dispose()


# ---------------------------------------------------------------------------------------------- the calendar's ends

EARLIEST = datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, 23, 59, 59, 999998, tzinfo=UTC)


async def _raw_times(database_url: str) -> dict[str, tuple[str, str]]:
    """``entry_time`` and ``exit_time`` as the database itself spells them (no driver mapping), in UTC."""
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.split("///", 1)[1]) as connection:
            rows = connection.execute("SELECT trade_id, entry_time, exit_time FROM trades").fetchall()
        return {
            trade_id: (datetime.fromisoformat(entry).isoformat(" "), datetime.fromisoformat(exit_).isoformat(" "))
            for trade_id, entry, exit_ in rows
        }
    connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        records = await connection.fetch(
            "SELECT trade_id, (entry_time AT TIME ZONE 'UTC')::text AS entry_time,"
            " (exit_time AT TIME ZONE 'UTC')::text AS exit_time FROM trades"
        )
    finally:
        await connection.close()
    return {record["trade_id"]: (record["entry_time"], record["exit_time"]) for record in records}


@pytest.mark.parametrize("count", [1, 20])  # on PostgreSQL one new row is an INSERT, twenty go by binary COPY
async def test_what_the_database_holds_at_the_calendars_ends_is_what_was_recorded(
    clean_database_url: str, sidecar_settings: Any, count: int
) -> None:
    async with PersistenceSidecar(sidecar_settings(clean_database_url), log_events=False) as sidecar:
        for field, extreme in (("entry_time", "0001-01-01T00:00Z"), ("exit_time", "9999-12-31T23:59:59.999999Z")):
            with pytest.raises(InvalidRecordError) as refused:
                sidecar.record_trade(trade_data(trade_id="EXTREME", exit_price="1.1", **{field: extreme}))
            assert refused.value.field == field
        for i in range(count):
            sidecar.record_trade(
                trade_data(trade_id=f"EDGE-{i}", entry_time=EARLIEST, exit_time=LATEST, exit_price="1.1")
            )
        await sidecar.flush(10.0)
    stored = await _raw_times(clean_database_url)
    expected = (EARLIEST.replace(tzinfo=None).isoformat(" "), LATEST.replace(tzinfo=None).isoformat(" "))
    assert stored == {f"EDGE-{i}": expected for i in range(count)}  # nothing else, and never an infinity
