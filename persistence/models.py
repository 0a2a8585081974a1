"""Domain records: :class:`Trade`, :class:`Signal`, :class:`PerformanceSnapshot`, :class:`ParameterChange`.

This module owns validation and nothing else: enumerations, signs, lengths, exact decimals and UTC
timestamps. Money and ratios are :class:`~decimal.Decimal` with a fixed column shape (18 significant digits,
8 after the point; see :data:`DECIMAL_SCALE`): floats are converted through their shortest ``repr``; NaN,
infinities and values that do not fit are refused, never rounded. Accepted decimals are quantized to the
column scale, so what is recorded is digit for digit what every backend gives back. Naive timestamps are taken
as UTC and every timestamp comes out timezone-aware in UTC. Invalid input raises
:class:`~persistence.errors.InvalidRecordError` naming the field and the reason. No SQLAlchemy here.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal, DivisionByZero, InvalidOperation, Overflow
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from persistence.errors import InvalidRecordError

DECIMAL_PRECISION = 18
"""Significant digits of every decimal column."""
DECIMAL_SCALE = 8
"""Digits after the point of every decimal column."""
DECIMAL_QUANTUM = Decimal(1).scaleb(-DECIMAL_SCALE)
DECIMAL_CONTEXT = Context(
    prec=34,
    rounding=ROUND_HALF_EVEN,
    Emin=-999_999,
    Emax=999_999,
    capitals=1,
    clamp=0,
    flags=[],
    traps=[InvalidOperation, DivisionByZero, Overflow],
)
"""The arithmetic context of every conversion here: the host's thread context (say, a low ``prec``) never applies."""
DECIMAL_LIMIT = Decimal(10) ** (DECIMAL_PRECISION - DECIMAL_SCALE)
"""Decimal columns hold values strictly between ``-DECIMAL_LIMIT`` and ``DECIMAL_LIMIT``."""

Entity = Literal["trade", "signal", "snapshot", "parameter_change"]
ENTITIES: tuple[Entity, ...] = ("trade", "signal", "snapshot", "parameter_change")

Direction = Literal["BUY", "SELL"]
TradingSession = Literal["TOKYO", "LONDON", "NY", "SYDNEY", "OVERLAP"]
ChangedBy = Literal["system_auto", "learning_agent", "manual", "emergency"]
DIRECTIONS: tuple[str, ...] = ("BUY", "SELL")
SESSIONS: tuple[str, ...] = ("TOKYO", "LONDON", "NY", "SYDNEY", "OVERLAP")
CHANGED_BY: tuple[str, ...] = ("system_auto", "learning_agent", "manual", "emergency")


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def to_exact_decimal(value: object) -> Decimal:
    """Convert ``value`` to a Decimal that fits a decimal column exactly, or raise ``ValueError``.

    Floats go through their shortest ``repr`` (``0.1`` becomes ``Decimal("0.1")``). The result is quantized to
    :data:`DECIMAL_SCALE` places, which never changes its value: a value with more places is refused.
    """
    if isinstance(value, Decimal):
        number = value
    elif isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    elif isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("NaN and infinities are not allowed")
        number = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"{value!r} is not a decimal number") from None
    else:
        raise ValueError(f"must be a decimal number, not {type(value).__name__}")
    if not number.is_finite():
        raise ValueError("NaN and infinities are not allowed")
    if number.copy_abs() >= DECIMAL_LIMIT:  # copy_abs is exact; abs() rounds to the thread's context
        raise ValueError(f"{number} does not fit: at most {DECIMAL_PRECISION - DECIMAL_SCALE} digits before the point")
    quantized = number.quantize(DECIMAL_QUANTUM, context=DECIMAL_CONTEXT)
    if quantized != number:
        raise ValueError(f"{number} has more than {DECIMAL_SCALE} digits after the point; it is never rounded")
    return quantized


