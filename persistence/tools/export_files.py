"""The files an export writes: Parquet, CSV and JSON lines over a hidden temporary file, published by one rename.

:class:`ExportFile` wraps pyarrow's own writers (Parquet, in row groups of :data:`PARQUET_ROW_GROUP_ROWS` rows; CSV)
or writes JSON lines, always into a temporary file beside the destination; :func:`publish` renames it over the
destination once complete, so the destination is whole or absent. In CSV and JSONL, decimals become plain strings
(``-0.00000001``, never ``-1E-8``) and timestamps ISO 8601 in UTC, computed in bulk by pyarrow. Also here: the guard
that reports a missing pyarrow by the extra to install. Everything here is blocking: callers run it in a thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import IO, Any, Literal

from persistence.db.backups import write_failure_cause
from persistence.errors import AnalysisExtraMissingError, ExportError, InvalidQueryError
from persistence.records.models import DECIMAL_PRECISION, DECIMAL_SCALE

ExportFormat = Literal["parquet", "csv", "jsonl"]
FORMATS: tuple[ExportFormat, ...] = ("parquet", "csv", "jsonl")
PARQUET_ROW_GROUP_ROWS = 65_536
"""Rows per Parquet row group: batches are gathered (as compact Arrow data) so readers get few, large groups."""


def require_pyarrow() -> Any:
    """The ``pyarrow`` module with the submodules used here loaded (``compute``, ``csv``, ``parquet``), or
    :class:`AnalysisExtraMissingError` naming the extra to install."""
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.csv
        import pyarrow.parquet
    except ImportError as exc:
        raise AnalysisExtraMissingError() from exc
    return pyarrow


def resolve_format(path: Path, format: str | None) -> ExportFormat:
    """The format asked for, or the one the file name says (``.parquet``, ``.csv``, ``.jsonl``/``.ndjson``)."""
    chosen = format or {
        ".parquet": "parquet",
        ".pq": "parquet",
        ".csv": "csv",
        ".jsonl": "jsonl",
        ".ndjson": "jsonl",
    }.get(path.suffix.lower(), "parquet")
    for known in FORMATS:
        if chosen == known:
            return known
    raise InvalidQueryError("format", f"must be one of {', '.join(FORMATS)}")


class ExportFile:
    """One output file being written: a pyarrow writer (or JSON lines) over a temporary file."""

    def __init__(self, fmt: ExportFormat, path: Path, schema: Any) -> None:
        pa = require_pyarrow()
        self._pa = pa
        self._format = fmt
        self.path = path
        self._file: IO[bytes] = open(path, "xb")  # noqa: SIM115 - closed by close()/abort()
        self._writer: Any = None
        self._pending: list[Any] = []
        self._pending_rows = 0
        self._text_columns = [(index, field.type) for index, field in enumerate(schema) if _needs_text(pa, field.type)]
        if fmt == "parquet":
            self._writer = pa.parquet.ParquetWriter(self._file, schema, compression="zstd")
        elif fmt == "csv":
            self._writer = pa.csv.CSVWriter(self._file, self._text_schema(schema))

    def _text_schema(self, schema: Any) -> Any:
        for index, _ in self._text_columns:
            schema = schema.set(index, schema.field(index).with_type(self._pa.string()))
        return schema

    def _as_text(self, batch: Any) -> Any:
        for index, arrow_type in self._text_columns:
            column = batch.column(index)
            text = (
                _decimal_text(self._pa, column)
                if self._pa.types.is_decimal(arrow_type)
                else _iso_text(self._pa, column)
            )
            batch = batch.set_column(index, batch.schema.field(index).with_type(self._pa.string()), text)
        return batch

    def write(self, batch: Any) -> None:
        if self._format == "parquet":
            self._pending.append(batch)
            self._pending_rows += batch.num_rows
            if self._pending_rows >= PARQUET_ROW_GROUP_ROWS:
                self._flush_row_group()
        elif self._format == "csv":
            self._writer.write_batch(self._as_text(batch))
        else:
            lines = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in self._as_text(batch).to_pylist())
            self._file.write(lines.encode())

    def _flush_row_group(self) -> None:
        if self._pending:
            self._writer.write_table(self._pa.Table.from_batches(self._pending), row_group_size=self._pending_rows)
        self._pending, self._pending_rows = [], 0

    def finish(self) -> int:
        """Close the writer, flush the file to disk; returns its size."""
        if self._format == "parquet":
            self._flush_row_group()
        if self._writer is not None:
            self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        return size

    def abort(self) -> None:
        """Close what is open (a full disk may refuse the last flush) and remove the temporary file."""
        with contextlib.suppress(Exception):
            if self._writer is not None:
                self._writer.close()
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _needs_text(pa: Any, arrow_type: Any) -> bool:
    return bool(pa.types.is_decimal(arrow_type) or pa.types.is_timestamp(arrow_type))


def _decimal_text(pa: Any, column: Any) -> Any:
    """``decimal128(18, 8)`` as plain decimal strings (``-0.00000001``, never ``-1E-8``), computed in bulk."""
    pc = pa.compute
    unscaled = column.view(pa.decimal128(DECIMAL_PRECISION + 1, 0)).cast(pa.int64())
    magnitude = pc.abs(unscaled)
    scale = 10**DECIMAL_SCALE
    whole = pc.divide(magnitude, scale)
    fraction = pc.subtract(magnitude, pc.multiply(whole, scale))
    sign = pc.if_else(pc.less(unscaled, 0), "-", "")
    digits = pc.utf8_lpad(fraction.cast(pa.string()), width=DECIMAL_SCALE, padding="0")
    return pc.binary_join_element_wise(sign, whole.cast(pa.string()), ".", digits, "")


def _iso_text(pa: Any, column: Any) -> Any:
    return pa.compute.strftime(column, format="%Y-%m-%dT%H:%M:%SZ")


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")


def remove_stale_partials(path: Path) -> list[Path]:
    """Delete the temporary files that killed exports to ``path`` left behind (their process is gone)."""
    removed: list[Path] = []
    for partial in path.parent.glob(f".{path.name}.*.partial"):
        try:
            pid = int(partial.name[len(path.name) + 2 :].split(".", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
                removed.append(partial)
        except (ValueError, PermissionError):
            continue  # not ours, or another user's live process
    return removed


def publish(partial: Path, destination: Path) -> None:
    """Rename the finished ``partial`` over ``destination`` (atomic) and make the rename durable."""
    os.replace(partial, destination)
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened for fsync
        descriptor = os.open(destination.parent, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_failure(destination: Path, error: OSError) -> ExportError:
    """One line naming the file asked for and why it cannot be written (never the hidden temporary file)."""
    cause = write_failure_cause(destination, error)
    return ExportError(f"cannot write {destination}: {cause}; nothing was written", path=destination)
