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

The decimal and timestamp primitives (:func:`to_exact_decimal`, :func:`to_utc`) live here too, so the models, the
column types and this module share one definition of "exact" and "UTC".
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow
from functools import partial
from typing import Any

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


@dataclass(frozen=True, slots=True)
class FieldRule:
    """How one field is checked and converted on the fast path.

    ``kind`` is one of ``text``, ``decimal``, ``time``, ``stamp`` (a time that defaults to now), ``choice``,
    ``count``, ``flag`` and ``uuid`` (text that defaults to a new UUID). ``required`` fields must be present;
    optional ones default to ``None`` (``flag`` to ``False``).
    """

    name: str
    kind: str
    required: bool = False
    min_length: int = 1
    max_length: int = 64
    strip: bool = False
    """Text: refuse surrounding whitespace (identifiers and symbols)."""
    sign: str = ""
    """Decimals: ``positive``, ``non_negative`` or ``""`` (any sign)."""
    choices: tuple[str, ...] = ()
    case: str = "upper"
    """Choices: the case the value is normalised to before the lookup."""


def text(
    name: str, *, required: bool = False, min_length: int = 1, max_length: int = 64, strip: bool = False
) -> FieldRule:
    """A text field."""
    return FieldRule(name, "text", required, min_length, max_length, strip)


def decimal(name: str, *, required: bool = False, sign: str = "") -> FieldRule:
    """An exact decimal field."""
    return FieldRule(name, "decimal", required, sign=sign)


def time(name: str, *, required: bool = False) -> FieldRule:
    """A timestamp field (naive means UTC)."""
    return FieldRule(name, "time", required)


def stamp(name: str) -> FieldRule:
    """A record-keeping timestamp: absent or ``None`` means now."""
    return FieldRule(name, "stamp")


def choice(name: str, choices: Sequence[str], *, required: bool = False, case: str = "upper") -> FieldRule:
    """One of a fixed set of words, after surrounding whitespace is removed and the case normalised."""
    return FieldRule(name, "choice", required, choices=tuple(choices), case=case)


def count(name: str) -> FieldRule:
    """A required non-negative integer."""
    return FieldRule(name, "count", True)


def flag(name: str, *, required: bool = False) -> FieldRule:
    """A boolean (``False`` when absent)."""
    return FieldRule(name, "flag", required)


def generated_id(name: str) -> FieldRule:
    """Text of at most 36 characters; a new UUID when absent."""
    return FieldRule(name, "uuid", max_length=36)


FastParser = Callable[[dict[str, Any]], "dict[str, Any] | None"]
"""The generated function: the record's field values from a mapping, or ``None`` to take the slow path."""


def compile_parser(
    name: str, rules: Sequence[FieldRule], checks: Sequence[str] = (), now: Callable[[], datetime] | None = None
) -> FastParser:
    """Generate the fast-path parser of one record type.

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
        "_uuid4": uuid.uuid4,
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
    absent = (
        ["if v is _MISSING:", "    return None"]
        if rule.required
        else ["if v is _MISSING or v is None:"]  # completed per kind below
    )
    if rule.kind == "stamp":
        return ["if v is _MISSING or v is None:", f"    {target} = _now()", "else:", *_indent(_time_code(target))]
    if rule.kind == "uuid":
        return [
            "if v is _MISSING:",
            f"    {target} = str(_uuid4())",
            "else:",
            *_indent(_text_code(target, rule)),
        ]
    if rule.kind == "flag":
        default = "return None" if rule.required else f"{target} = False"
        return [
            "if v is _MISSING:",
            f"    {default}",
            "elif type(v) is bool:",
            f"    {target} = v",
            "else:",
            "    return None",
        ]
    if rule.kind == "count":
        return [
            "if type(v) is not int or not 0 <= v <= 4611686018427387904:",
            "    return None",
            f"{target} = v",
        ]
    if rule.kind == "text":
        body = _text_code(target, rule)
    elif rule.kind == "decimal":
        body = _decimal_code(target, rule)
    elif rule.kind == "time":
        body = _time_code(target)
    elif rule.kind == "choice":
        table = f"_choices{index}"
        namespace[table] = {word: word for word in rule.choices}
        normalise = "upper" if rule.case == "upper" else "lower"
        body = [
            "if type(v) is not str:",
            "    return None",
            f"{target} = {table}.get(v) or {table}.get(v.strip().{normalise}())",
            f"if {target} is None:",
            "    return None",
        ]
    else:  # pragma: no cover - the rules above are the only kinds
        raise ValueError(f"unknown field kind {rule.kind!r}")
    if rule.required:
        return [*absent, *body]
    return [*absent, f"    {target} = None", "else:", *_indent(body)]


def _text_code(target: str, rule: FieldRule) -> list[str]:
    lines = [
        f"if type(v) is not str or not {rule.min_length} <= len(v) <= {rule.max_length} or '\\x00' in v:",
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