def to_utc(value: datetime) -> datetime:
    """Make a datetime timezone-aware in UTC; a naive one is taken as UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _positive(value: Decimal) -> Decimal:
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def _non_negative(value: Decimal) -> Decimal:
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _upper(value: object) -> object:
    return value.strip().upper() if isinstance(value, str) else value


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


def _no_surrounding_space(value: str) -> str:
    if value != value.strip():
        raise ValueError("must not start or end with whitespace")
    return value


ExactDecimal = Annotated[Decimal, BeforeValidator(to_exact_decimal)]
"""Any exact decimal that fits the column (negatives allowed: P&L, percentages, drawdowns)."""
Price = Annotated[Decimal, BeforeValidator(to_exact_decimal), AfterValidator(_positive)]
PositiveSize = Annotated[Decimal, BeforeValidator(to_exact_decimal), AfterValidator(_positive)]
NonNegativeDecimal = Annotated[Decimal, BeforeValidator(to_exact_decimal), AfterValidator(_non_negative)]
UtcDatetime = Annotated[datetime, AfterValidator(to_utc)]


def _now_if_missing(value: object) -> object:
    return utc_now() if value is None else value


Stamp = Annotated[datetime, BeforeValidator(_now_if_missing), AfterValidator(to_utc)]
"""A record-keeping timestamp: ``None`` or absent means now."""
Identifier = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_no_surrounding_space)]
Symbol = Annotated[str, Field(min_length=1, max_length=32), AfterValidator(_no_surrounding_space)]
Label = Annotated[str, Field(min_length=1, max_length=64)]
UpperDirection = Annotated[Direction, BeforeValidator(_upper)]
UpperSession = Annotated[TradingSession, BeforeValidator(_upper)]
LowerChangedBy = Annotated[ChangedBy, BeforeValidator(_lower)]
Count = Annotated[int, Field(ge=0, le=2**62)]

RecordT = TypeVar("RecordT", bound="Record")


class Record(BaseModel):
    """Common behaviour of the four records: validation errors, natural key, row and JSON forms."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    entity: ClassVar[Entity]
    key_field: ClassVar[str]

    @classmethod
    def parse(cls, data: Self | Mapping[str, Any]) -> Self:
        """Return ``data`` if it is already this record type, else validate the mapping into one.

        Raises :class:`InvalidRecordError` naming each bad field and the reason.
        """
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise InvalidRecordError(cls.entity, [("", f"expected a {cls.__name__} or a mapping")])
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidRecordError(cls.entity, _field_errors(exc)) from None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Self:
        """Build a record from a database row, trusting the types the column types already produced.

        This is pydantic's ``model_construct`` without its per-field default handling (every field is a column,
        so there is none to do): loading the history at start-up builds thousands of these.
        """
        names = cls.__dict__.get("_field_names") or _field_names(cls)
        values = row if type(row) is dict and len(row) == len(names) else {name: row[name] for name in names}
        record = cls.__new__(cls)
        object.__setattr__(record, "__dict__", values)
        object.__setattr__(record, "__pydantic_fields_set__", set(names))
        object.__setattr__(record, "__pydantic_extra__", None)
        object.__setattr__(record, "__pydantic_private__", None)
        return record

    @property
    def key(self) -> str:
        """The natural key that identifies this record in its table."""
        return str(getattr(self, self.key_field))

    def to_row(self) -> dict[str, Any]:
        """The record as a column → value mapping for its table."""
        return dict(self.__dict__)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe form (decimals and timestamps as strings) that :meth:`parse` accepts back."""
        return self.model_dump(mode="json")


class Trade(Record):
    """One trade. A later record with the same ``trade_id`` is a newer version of it (e.g. when it closes)."""

    entity: ClassVar[Entity] = "trade"
    key_field: ClassVar[str] = "trade_id"

    trade_id: Identifier
    symbol: Symbol
    direction: UpperDirection
    entry_time: UtcDatetime
    entry_price: Price
    position_size: PositiveSize
    signal_id: Identifier | None = None
    account_id: Identifier | None = None
    exit_time: UtcDatetime | None = None
    exit_price: Price | None = None
    stop_loss: Price | None = None
    take_profit: Price | None = None
    pnl: ExactDecimal | None = None
    pnl_percentage: ExactDecimal | None = None
    session: UpperSession | None = None
    pattern_type: Label | None = None
    confidence_score: NonNegativeDecimal | None = None
    risk_reward_ratio: NonNegativeDecimal | None = None
    created_at: Stamp = Field(default_factory=utc_now)
    updated_at: Stamp = Field(default_factory=utc_now)

    @model_validator(mode="after")
    def _exit_not_before_entry(self) -> Self:
        if self.exit_time is not None and self.exit_time < self.entry_time:
            raise ValueError("exit_time is before entry_time")
        return self


class Signal(Record):
    """One trading signal; ``executed`` and ``execution_status`` change when the orchestrator acts on it."""

    entity: ClassVar[Entity] = "signal"
    key_field: ClassVar[str] = "signal_id"

    signal_id: Identifier
    symbol: Symbol
    timeframe: Annotated[str, Field(min_length=1, max_length=16)]
    signal_type: UpperDirection
    confidence: NonNegativeDecimal
    entry_price: Price
    generated_at: UtcDatetime
    stop_loss: Price | None = None
    take_profit: Price | None = None
    session: UpperSession | None = None
    pattern_type: Label | None = None
    executed: bool = False
    execution_status: Annotated[str, Field(min_length=1, max_length=32)] | None = None
    created_at: Stamp = Field(default_factory=utc_now)


class SignalExecution(Record):
    """A change to a recorded signal's execution fields (``update_signal_execution``)."""

    entity: ClassVar[Entity] = "signal"
    key_field: ClassVar[str] = "signal_id"

    signal_id: Identifier
    executed: bool
    execution_status: Annotated[str, Field(min_length=1, max_length=32)] | None = None


