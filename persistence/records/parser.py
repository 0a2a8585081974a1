"""Compiled validation of the records' mappings: one generated function per record type.

Recording a trade validates about twenty fields; through pydantic, nine of them each go through Python validators
(the decimal conversion, then the sign), which made validation most of the cost of ``record_trade``. This module
builds, once per record type, one straight-line Python function that checks and converts every field of a plain
``dict`` in one pass, the way :mod:`dataclasses` builds ``__init__``: exact decimals quantized to the column scale,
timestamps converted to UTC, text checked for length, surrounding whitespace, NUL and unpaired surrogates.

It is a fast path only. It accepts exactly the common, well-typed forms (``Decimal``/``int``/``float``/``str``
numbers, ``datetime`` objects and RFC 3339 text, plain ``str``); for anything else, and for any value it would
refuse, it returns ``None`` and :meth:`persistence.records.models.Record.parse` falls back to the pydantic model, which
either accepts the value or raises the error naming the field. So refusals have one source, and a property test
checks that both paths agree on what they both accept.

The function is generated from the pydantic model itself (:func:`compile_model`): each field's type (text, decimal,
time, ``Literal`` words, integer, flag), its constraints (``min_length``, ``max_length``, ``ge``, ``le``), whether it
takes ``None``, its default, and the validators it is built from (:func:`positive`, :func:`upper`, :func:`clean`, ...,
defined here for that reason), plus the model's :class:`Invariant` rules over several fields. So a field is stated once,
in the model; a field whose type or validator has no fast form here makes the generation fail at import, never makes a
laxer fast path.

The decimal and timestamp primitives (:func:`to_exact_decimal`, :func:`to_utc`) live here too, so the models, the
column types and this module share one definition of "exact" and "UTC".
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow
from functools import cache, partial
from types import CodeType, UnionType
from typing import Annotated, Any, Literal, Union, cast, get_args, get_origin

from annotated_types import Ge, Le, MaxLen, MinLen
from pydantic import AfterValidator, BaseModel, BeforeValidator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

DECIMAL_PRECISION = 18
"""Significant digits of every decimal column."""
DECIMAL_SCALE = 8
"""Digits after the point of every decimal column."""
DECIMAL_QUANTUM = Decimal(1).scaleb(-DECIMAL_SCALE)
DECIMAL_ZERO = Decimal(0).quantize(DECIMAL_QUANTUM)
"""Zero at the column scale, positive: what a negative zero becomes."""
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
_FIT_CONTEXT = Context(
    prec=DECIMAL_PRECISION,
    rounding=ROUND_HALF_EVEN,
    Emin=-999_999,
    Emax=999_999,
    capitals=1,
    clamp=0,
    flags=[],
    traps=[InvalidOperation, DivisionByZero, Overflow, Inexact],
)
"""The fast path's quantize context: quantizing to the column's eight places raises for a value that does not fit
(``Inexact``: more places than eight; ``InvalidOperation``: more than 18 digits, an infinity, a signalling NaN), so
one call checks what a comparison and ``adjusted()`` checked after it. A quiet NaN passes and is checked apart."""
DECIMAL_LIMIT = Decimal(10) ** (DECIMAL_PRECISION - DECIMAL_SCALE)
"""Decimal columns hold values strictly between ``-DECIMAL_LIMIT`` and ``DECIMAL_LIMIT``."""


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
    # No database keeps the sign of a zero (-0.0 comes from round(-0.001, 2)): the record holds what is stored.
    return quantized if quantized else DECIMAL_ZERO


def to_utc(value: datetime) -> datetime:
    """Make a datetime timezone-aware in UTC; a naive one is taken as UTC.

    Raises ``ValueError`` for an aware time whose UTC equivalent falls outside the calendar (years 1–9999), such as
    ``9999-12-31T23:59:59-05:00``.
    """
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(
            f"{value.isoformat()} is outside the calendar (years 1 to 9999) once converted to UTC"
        ) from None


_FIRST_INSTANT = datetime.min.replace(tzinfo=UTC)
_LAST_INSTANT = datetime.max.replace(tzinfo=UTC)


def to_stored_utc(value: datetime) -> datetime:
    """:func:`to_utc` for a record's field: also refuses the calendar's first and last instants
    (0001-01-01T00:00Z, 9999-12-31T23:59:59.999999Z), which PostgreSQL's driver would store as ``-infinity`` and
    ``infinity``: every database stores what was recorded, or the record is refused up front."""
    moment = to_utc(value)
    if moment in (_FIRST_INSTANT, _LAST_INSTANT):
        raise ValueError(
            f"{moment.isoformat()} is the {'first' if moment.year == 1 else 'last'} instant of the calendar, "
            "which PostgreSQL would store as an infinity; record a real time"
        )
    return moment


def check_text(value: str) -> str:
    """Refuse NUL characters and unpaired surrogates: no backend stores them, and PostgreSQL refuses NUL outright."""
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\x00) characters")
    if not value.isascii() and _has_surrogate(value):
        raise ValueError("must not contain unpaired surrogates")
    return value


def is_storable_text(value: str) -> bool:
    """Whether every backend stores ``value`` as it is: no NUL character, no unpaired surrogate."""
    return "\x00" not in value and (value.isascii() or not _has_surrogate(value))


def _has_surrogate(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# RFC 3339 as the records' JSON form writes it (what the journal replays); any other text goes to the slow path.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)?").fullmatch


# ------------------------------------------------------------------------------ the fields' validators
# The models build their fields from these; the generator below knows each one's fast form, and refuses a model
# whose fields use any other (so the fast path can never be laxer than the model).


def positive(value: Decimal) -> Decimal:
    """A decimal's rule: greater than zero (prices, sizes)."""
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def non_negative(value: Decimal) -> Decimal:
    """A decimal's rule: not negative (ratios, confidences)."""
    if value < 0:
        raise ValueError("must not be negative")
    return value


