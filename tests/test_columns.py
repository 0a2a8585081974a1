"""The SQLite storage encodings: fixed-width UTC text that sorts by time, and exact scaled integers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from persistence.db.columns import decode_datetime, decode_decimal, to_scaled_int, to_sqlite_datetime
from persistence.records.models import DECIMAL_LIMIT, DECIMAL_SCALE

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
