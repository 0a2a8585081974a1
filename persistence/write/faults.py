"""Sorting write errors into the two kinds the writer treats differently.

*Transient* errors are the database's state, not the records': locked or busy, I/O errors, a full disk, a lost
connection, a timeout, a missing schema. They are retried and then count as one breaker failure, and the records
stay queued. *Data* errors are caused by a record: a constraint violation, a value out of range, a string too
long, a trigger that refuses a row, a character the database's encoding (or the driver's) cannot hold. The
writer splits the batch until the bad records are isolated and dead-letters them; these never touch the breaker.
Anything unrecognised is treated as transient, because keeping a record and retrying is always safe while
dead-lettering a good one is not.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy import exc as sa_exc

from persistence.errors import DatabaseUnavailableError, QueryTimeoutError

FaultKind = Literal["transient", "data"]

_SQLITE_DATA_MESSAGES = ("constraint failed", "too big", "datatype mismatch", "out of range")
_PG_DATA_SQLSTATE_CLASSES = ("22", "23")  # data exception, integrity constraint violation
_PG_DATA_SQLSTATES = frozenset({"P0001"})  # raise_exception from a trigger or function


def classify(error: BaseException) -> FaultKind:
    """Whether ``error`` is the database's state (``transient``) or the data's fault (``data``)."""
    if isinstance(error, QueryTimeoutError | DatabaseUnavailableError | OSError | TimeoutError):
        return "transient"
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return "transient"
        sqlstate = _sqlstate(error)
        if sqlstate is not None:
            if sqlstate[:2] in _PG_DATA_SQLSTATE_CLASSES or sqlstate in _PG_DATA_SQLSTATES:
                return "data"
            return "transient"
        if isinstance(error, sa_exc.IntegrityError | sa_exc.DataError):
            return "data"
        message = str(error.orig).lower()
        if any(fragment in message for fragment in _SQLITE_DATA_MESSAGES):
            return "data"
        return "transient"
    if isinstance(error, sa_exc.StatementError) and isinstance(error.orig, ValueError | TypeError | OverflowError):
        return "data"  # a bind processor refused a value
    if _encoding_refused(error):
        return "data"  # a character the driver cannot encode (an unpaired surrogate), whatever wraps it
    return "transient"


def _encoding_refused(error: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, UnicodeError):
            return True
        seen.add(id(current))
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return False


def needs_schema(error: BaseException) -> bool:
    """Whether the error says the schema is missing (a new or replaced database file)."""
    return "no such table" in str(error).lower() or "does not exist" in str(getattr(error, "orig", "")).lower()


def _sqlstate(error: sa_exc.DBAPIError) -> str | None:
    original = error.orig
    for candidate in (original, getattr(original, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str) and len(code) == 5:
            return code
    return None