def upper(value: object) -> object:
    """A choice's normalisation: surrounding whitespace removed, upper case."""
    return value.strip().upper() if isinstance(value, str) else value


def lower(value: object) -> object:
    """A choice's normalisation: surrounding whitespace removed, lower case."""
    return value.strip().lower() if isinstance(value, str) else value


def no_surrounding_space(value: str) -> str:
    """A text's rule: no whitespace at either end (identifiers and symbols)."""
    if value != value.strip():
        raise ValueError("must not start or end with whitespace")
    return value


def clean(value: object) -> object:
    """Every text's rule: :func:`check_text` (before pydantic, whose own message says less)."""
    return check_text(value) if isinstance(value, str) else value


def now_if_missing(value: object) -> object:
    """A record-keeping timestamp's rule: ``None`` means now."""
    return datetime.now(UTC) if value is None else value


@dataclass(frozen=True, slots=True)
class Invariant:
    """A rule over several fields of a record: a Python expression of the field names, and the refusal's message.

    The model checks it after its fields (``holds``); the fast parser inlines the same expression.
    """

    expression: str
    message: str

    @property
    def names(self) -> frozenset[str]:
        """The field names the expression reads."""
        return frozenset(
            node.id for node in ast.walk(ast.parse(self.expression, mode="eval")) if isinstance(node, ast.Name)
        )

    def holds(self, values: Mapping[str, Any]) -> bool:
        """Whether the rule holds for these field values."""
        return bool(eval(_invariant_code(self.expression), {"__builtins__": {}}, dict(values)))  # noqa: S307

    def fast_form(self) -> str:
        """The expression over the fast parser's converted fields (``f_<name>``)."""
        tree = ast.parse(self.expression, mode="eval")
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                node.id = f"f_{node.id}"
        return ast.unparse(tree)


@cache
def _invariant_code(expression: str) -> CodeType:
    return compile(expression, f"<invariant {expression}>", "eval")


