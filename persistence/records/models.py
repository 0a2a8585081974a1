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

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar, get_args

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
from persistence.records.parser import (
    DECIMAL_CONTEXT,
    DECIMAL_LIMIT,
    DECIMAL_PRECISION,
    DECIMAL_QUANTUM,
    DECIMAL_SCALE,
    FastParser,
    Invariant,
    clean,
    compile_model,
    lower,
    no_surrounding_space,
    non_negative,
    now_if_missing,
    positive,
    to_exact_decimal,
    to_stored_utc,
    to_utc,
    upper,
)

__all__ = [
    "CHANGED_BY",
    "DECIMAL_CONTEXT",
    "DECIMAL_LIMIT",
    "DECIMAL_PRECISION",
    "DECIMAL_QUANTUM",
    "DECIMAL_SCALE",
    "DIRECTIONS",
    "ENTITIES",
    "SESSIONS",
    "Entity",
    "ParameterChange",
    "PerformanceSnapshot",
    "Record",
    "Signal",
    "SignalExecution",
    "Trade",
    "to_exact_decimal",
    "to_utc",
    "utc_now",
]

Entity = Literal["trade", "signal", "snapshot", "parameter_change"]
ENTITIES: tuple[Entity, ...] = get_args(Entity)
"""The entity names, in the order of :data:`persistence.records.registry.RECORD_KINDS` (a test holds them equal)."""

Direction = Literal["BUY", "SELL"]
TradingSession = Literal["TOKYO", "LONDON", "NY", "SYDNEY", "OVERLAP"]
ChangedBy = Literal["system_auto", "learning_agent", "manual", "emergency"]
DIRECTIONS: tuple[str, ...] = get_args(Direction)
SESSIONS: tuple[str, ...] = get_args(TradingSession)
CHANGED_BY: tuple[str, ...] = get_args(ChangedBy)


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


ExactDecimal = Annotated[Decimal, BeforeValidator(to_exact_decimal)]
"""Any exact decimal that fits the column (negatives allowed: P&L, percentages, drawdowns)."""
Price = Annotated[Decimal, BeforeValidator(to_exact_decimal), AfterValidator(positive)]
PositiveSize = Annotated[Decimal, BeforeValidator(to_exact_decimal), AfterValidator(positive)]
NonNegativeDecimal = Annotated[Decimal, BeforeValidator(to_exact_decimal), AfterValidator(non_negative)]
UtcDatetime = Annotated[datetime, AfterValidator(to_stored_utc)]
Stamp = Annotated[datetime, BeforeValidator(now_if_missing), AfterValidator(to_stored_utc)]
"""A record-keeping timestamp: ``None`` or absent means now."""
Clean = BeforeValidator(clean)
"""Every text field: no NUL, no unpaired surrogate (checked before pydantic, whose own message says less)."""
Identifier = Annotated[str, Field(min_length=1, max_length=64), Clean, AfterValidator(no_surrounding_space)]
Symbol = Annotated[str, Field(min_length=1, max_length=32), Clean, AfterValidator(no_surrounding_space)]
Label = Annotated[str, Field(min_length=1, max_length=64), Clean]
GeneratedId = Annotated[str, Field(min_length=1, max_length=36), Clean]
Timeframe = Annotated[str, Field(min_length=1, max_length=16), Clean]
ExecutionStatus = Annotated[str, Field(min_length=1, max_length=32), Clean]
Reason = Annotated[str, Field(max_length=2000), Clean]
UpperDirection = Annotated[Direction, BeforeValidator(upper)]
UpperSession = Annotated[TradingSession, BeforeValidator(upper)]
LowerChangedBy = Annotated[ChangedBy, BeforeValidator(lower)]
Count = Annotated[int, Field(ge=0, le=2**62)]

RecordT = TypeVar("RecordT", bound="Record")
_new_object = object.__new__
_set_attribute = object.__setattr__
_FIELDS_SETS: dict[tuple[str, ...], set[str]] = {}
_FIELDS_SETS_MAX = 256


def _fields_set(data: dict[str, Any]) -> set[str]:
    """The names given in ``data``, as one set shared by every record given the same names.

    A host's mappings come in a few shapes; sharing the set saves one long-lived object per record, which the
    garbage collector's youngest generation counts (its passes set the tail of ``record_trade``). Sharing is safe
    because records are frozen: pydantic only ever copies this set (``model_copy``), never changes it.
    """
    names = tuple(data)
    shared = _FIELDS_SETS.get(names)
    if shared is None:
        if len(_FIELDS_SETS) >= _FIELDS_SETS_MAX:
            _FIELDS_SETS.clear()
        shared = _FIELDS_SETS[names] = set(names)
    return shared


