"""Domain records: enumerations, signs, exact decimals, UTC timestamps and errors that name the field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, localcontext
from typing import Annotated, Any, ClassVar, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from persistence.errors import InvalidRecordError
from persistence.records.models import (
    _FAST_PARSERS,
    DECIMAL_LIMIT,
    ParameterChange,
    PerformanceSnapshot,
    Record,
    Signal,
    SignalExecution,
    Trade,
    to_exact_decimal,
)
from persistence.records.parser import (
    Invariant,
    clean,
    compile_model,
    lower,
    no_surrounding_space,
    now_if_missing,
    positive,
    rules_of,
    to_stored_utc,
)
from tests.support.factories import BASE_TIME, make_parameter_change, make_signal, make_snapshot, make_trade, trade_data


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


@pytest.mark.parametrize("field", ["pnl", "stop_loss", "confidence_score"])
@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (Decimal("NaN"), "NaN and infinities"),
        (Decimal("-sNaN"), "NaN and infinities"),
        (Decimal("Infinity"), "NaN and infinities"),
        (Decimal("1.123456789"), "more than 8 digits after the point"),
        (Decimal("10000000000"), "does not fit"),
    ],
)
def test_a_value_that_does_not_fit_is_refused_whatever_the_hosts_decimal_context(
    field: str, bad: Decimal, reason: str
) -> None:
    """The fast path checks a decimal with its own context: a host that traps nothing gets the same refusals."""
    with localcontext() as context:
        context.traps = dict.fromkeys(context.traps, False)
        context.prec = 4
        error = invalid(trade_data(**{field: bad}))
        assert make_trade(**{field: Decimal("9999999999.99999999")}).model_dump()[field] == Decimal(
            "9999999999.99999999"
        )
    assert error.field == field
    assert reason in error.reason


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


# --------------------------------------------------------------------------- the compiled fast path


def _reference(model: type[Record], data: dict[str, Any]) -> Record | None:
    """What the pydantic model alone makes of ``data`` (``None`` when it refuses)."""
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


texts = st.one_of(
    st.sampled_from(["EURUSD", "T-1", "buy", "Sell", " LONDON", "tokyo ", "", "a" * 33, "a" * 65, "M5", "x\x00y"]),
    st.text(max_size=70),
    st.just("\ud800"),
)
numbers = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True),
    st.decimals(places=8, min_value=-(10**11), max_value=10**11),
    st.sampled_from([Decimal("1.123456789"), Decimal("1.50000000000"), Decimal("-0"), Decimal("1E+10"), Decimal("0")]),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(),
    st.sampled_from(["1.5", " 2.25 ", "1_000", "nan", "one", "1e3", 0.1 + 0.2]),
    st.booleans(),
)
times = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.none() | st.timezones()),
    st.sampled_from(
        [
            "2026-03-02T08:00:00Z",
            "2026-03-02T08:00:00.5+09:00",
            "2026-03-02T08:00:00",
            "2026-03-02 08:00:00",
            "2026-03-02",
            "9999-12-31T23:59:59-05:00",
            "0001-01-01T00:00:00+05:00",
            "2026-02-30T08:00:00Z",
            "1772438400",
        ]
    ),
    st.datetimes(timezones=st.just(timezone(timedelta(hours=-5)))),
)
anything = st.one_of(st.none(), texts, numbers, times, st.integers(-3, 5), st.booleans())


def _mapping(model: type[Record]) -> st.SearchStrategy[dict[str, Any]]:
    fields = {
        name: st.one_of(
            anything,
            numbers if "price" in name or "pnl" in name or "rate" in name or "size" in name else texts,
            times if "time" in name or name.endswith("_at") else texts,
        )
        for name in model.model_fields
    }
    return st.fixed_dictionaries({}, optional={**fields, "unexpected": st.just(1)})


@pytest.mark.parametrize("model", [Trade, Signal, SignalExecution, PerformanceSnapshot, ParameterChange])
@settings(derandomize=True, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_compiled_fast_path_accepts_only_what_the_model_accepts_and_makes_the_same_record(
    model: type[Record], data: st.DataObject
) -> None:
    valid = _valid_mapping(model)
    mapping = {**valid, **data.draw(_mapping(model))}
    for stamp in ("created_at", "updated_at"):  # "now" differs between two calls; pin it when absent
        if stamp in model.model_fields and mapping.get(stamp) is None:
            mapping[stamp] = BASE_TIME
    if model in (PerformanceSnapshot, ParameterChange) and "id" not in mapping:
        mapping["id"] = "fixed-id"
    fast = _FAST_PARSERS[model](dict(mapping))
    reference = _reference(model, dict(mapping))
    if fast is None:
        return  # the slow path decides, and it is the reference itself
    assert reference is not None, f"fast path accepted what the model refuses: {mapping!r}"
    assert fast == reference.__dict__
    assert model.parse(mapping).to_json() == reference.to_json()  # digits and offsets too, not only equality


def _valid_mapping(model: type[Record]) -> dict[str, Any]:
    factories = {
        Trade: lambda: make_trade().to_json(),
        Signal: lambda: make_signal().to_json(),
        SignalExecution: lambda: {"signal_id": "S-1", "executed": True, "execution_status": "filled"},
        PerformanceSnapshot: lambda: make_snapshot().to_json(),
        ParameterChange: lambda: make_parameter_change().to_json(),
    }
    return dict(factories[model]())


def test_the_fast_path_takes_the_common_forms_and_leaves_the_rest_to_the_model() -> None:
    fast = _FAST_PARSERS[Trade]
    assert fast(trade_data()) is not None
    assert fast(make_trade().to_json()) is not None  # the journal's form
    assert fast(trade_data(entry_price=0.1, pnl=-3, position_size="2.5")) is not None
    normalised = fast(trade_data(direction=" sell ", session="tokyo"))
    assert normalised is not None and (normalised["direction"], normalised["session"]) == ("SELL", "TOKYO")
    # Forms the fast path leaves to the model, which accepts them:
    assert fast(trade_data(entry_time="1772438400")) is None
    assert Trade.parse(trade_data(entry_time="1772438400")).entry_time == datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


TEXT_FIELDS = [
    (Trade, make_trade, "trade_id"),
    (Trade, make_trade, "symbol"),
    (Trade, make_trade, "signal_id"),
    (Trade, make_trade, "account_id"),
    (Trade, make_trade, "pattern_type"),
    (Signal, make_signal, "signal_id"),
    (Signal, make_signal, "symbol"),
    (Signal, make_signal, "timeframe"),
    (Signal, make_signal, "pattern_type"),
    (Signal, make_signal, "execution_status"),
    (PerformanceSnapshot, make_snapshot, "id"),
    (PerformanceSnapshot, make_snapshot, "parameter_mode"),
    (ParameterChange, make_parameter_change, "id"),
    (ParameterChange, make_parameter_change, "parameter_mode"),
    (ParameterChange, make_parameter_change, "reason"),
]


@pytest.mark.parametrize(("model", "factory", "field"), TEXT_FIELDS)
@pytest.mark.parametrize(("bad", "reason"), [("A\x00B", "NUL"), ("A\ud800B", "unpaired surrogates")])
def test_nul_and_unpaired_surrogates_are_refused_in_every_text_field(
    model: type[Record], factory: Any, field: str, bad: str, reason: str
) -> None:
    data = factory().to_json()
    data[field] = bad
    with pytest.raises(InvalidRecordError) as caught:
        model.parse(data)
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_every_text_field_of_every_record_is_in_the_nul_test() -> None:
    covered = {(model, field) for model, _, field in TEXT_FIELDS}
    for model in (Trade, Signal, PerformanceSnapshot, ParameterChange):
        for name, info in model.model_fields.items():
            if str in _plain_types(info.annotation):  # the enumerations (Literal) are not free text
                assert (model, name) in covered, f"{model.__name__}.{name}"


def _plain_types(annotation: Any) -> set[Any]:
    args = getattr(annotation, "__args__", None)
    origin = getattr(annotation, "__origin__", None)
    if args and origin is not None and origin is not Literal:
        return {t for arg in args for t in _plain_types(arg)}
    return {getattr(annotation, "__origin__", annotation)}


def test_an_unpaired_surrogate_in_a_non_ascii_text_is_found_and_paired_text_is_kept() -> None:
    assert make_trade(pattern_type="tête-à-tête ✓").pattern_type == "tête-à-tête ✓"
    assert make_parameter_change(reason="emoji \U0001f680 ok").reason == "emoji \U0001f680 ok"


@pytest.mark.parametrize(
    "edge",
    [
        "9999-12-31T23:59:59-05:00",
        "0001-01-01T00:00:00+05:00",
        datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-5))),
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))),
    ],
)
@pytest.mark.parametrize("field", ["entry_time", "exit_time", "created_at", "updated_at"])
def test_a_time_outside_the_calendar_once_in_utc_is_refused_naming_the_field(field: str, edge: Any) -> None:
    data = trade_data(entry_time=datetime(1, 1, 2, tzinfo=UTC)) if field == "exit_time" else trade_data()
    error = invalid({**data, field: edge})
    assert error.field == field
    assert "outside the calendar" in error.reason


def test_a_time_outside_the_calendar_is_refused_for_every_record_type() -> None:
    edge = "9999-12-31T23:59:59-05:00"
    for model, data, field in [
        (Signal, make_signal().to_json(), "generated_at"),
        (PerformanceSnapshot, make_snapshot().to_json(), "snapshot_time"),
        (ParameterChange, make_parameter_change().to_json(), "change_time"),
    ]:
        with pytest.raises(InvalidRecordError) as caught:
            model.parse({**data, field: edge})
        assert caught.value.field == field


def test_records_given_the_same_names_share_one_fields_set_that_model_copy_never_changes() -> None:
    first, second = Trade.parse(trade_data()), Trade.parse(trade_data())
    assert first.model_fields_set == set(trade_data())
    assert first.__pydantic_fields_set__ is second.__pydantic_fields_set__
    copied = first.model_copy(update={"pnl": Decimal("1")})
    assert "pnl" in copied.model_fields_set
    assert "pnl" not in second.model_fields_set


# ---------------------------------------------------------------------------------------------- the calendar's ends

FIRST_INSTANT = datetime.min.replace(tzinfo=UTC)
LAST_INSTANT = datetime.max.replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (make_trade, "entry_time"),
        (make_trade, "exit_time"),
        (make_trade, "created_at"),
        (make_signal, "generated_at"),
        (make_snapshot, "snapshot_time"),
        (make_parameter_change, "change_time"),
    ],
)
@pytest.mark.parametrize(
    "extreme",
    [
        FIRST_INSTANT,
        LAST_INSTANT,
        "0001-01-01T00:00Z",
        "9999-12-31T23:59:59.999999Z",
        "0001-01-01T01:00:00+01:00",  # the first instant, spelled in another zone
        datetime.max,  # naive means UTC
    ],
)
def test_the_calendars_first_and_last_instants_are_refused_naming_the_field(
    make: Any, field: str, extreme: object
) -> None:
    """PostgreSQL's driver stores them as -infinity/infinity: refused up front, never stored as another value."""
    overrides: dict[str, Any] = {field: extreme}
    if field == "exit_time":
        overrides["exit_price"] = Decimal("1.1")
    with pytest.raises(InvalidRecordError) as refused:
        make(**overrides)
    assert refused.value.field == field and "instant of the calendar" in refused.value.reason