@dataclass(frozen=True, slots=True)
class FieldRule:
    """How one field is checked and converted on the fast path, as read from the model's field.

    ``kind`` is one of ``text``, ``decimal``, ``time``, ``choice``, ``integer`` and ``flag``. A ``required`` field
    must be present; else an absent field takes ``default``, or the value of ``default_factory``, or now (``stamp``).
    ``optional`` fields accept ``None``.
    """

    name: str
    kind: str
    required: bool = False
    optional: bool = False
    default: Any = None
    default_factory: Callable[[], Any] | None = None
    stamp: bool = False
    """Times: absent or ``None`` means now."""
    min_length: int = 0
    max_length: int | None = None
    strip: bool = False
    """Text: refuse surrounding whitespace (identifiers and symbols)."""
    sign: str = ""
    """Decimals: ``positive``, ``non_negative`` or ``""`` (any sign)."""
    minimum: int | None = None
    maximum: int | None = None
    """Integers: the bounds, inclusive."""
    choices: tuple[str, ...] = ()
    case: str = ""
    """Choices: ``upper`` or ``lower``, the case the value is normalised to before the lookup, or ``""``."""


_KINDS: Mapping[type, str] = {str: "text", Decimal: "decimal", datetime: "time", int: "integer", bool: "flag"}
_SIGNS: Mapping[Callable[..., Any], str] = {positive: "positive", non_negative: "non_negative"}
_CASES: Mapping[Callable[..., Any], str] = {upper: "upper", lower: "lower"}
_CONVERSIONS: Mapping[str, Callable[..., Any]] = {"decimal": to_exact_decimal, "time": to_stored_utc}
"""The one conversion each kind needs in the model, which the fast path does inline."""


def rules_of(model: type[BaseModel]) -> list[FieldRule]:
    """The fast-path rules of every field of ``model``, in field order, read from the fields' types and metadata.

    Raises ``TypeError`` for a field whose type or validator has no fast form here.
    """
    return [_rule_of(model, name, info) for name, info in model.model_fields.items()]


def _rule_of(model: type[BaseModel], name: str, info: FieldInfo) -> FieldRule:
    where = f"{model.__name__}.{name}"
    annotation: Any = info.annotation
    metadata: list[Any] = list(info.metadata)
    optional = False
    if get_origin(annotation) in (Union, UnionType):
        members = [member for member in get_args(annotation) if member is not type(None)]
        if len(members) != 1 or len(get_args(annotation)) != 2:
            raise TypeError(f"{where}: only X | None unions have a fast form")
        optional, annotation = True, members[0]
    if get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        for item in extra:
            metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
    choices: tuple[str, ...] = ()
    if get_origin(annotation) is Literal:
        choices, kind = tuple(get_args(annotation)), "choice"
        if not all(type(word) is str for word in choices):
            raise TypeError(f"{where}: only literal words have a fast form")
    elif annotation in _KINDS:
        kind = _KINDS[annotation]
    else:
        raise TypeError(f"{where}: {annotation!r} has no fast form")
    facts: dict[str, Any] = {}
    converted = kind not in _CONVERSIONS
    for item in metadata:
        function: Any = getattr(item, "func", None)
        if isinstance(item, MinLen) and kind == "text":
            facts["min_length"] = item.min_length
        elif isinstance(item, MaxLen) and kind == "text":
            facts["max_length"] = item.max_length
        elif isinstance(item, Ge) and kind == "integer" and type(item.ge) is int:
            facts["minimum"] = item.ge
        elif isinstance(item, Le) and kind == "integer" and type(item.le) is int:
            facts["maximum"] = item.le
        elif isinstance(item, BeforeValidator) and function is clean and kind == "text":
            pass  # the text code always refuses NUL and unpaired surrogates
        elif isinstance(item, BeforeValidator) and function is now_if_missing and kind == "time":
            facts["stamp"] = True
        elif isinstance(item, BeforeValidator) and function in _CASES and kind == "choice":
            facts["case"] = _CASES[function]
        elif isinstance(item, AfterValidator) and function is no_surrounding_space and kind == "text":
            facts["strip"] = True
        elif isinstance(item, AfterValidator) and function in _SIGNS and kind == "decimal":
            facts["sign"] = _SIGNS[function]
        elif function is not None and function is _CONVERSIONS.get(kind):
            converted = True
        else:
            raise TypeError(f"{where}: {item!r} has no fast form")
    if not converted:
        raise TypeError(f"{where}: a {kind} field must be converted by {_CONVERSIONS[kind].__name__}")
    required = info.is_required()
    if not required and info.default_factory is None and info.default is not None and kind != "flag":
        raise TypeError(f"{where}: only flags have a fast form of a default other than None")
    factory = None if facts.get("stamp") else info.default_factory
    default = None if info.default is PydanticUndefined else info.default
    return FieldRule(
        name, kind, required, optional, default, cast("Callable[[], Any] | None", factory), choices=choices, **facts
    )