class Record(BaseModel):
    """Common behaviour of the four records: validation errors, natural key, row and JSON forms."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    entity: ClassVar[Entity]
    key_field: ClassVar[str]
    invariants: ClassVar[tuple[Invariant, ...]] = ()
    """Rules over several fields, checked after the fields by the model and inlined by the fast parser."""

    @model_validator(mode="after")
    def _check_invariants(self) -> Self:
        for invariant in self.invariants:
            if not invariant.holds(self.__dict__):
                raise ValueError(invariant.message)
        return self

    @classmethod
    def parse(cls, data: Self | Mapping[str, Any]) -> Self:
        """Return ``data`` if it is already this record type, else validate the mapping into one.

        Raises :class:`InvalidRecordError` naming each bad field and the reason.
        """
        if type(data) is dict:  # the common case first: pydantic's isinstance() goes through Python code
            fast = _FAST_PARSERS.get(cls)
            values = fast(data) if fast is not None else None
            if values is not None:
                return cls._build(values, _fields_set(data))
        elif isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise InvalidRecordError(cls.entity, [("", f"expected a {cls.__name__} or a mapping")])
        # The slow path: pydantic, for the uncommon forms the compiled parser leaves alone and for every refusal.
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidRecordError(cls.entity, _field_errors(exc)) from None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Self:
        """A record from a mapping of already-decoded column values (a result row's ``mappings()``), unvalidated.

        The repositories decode rows with :class:`persistence.db.rowcodec.RowReader`; this is for a mapping at hand.
        """
        names = tuple(cls.model_fields)
        return cls._build({name: row[name] for name in names}, set(names))

    @classmethod
    def _build(cls, values: dict[str, Any], fields_set: set[str]) -> Self:
        """A record from field values that are already valid, as pydantic's ``model_construct`` makes one.

        The one place records are made without validation: from the compiled parser's output and from database rows
        (:class:`persistence.db.rowcodec.RowReader`), whose column types already produced the right values.
        """
        record = _new_object(cls)
        _set_attribute(record, "__dict__", values)
        _set_attribute(record, "__pydantic_fields_set__", fields_set)
        _set_attribute(record, "__pydantic_extra__", None)
        _set_attribute(record, "__pydantic_private__", None)
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
    invariants: ClassVar[tuple[Invariant, ...]] = (
        Invariant("exit_time is None or exit_time >= entry_time", "exit_time is before entry_time"),
    )

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


class Signal(Record):
    """One trading signal; ``executed`` and ``execution_status`` change when the orchestrator acts on it."""

    entity: ClassVar[Entity] = "signal"
    key_field: ClassVar[str] = "signal_id"

    signal_id: Identifier
    symbol: Symbol
    timeframe: Timeframe
    signal_type: UpperDirection
    confidence: NonNegativeDecimal
    entry_price: Price
    generated_at: UtcDatetime
    stop_loss: Price | None = None
    take_profit: Price | None = None
    session: UpperSession | None = None
    pattern_type: Label | None = None
    executed: bool = False
    execution_status: ExecutionStatus | None = None
    created_at: Stamp = Field(default_factory=utc_now)


class SignalExecution(Record):
    """A change to a recorded signal's execution fields (``update_signal_execution``)."""

    entity: ClassVar[Entity] = "signal"
    key_field: ClassVar[str] = "signal_id"

    signal_id: Identifier
    executed: bool
    execution_status: ExecutionStatus | None = None


class PerformanceSnapshot(Record):
    """Aggregate performance at a point in time. ``id`` is generated when absent, so replays are idempotent."""

    entity: ClassVar[Entity] = "snapshot"
    key_field: ClassVar[str] = "id"
    invariants: ClassVar[tuple[Invariant, ...]] = (
        Invariant(
            "winning_trades + losing_trades <= total_trades", "winning_trades + losing_trades exceeds total_trades"
        ),
    )

    id: GeneratedId = Field(default_factory=lambda: str(uuid.uuid4()))
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


class ParameterChange(Record):
    """A change of the strategy's parameters, and who made it."""

    entity: ClassVar[Entity] = "parameter_change"
    key_field: ClassVar[str] = "id"

    id: GeneratedId = Field(default_factory=lambda: str(uuid.uuid4()))
    change_time: UtcDatetime
    parameter_mode: Label
    changed_by: LowerChangedBy
    session: UpperSession | None = None
    confidence_threshold: NonNegativeDecimal | None = None
    min_risk_reward: NonNegativeDecimal | None = None
    reason: Reason | None = None
    created_at: Stamp = Field(default_factory=utc_now)


MAX_REASON = 300
"""The longest reason an :class:`InvalidRecordError` carries per field: it goes into logs and HTTP answers."""


def _field_errors(exc: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for error in exc.errors(include_url=False):
        loc = error.get("loc") or ()
        field = ".".join(str(part) for part in loc if not isinstance(part, int) or len(loc) == 1)
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            message = "unknown field"
        elif len(message) > MAX_REASON:  # a message quoting a huge input: the value's start is enough to find it
            message = f"{message[: MAX_REASON - 40]}… ({len(message):,} characters)"
        problems.append((field, message))
    return problems


_FAST_PARSERS: dict[type[Record], FastParser] = {
    model: compile_model(model) for model in (Trade, Signal, SignalExecution, PerformanceSnapshot, ParameterChange)
}
"""The compiled fast path of :meth:`Record.parse`, one per record type, generated from the model's fields; a test
holds each to its pydantic model."""