@pytest.mark.parametrize("near", [FIRST_INSTANT + timedelta(microseconds=1), LAST_INSTANT - timedelta(microseconds=1)])
def test_the_instants_next_to_the_calendars_ends_are_accepted_as_they_are(near: datetime) -> None:
    trade = make_trade(entry_time=FIRST_INSTANT + timedelta(microseconds=1), exit_time=near, exit_price="1.1")
    assert trade.exit_time == near
    assert make_trade(entry_time=near.isoformat()).entry_time == near


# ------------------------------------------------------------------ the fast parser, generated from the fields


class _Probe(BaseModel):
    """A model built from every form the generator reads, with bounds unlike the records' own."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    invariants: ClassVar[tuple[Invariant, ...]] = (Invariant("level < 3 or amount is not None", "level 3 needs one"),)

    code: Annotated[
        str, Field(min_length=2, max_length=4), BeforeValidator(clean), AfterValidator(no_surrounding_space)
    ]
    level: Annotated[int, Field(ge=1, le=3)]
    side: Annotated[Literal["in", "out"], BeforeValidator(lower)]
    amount: Annotated[Decimal, BeforeValidator(to_exact_decimal), AfterValidator(positive)] | None = None
    note: Annotated[str, Field(max_length=3), BeforeValidator(clean)] | None = None
    at: Annotated[datetime, BeforeValidator(now_if_missing), AfterValidator(to_stored_utc)] = Field(
        default_factory=lambda: BASE_TIME
    )
    ref: Annotated[str, Field(min_length=1, max_length=8), BeforeValidator(clean)] = Field(
        default_factory=lambda: "made"
    )
    on: bool = True

    @model_validator(mode="after")
    def _invariants(self) -> _Probe:
        for invariant in self.invariants:
            if not invariant.holds(self.__dict__):
                raise ValueError(invariant.message)
        return self


_PROBE_PARSER = compile_model(_Probe, now=lambda: BASE_TIME)


def test_the_generated_rules_are_read_from_the_fields_types_constraints_and_validators() -> None:
    rules = {rule.name: rule for rule in rules_of(_Probe)}
    assert (rules["code"].kind, rules["code"].min_length, rules["code"].max_length, rules["code"].strip) == (
        "text",
        2,
        4,
        True,
    )
    assert (rules["level"].kind, rules["level"].minimum, rules["level"].maximum) == ("integer", 1, 3)
    assert (rules["side"].kind, rules["side"].choices, rules["side"].case) == ("choice", ("in", "out"), "lower")
    assert (rules["amount"].sign, rules["amount"].optional, rules["amount"].required) == ("positive", True, False)
    assert (rules["note"].min_length, rules["note"].max_length, rules["note"].strip) == (0, 3, False)
    assert rules["at"].stamp and rules["ref"].default_factory is not None and rules["on"].default is True
    trade = {rule.name: rule for rule in rules_of(Trade)}
    assert (trade["symbol"].max_length, trade["symbol"].strip, trade["entry_price"].sign) == (32, True, "positive")
    assert (trade["direction"].choices, trade["direction"].case) == (("BUY", "SELL"), "upper")


@settings(derandomize=True, max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.fixed_dictionaries(
        {},
        optional={
            "code": st.one_of(st.text(max_size=6), st.just(" ab"), st.integers()),
            "level": st.one_of(st.integers(-1, 5), st.booleans(), st.just("2")),
            "side": st.sampled_from(["in", "OUT", " out ", "up", None, 1]),
            "amount": st.one_of(st.none(), st.decimals(-2, 2, places=9, allow_nan=False), st.just(0), st.just("1.5")),
            "note": st.one_of(st.none(), st.text(max_size=5)),
            "at": st.one_of(st.none(), st.just(BASE_TIME), st.just("2026-03-02T08:00:00+01:00"), st.just("x")),
            "ref": st.one_of(st.none(), st.text(max_size=10)),
            "on": st.one_of(st.booleans(), st.none(), st.just(1)),
            "other": st.just(1),
        },
    )
)
def test_a_parser_generated_from_any_model_accepts_only_what_the_model_accepts(data: dict[str, Any]) -> None:
    fast = _PROBE_PARSER(dict(data))
    try:
        reference = _Probe.model_validate({**data, "at": data.get("at") or BASE_TIME})
    except ValidationError:
        reference = None
    if fast is not None:
        assert reference is not None, f"fast path accepted what the model refuses: {data!r}"
        assert fast == reference.__dict__


def test_the_generated_parser_takes_defaults_and_refuses_by_the_fields_bounds() -> None:
    made = _PROBE_PARSER({"code": "ab", "level": 1, "side": " OUT "})
    assert made == {
        "code": "ab",
        "level": 1,
        "side": "out",
        "amount": None,
        "note": None,
        "at": BASE_TIME,
        "ref": "made",
        "on": True,
    }
    for bad in ({"code": "a"}, {"code": "abcde"}, {"code": " ab"}, {"level": 0}, {"level": 4}, {"level": 3}):
        assert _PROBE_PARSER({"code": "ab", "level": 1, "side": "in", **bad}) is None, bad  # the model decides
    assert _PROBE_PARSER({"code": "ab", "level": 3, "side": "in", "amount": 1}) is not None  # the invariant holds


def test_a_field_with_no_fast_form_makes_the_generation_fail_rather_than_a_laxer_parser() -> None:
    class Unknown(BaseModel):
        name: Annotated[str, AfterValidator(str.title)]

    class Float(BaseModel):
        ratio: float

    class Unconverted(BaseModel):
        price: Decimal

    class Stray(BaseModel):
        invariants: ClassVar[tuple[Invariant, ...]] = (Invariant("missing > 0", "?"),)
        count: int

    for model in (Unknown, Float, Unconverted):
        with pytest.raises(TypeError, match=r"fast form|converted"):
            rules_of(model)
    with pytest.raises(TypeError, match="unknown"):
        compile_model(Stray)


def test_an_invariant_is_one_expression_for_the_model_and_the_fast_parser() -> None:
    rule = Trade.invariants[0]
    assert rule.fast_form() == "f_exit_time is None or f_exit_time >= f_entry_time"
    assert rule.names == {"exit_time", "entry_time"}
    assert rule.holds({"exit_time": None, "entry_time": BASE_TIME})
    assert not rule.holds({"exit_time": BASE_TIME, "entry_time": BASE_TIME + timedelta(seconds=1)})


def test_a_refusal_of_a_huge_value_quotes_its_start_not_all_of_it() -> None:
    """A reason goes into logs and HTTP answers: a 100,000-digit decimal is refused naming the field, in a few
    hundred characters."""
    data = trade_data()
    data["pnl"] = "1" * 100_000
    with pytest.raises(InvalidRecordError) as refused:
        Trade.parse(data)
    assert refused.value.field == "pnl"
    assert len(str(refused.value)) < 400
    assert "1111" in refused.value.reason and "characters)" in refused.value.reason