FastParser = Callable[[dict[str, Any]], "dict[str, Any] | None"]
"""The generated function: the record's field values from a mapping, or ``None`` to take the slow path."""


def compile_model(model: type[BaseModel], now: Callable[[], datetime] | None = None) -> FastParser:
    """Generate the fast-path parser of one record model from its fields and its ``invariants``."""
    invariants: Sequence[Invariant] = getattr(model, "invariants", ())
    for invariant in invariants:
        unknown = invariant.names - set(model.model_fields)
        if unknown:
            raise TypeError(f"{model.__name__}: invariant {invariant.expression!r} reads unknown {sorted(unknown)}")
    return compile_parser(model.__name__, rules_of(model), [rule.fast_form() for rule in invariants], now)


def compile_parser(
    name: str, rules: Sequence[FieldRule], checks: Sequence[str] = (), now: Callable[[], datetime] | None = None
) -> FastParser:
    """Generate the fast-path parser of ``rules``.

    ``checks`` are Python expressions over the converted fields (``f_<name>``) that must hold, such as
    ``"f_exit_time is None or f_exit_time >= f_entry_time"``; when one does not, the slow path raises the error.
    """
    namespace: dict[str, Any] = {
        "_Decimal": Decimal,
        "_datetime": datetime,
        "_UTC": UTC,
        "_Q": DECIMAL_QUANTUM,
        "_Z": DECIMAL_ZERO,
        "_C": DECIMAL_CONTEXT,
        "_F": _FIT_CONTEXT,
        "_now": now or partial(datetime.now, UTC),  # called in C: no Python frame per stamp
        "_iso": _RFC3339,
        "_fromiso": datetime.fromisoformat,
        "_EDGE_YEARS": frozenset((1, 9999)),
        "_surrogate": _has_surrogate,
        "_MISSING": _MISSING,
        "_FIELDS": frozenset(rule.name for rule in rules),
    }
    lines = [
        "def parse(data):",
        "    if not data.keys() <= _FIELDS:",
        "        return None",
        "    get = data.get",
        "    try:",
    ]
    for index, rule in enumerate(rules):
        lines.append(f"        v = get({rule.name!r}, _MISSING)")
        lines.extend("        " + line for line in _field_code(rule, index, namespace))
    lines.append("    except Exception:")
    lines.append("        return None")
    for check in checks:
        lines.append(f"    if not ({check}):")
        lines.append("        return None")
    items = ", ".join(f"{rule.name!r}: f_{rule.name}" for rule in rules)
    lines.append(f"    return {{{items}}}")
    source = "\n".join(lines) + "\n"
    exec(compile(source, f"<fast parser {name}>", "exec"), namespace)  # noqa: S102
    parser: FastParser = namespace["parse"]
    return parser


class _Missing:
    __slots__ = ()


_MISSING = _Missing()


def _field_code(rule: FieldRule, index: int, namespace: dict[str, Any]) -> list[str]:
    target = f"f_{rule.name}"
    if rule.required:
        absent = ["if v is _MISSING:", "    return None"]
        return [*absent, *_value_code(target, rule, index, namespace)]
    if rule.stamp:
        value = "_now()"
    elif rule.default_factory is not None:
        namespace[f"_factory{index}"] = rule.default_factory
        value = f"_factory{index}()"
    elif rule.default is None or type(rule.default) is bool:
        value = repr(rule.default)
    else:  # pragma: no cover - rules_of refuses other defaults
        raise ValueError(f"{rule.name}: no fast form of the default {rule.default!r}")
    none_too = rule.stamp or (rule.optional and value == "None")
    absent = ["if v is _MISSING or v is None:" if none_too else "if v is _MISSING:", f"    {target} = {value}"]
    if rule.optional and not none_too:
        absent += ["elif v is None:", f"    {target} = None"]
    return [*absent, "else:", *_indent(_value_code(target, rule, index, namespace))]


