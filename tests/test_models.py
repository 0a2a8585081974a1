"""Domain records: enumerations, signs, exact decimals, UTC timestamps and errors that name the field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from persistence.errors import InvalidRecordError
from persistence.models import (
    DECIMAL_LIMIT,
    ParameterChange,
    PerformanceSnapshot,
    Signal,
    Trade,
    to_exact_decimal,
)
from tests.factories import make_parameter_change, make_signal, make_snapshot, make_trade, trade_data


def invalid(data: dict[str, Any]) -> InvalidRecordError:
    with pytest.raises(InvalidRecordError) as caught:
        Trade.parse(data)
    return caught.value


def test_a_valid_trade_mapping_becomes_a_frozen_trade() -> None:
    trade = Trade.parse(trade_data(direction="sell", session="tokyo"))
    assert (trade.direction, trade.session) == ("SELL", "TOKYO")
    with pytest.raises(Exception, match="frozen"):
        trade.symbol = "GBPUSD"  # type: ignore[misc]


def test_parse_returns_an_existing_instance_unchanged() -> None:
    trade = make_trade()
    assert Trade.parse(trade) is trade


def test_float_goes_through_its_shortest_repr() -> None:
    trade = Trade.parse(trade_data(entry_price=0.1, position_size=2.5, pnl=-0.3))
    assert trade.entry_price == Decimal("0.1")
    assert trade.pnl == Decimal("-0.3")
    assert str(trade.entry_price) == "0.10000000"


@pytest.mark.parametrize(
    "bad", [float("nan"), float("inf"), float("-inf"), Decimal("NaN"), Decimal("-Infinity"), "nan"]
)
def test_nan_and_infinities_are_refused(bad: Any) -> None:
    error = invalid(trade_data(pnl=bad))
    assert error.field == "pnl"
    assert "NaN and infinities" in error.reason


def test_more_decimal_places_than_the_column_holds_is_refused_not_rounded() -> None:
    error = invalid(trade_data(entry_price=Decimal("1.123456789")))
    assert error.field == "entry_price"
    assert "more than 8 digits after the point" in error.reason
    assert "never rounded" in error.reason


def test_float_arithmetic_noise_is_refused_rather_than_silently_rounded() -> None:
    error = invalid(trade_data(pnl=0.1 + 0.2))
    assert error.field == "pnl" and "0.30000000000000004" in error.reason


def test_a_value_too_large_for_the_column_is_refused() -> None:
    error = invalid(trade_data(position_size=DECIMAL_LIMIT))
    assert error.field == "position_size" and "does not fit" in error.reason
    assert make_trade(position_size=DECIMAL_LIMIT - Decimal("0.00000001")).position_size == Decimal(
        "9999999999.99999999"
    )


def test_trailing_zeros_beyond_the_scale_are_exact_and_accepted() -> None:
    assert make_trade(entry_price=Decimal("1.5000000000")).entry_price == Decimal("1.5")


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("position_size", Decimal("-1"), "greater than zero"),
        ("position_size", 0, "greater than zero"),
        ("entry_price", Decimal("-0.5"), "greater than zero"),
        ("confidence_score", Decimal("-0.1"), "must not be negative"),
        ("risk_reward_ratio", -2, "must not be negative"),
        ("direction", "LONG", "'BUY' or 'SELL'"),
        ("session", "FRANKFURT", "TOKYO"),
        ("trade_id", "", "at least 1 character"),
        ("trade_id", " padded ", "whitespace"),
        ("trade_id", "x" * 65, "at most 64"),
        ("symbol", None, "valid string"),
        ("entry_price", "one dollar", "not a decimal number"),
        ("entry_price", True, "not a boolean"),
        ("entry_time", "yesterday", "datetime"),
        ("unexpected", 1, "unknown field"),
    ],
)
def test_invalid_field_raises_naming_the_field_and_reason(field: str, value: Any, reason: str) -> None:
    error = invalid(trade_data(**{field: value}))
    assert error.entity == "trade"
    assert error.field == field
    assert reason in error.reason
    assert isinstance(error, ValueError)


def test_missing_required_field_is_named() -> None:
    data = trade_data()
    del data["entry_price"]
    assert invalid(data).field == "entry_price"


def test_exit_before_entry_is_refused() -> None:
    data = trade_data()
    error = invalid({**data, "exit_time": data["entry_time"] - timedelta(seconds=1)})
    assert "exit_time is before entry_time" in error.reason


def test_naive_timestamps_are_taken_as_utc() -> None:
    trade = make_trade(entry_time=datetime(2026, 1, 5, 9, 30))
    assert trade.entry_time == datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
    assert trade.entry_time.tzinfo is UTC


def test_aware_timestamps_are_converted_to_utc() -> None:
    tokyo = timezone(timedelta(hours=9))
    trade = make_trade(entry_time=datetime(2026, 1, 5, 9, 30, tzinfo=tokyo))
    assert trade.entry_time == datetime(2026, 1, 5, 0, 30, tzinfo=UTC)
    assert trade.entry_time.utcoffset() == timedelta(0)
    assert make_trade(entry_time="2026-01-05T09:30:00+09:00").entry_time.hour == 0


def test_json_form_round_trips_exactly() -> None:
    trade = make_trade(pnl=Decimal("-0.00001234"), exit_price=Decimal("98765.12345678"))
    as_json = trade.to_json()
    assert as_json["pnl"] == "-0.00001234"
    assert Trade.parse(as_json) == trade


def test_a_non_mapping_is_refused() -> None:
    with pytest.raises(InvalidRecordError, match="expected a Trade or a mapping"):
        Trade.parse(["not", "a", "trade"])  # type: ignore[arg-type]


def test_signal_validation() -> None:
    signal = make_signal(signal_type="buy")
    assert signal.signal_type == "BUY" and signal.executed is False
    with pytest.raises(InvalidRecordError) as caught:
        Signal.parse({**signal.to_json(), "confidence": "-1"})
    assert caught.value.entity == "signal" and caught.value.field == "confidence"


def test_snapshot_counts_must_add_up() -> None:
    with pytest.raises(InvalidRecordError) as caught:
        PerformanceSnapshot.parse({**make_snapshot().to_json(), "winning_trades": 9, "losing_trades": 2})
    assert "exceeds total_trades" in caught.value.reason
    with pytest.raises(InvalidRecordError) as negative:
        PerformanceSnapshot.parse({**make_snapshot().to_json(), "total_trades": -1})
    assert negative.value.field == "total_trades"


def test_snapshot_and_parameter_change_get_stable_generated_ids() -> None:
    first, second = make_snapshot(), make_snapshot()
    assert first.id != second.id and len(first.id) == 36
    assert PerformanceSnapshot.parse(first.to_json()).id == first.id


def test_parameter_change_changed_by_is_an_enumeration() -> None:
    assert make_parameter_change(changed_by="MANUAL").changed_by == "manual"
    with pytest.raises(InvalidRecordError) as caught:
        ParameterChange.parse({**make_parameter_change().to_json(), "changed_by": "intern"})
    assert caught.value.field == "changed_by"


decimals_in_range = st.decimals(
    min_value=-DECIMAL_LIMIT + Decimal("0.00000001"),
    max_value=DECIMAL_LIMIT - Decimal("0.00000001"),
    places=8,
    allow_nan=False,
    allow_infinity=False,
)


@given(decimals_in_range)
def test_any_decimal_that_fits_is_kept_exactly(value: Decimal) -> None:
    assert to_exact_decimal(value) == value
    assert to_exact_decimal(str(value)) == value


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e9, max_value=1e9))
def test_a_float_is_either_exact_through_its_repr_or_refused(value: float) -> None:
    try:
        converted = to_exact_decimal(value)
    except ValueError as error:
        assert "never rounded" in str(error) or "does not fit" in str(error)
    else:
        assert converted == Decimal(repr(value))