class PerformanceSnapshot(Record):
    """Aggregate performance at a point in time. ``id`` is generated when absent, so replays are idempotent."""

    entity: ClassVar[Entity] = "snapshot"
    key_field: ClassVar[str] = "id"

    id: Annotated[str, Field(min_length=1, max_length=36)] = Field(default_factory=lambda: str(uuid.uuid4()))
    snapshot_time: UtcDatetime
    total_trades: Count
    winning_trades: Count
    losing_trades: Count
    win_rate: NonNegativeDecimal | None = None
    total_pnl: ExactDecimal | None = None
    sharpe_ratio: ExactDecimal | None = None
    max_drawdown: ExactDecimal | None = None
    average_rr: NonNegativeDecimal | None = None
    session: UpperSession | None = None
    parameter_mode: Label | None = None
    created_at: Stamp = Field(default_factory=utc_now)

    @model_validator(mode="after")
    def _outcomes_within_total(self) -> Self:
        if self.winning_trades + self.losing_trades > self.total_trades:
            raise ValueError("winning_trades + losing_trades exceeds total_trades")
        return self


class ParameterChange(Record):
    """A change of the strategy's parameters, and who made it."""

    entity: ClassVar[Entity] = "parameter_change"
    key_field: ClassVar[str] = "id"

    id: Annotated[str, Field(min_length=1, max_length=36)] = Field(default_factory=lambda: str(uuid.uuid4()))
    change_time: UtcDatetime
    parameter_mode: Label
    changed_by: LowerChangedBy
    session: UpperSession | None = None
    confidence_threshold: NonNegativeDecimal | None = None
    min_risk_reward: NonNegativeDecimal | None = None
    reason: Annotated[str, Field(max_length=2000)] | None = None
    created_at: Stamp = Field(default_factory=utc_now)


def _field_names(cls: type[Record]) -> tuple[str, ...]:
    names = tuple(cls.model_fields)
    type.__setattr__(cls, "_field_names", names)
    return names


def _field_errors(exc: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for error in exc.errors(include_url=False):
        loc = error.get("loc") or ()
        field = ".".join(str(part) for part in loc if not isinstance(part, int) or len(loc) == 1)
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            message = "unknown field"
        problems.append((field, message))
    return problems