def _value_code(target: str, rule: FieldRule, index: int, namespace: dict[str, Any]) -> list[str]:
    if rule.kind == "text":
        return _text_code(target, rule)
    if rule.kind == "decimal":
        return _decimal_code(target, rule)
    if rule.kind == "time":
        return _time_code(target)
    if rule.kind == "flag":
        return ["if type(v) is not bool:", "    return None", f"{target} = v"]
    if rule.kind == "integer":
        bounds = [
            *([f"v < {rule.minimum}"] if rule.minimum is not None else []),
            *([f"v > {rule.maximum}"] if rule.maximum is not None else []),
        ]
        return [f"if {' or '.join(['type(v) is not int', *bounds])}:", "    return None", f"{target} = v"]
    if rule.kind == "choice":
        table = f"_choices{index}"
        namespace[table] = {word: word for word in rule.choices}
        lookup = f"{table}.get(v)" + (f" or {table}.get(v.strip().{rule.case}())" if rule.case else "")
        return [
            "if type(v) is not str:",
            "    return None",
            f"{target} = {lookup}",
            f"if {target} is None:",
            "    return None",
        ]
    raise ValueError(f"unknown field kind {rule.kind!r}")  # pragma: no cover - rules_of makes only these kinds


def _text_code(target: str, rule: FieldRule) -> list[str]:
    length = f"{rule.min_length} <= len(v)" + (f" <= {rule.max_length}" if rule.max_length is not None else "")
    lines = [
        f"if type(v) is not str or not {length} or '\\x00' in v:",
        "    return None",
        "if not v.isascii() and _surrogate(v):",
        "    return None",
    ]
    if rule.strip:
        lines += ["if v.strip() != v:", "    return None"]
    return [*lines, f"{target} = v"]


def _decimal_code(target: str, rule: FieldRule) -> list[str]:
    # is_nan() first: ordering a NaN raises only under the host thread's context, whose traps are the host's.
    refused = {"positive": "q.is_nan() or q <= 0", "non_negative": "q.is_nan() or q < 0", "": "q.is_nan()"}[rule.sign]
    return [
        "t = type(v)",
        "if t is _Decimal:",
        "    x = v",
        "elif t is int:",
        "    x = _Decimal(v)",
        "elif t is float:",
        "    x = _Decimal(repr(v))",
        "elif t is str:",
        "    x = _Decimal(v.strip())",
        "else:",
        "    return None",
        # Quantizing never rounds an accepted value: it only gives every value the column's eight places. A value
        # with more places, too many digits or an infinity raises (see _FIT_CONTEXT); a quiet NaN comes through and
        # is refused here. All of them go to the slow path, which names the reason.
        "q = x.quantize(_Q, None, _F)",
        f"if {refused}:",
        "    return None",
        f"{target} = q if q else _Z",  # a zero without its sign, as every database stores it
    ]


def _time_code(target: str) -> list[str]:
    return [
        "if type(v) is _datetime:",
        "    x = v",
        "elif type(v) is str and _iso(v):",
        "    x = _fromiso(v)",
        "else:",
        "    return None",
        "tz = x.tzinfo",
        "if tz is None:",
        f"    {target} = x.replace(tzinfo=_UTC)",
        "elif tz is _UTC:",
        f"    {target} = x",
        "else:",
        f"    {target} = x.astimezone(_UTC)",
        f"if {target}.year in _EDGE_YEARS:",  # the calendar's ends: the slow path refuses the extreme instants
        "    return None",
    ]


def _indent(lines: list[str]) -> list[str]:
    return ["    " + line for line in lines]
