"""Batches encoded straight to driver values, and rows decoded straight to records.

SQLAlchemy's per-value bind and result processing dominates the cost of a large ``executemany`` and of reading
thousands of rows (the history at start-up, a page of 1000). On SQLite the encoding and decoding here are exactly
those of the column types (:class:`~persistence.db.columns.ExactNumeric` is a scaled integer,
:class:`~persistence.db.columns.UTCDateTime` an ISO string in UTC, with their codecs in :mod:`persistence.db.columns`),
done in one pass per row; tests compare the stored bytes and the records read back with the column types' own. On
PostgreSQL the driver's values are already the records' (asyncpg gives ``Decimal`` and aware datetimes), so
:class:`RowReader` only builds the records; it is the one row decoder of every repository.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Generic

from sqlalchemy import Boolean, Integer, String, Table, type_coerce

from persistence.db.columns import (
    ExactNumeric,
    UTCDateTime,
    decimal_cache,
    decode_datetime,
    decode_decimal,
    to_scaled_int,
    to_sqlite_datetime_kept,
)
from persistence.records.models import RecordT
from persistence.records.parser import DECIMAL_CONTEXT, DECIMAL_PRECISION, DECIMAL_SCALE


class DriverBatch:
    """One batch statement compiled once for SQLite, executed with rows already encoded to driver values.

    The per-row encoder is generated once per statement, like :class:`RowReader`'s decoder: one tuple display in
    the statement's parameter order, each value encoded in place.
    """

    def __init__(self, statement: Any, table: Table, dialect: Any) -> None:
        # Surrogate integer ids are left to the database; generated string ids are part of the record.
        generated = isinstance(table.c.id.type, String)
        names = [column.name for column in table.c if generated or column.name != "id"]
        compiled = statement.compile(dialect=dialect, column_keys=names)
        self.sql = str(compiled)
        types = {column.name: column.type for column in table.c}
        namespace: dict[str, Any] = {}
        items: list[str] = []
        namespace.update(_D=Decimal, _C=DECIMAL_CONTEXT, _L=10**DECIMAL_PRECISION)
        for index, name in enumerate(compiled.positiontup or []):
            encoder = _sqlite_encoder(types[name])
            if encoder is None:
                items.append(f"row[{name!r}]")
            elif encoder is to_scaled_int:
                # A validated record's decimal has the column's eight places: scaling it is exact, checked by the
                # comparison; anything else (a record built without validation) takes to_scaled_int's full path.
                namespace[f"_e{index}"] = encoder
                items.append(
                    f"None if (v{index} := row[{name!r}]) is None else (i{index} if type(v{index}) is _D and "
                    f"(i{index} := int(s{index} := v{index}.scaleb({DECIMAL_SCALE}, _C))) == s{index} and "
                    f"-_L < i{index} < _L else _e{index}(v{index}))"
                )
            else:
                namespace[f"_e{index}"] = encoder
                items.append(f"None if (v{index} := row[{name!r}]) is None else _e{index}(v{index})")
        source = "def encode(row):\n    return (" + ", ".join(items) + ",)\n"
        exec(compile(source, f"<DriverBatch {table.name}>", "exec"), namespace)  # noqa: S102
        self._encode_row: Callable[[Mapping[str, Any]], tuple[Any, ...]] = namespace["encode"]

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """Driver parameter tuples, in the statement's order, for ``rows`` (column → value mappings)."""
        return list(map(self._encode_row, rows))


class RowReader(Generic[RecordT]):
    """Selects a table's columns and turns each row into a record: the one row decoder of the repositories.

    On SQLite the columns are selected as stored (scaled integers, ISO strings) and decoded here; elsewhere the
    column types' own processing applies and the values are taken as they come. The per-row function is generated
    once per table, the way :mod:`dataclasses` builds ``__init__``: one dict display with each column decoded in
    place, with no loop and no per-value call for columns that need no decoding.
    """

    def __init__(self, columns: Sequence[Any], record_type: type[RecordT], *, sqlite: bool) -> None:
        self.columns = [_raw(column) for column in columns] if sqlite else list(columns)
        names = [column.name for column in columns]
        if set(names) != set(record_type.model_fields):
            raise TypeError(f"{record_type.__name__} fields and the selected columns differ")
        namespace: dict[str, Any] = {"_build": record_type._build, "_decimals": decimal_cache()}
        items: list[str] = []
        for index, column in enumerate(columns):
            decoder = _sqlite_decoder(column.type) if sqlite else None
            if decoder is None:
                items.append(f"{column.name!r}: row[{index}]")
            elif decoder is decode_decimal:
                # The shared cache first, in place: most stored decimals (sizes, stops, ratios) repeat.
                namespace[f"_d{index}"] = decoder
                items.append(
                    f"{column.name!r}: None if (v{index} := row[{index}]) is None else "
                    f"(_decimals.get(v{index}) or _d{index}(v{index}))"
                )
            else:
                namespace[f"_d{index}"] = decoder
                items.append(f"{column.name!r}: None if (v{index} := row[{index}]) is None else _d{index}(v{index})")
        # Every field comes from a column: one fields set shared by the reader's records (frozen, so never changed).
        namespace["_names"] = set(names)
        source = f"def decode(row):\n    return _build({{{', '.join(items)}}}, _names)\n"
        exec(compile(source, f"<RowReader {record_type.__name__}>", "exec"), namespace)  # noqa: S102
        self.decode: Callable[[Sequence[Any]], RecordT] = namespace["decode"]

    def records(self, rows: Sequence[Sequence[Any]]) -> list[RecordT]:
        """The records of ``rows``, in order."""
        return list(map(self.decode, rows))


def _raw(column: Any) -> Any:
    if isinstance(column.type, ExactNumeric | Boolean):
        return type_coerce(column, Integer).label(column.name)
    if isinstance(column.type, UTCDateTime):
        return type_coerce(column, String).label(column.name)
    return column


def _sqlite_decoder(column_type: Any) -> Callable[[Any], Any] | None:
    """The decoder of non-NULL stored values, or ``None`` when the stored value is already the right one."""
    if isinstance(column_type, ExactNumeric):
        return decode_decimal
    if isinstance(column_type, UTCDateTime):
        return decode_datetime
    if isinstance(column_type, Boolean):
        return bool
    return None


def _sqlite_encoder(column_type: Any) -> Callable[[Any], Any] | None:
    """The encoder of non-NULL values, or ``None`` when the driver takes the value as it is."""
    if isinstance(column_type, ExactNumeric):
        return to_scaled_int
    if isinstance(column_type, UTCDateTime):
        return to_sqlite_datetime_kept  # kept for the audit payload of the same version (chain._utc_text)
    if isinstance(column_type, Boolean):
        return int
    return None
