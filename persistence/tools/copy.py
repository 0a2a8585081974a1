"""Copy every table from one database to another (SQLite ↔ PostgreSQL, either way), then prove the copy equal.

The target is migrated first (the schema guard applies: a target from a newer release is refused), and the source
must be at this release's head revision, so both have exactly :data:`persistence.db.schema.TABLES`. Each table is read
in ``id`` order through a streaming cursor and written in chunks, one transaction per chunk, with "insert unless
present": a run killed half way leaves whole chunks behind, and running the copy again fills in the rest and adds
nothing that is already there (idempotent and resumable). Values go through the column types on both sides, so
decimals and timestamps cross backends exactly.

The ``id`` column is kept, not regenerated: ``dead_letters`` has no natural key, so its ``id`` is the only thing that
makes a second run recognise a row it already copied; keeping ids everywhere also keeps the order rows were recorded in
(exports of trades and signals follow it). On PostgreSQL each ``id`` sequence is then moved past the largest id, so
rows the sidecar writes later get fresh ones.

The copy ends by comparing, table by table, the row counts and a checksum over the natural key and every value (an
order-independent sum of per-row SHA-256 digests; the surrogate ``id`` is left out where a natural key exists).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Integer, Table, func, select, text
from sqlalchemy.dialects import postgresql, sqlite

from persistence.db.engine import Database
from persistence.db.schema import TABLES
from persistence.errors import CopyMismatchError, MigrationError
from persistence.migrations import current_revision, head_revision, upgrade

DEFAULT_CHUNK_ROWS = 2_000
NATURAL_KEYS: Mapping[str, str] = {"trades": "trade_id", "signals": "signal_id"}
"""Tables whose rows are identified by a natural key; the others by ``id``."""
_CHECKSUM_MODULUS = 1 << 256
CopyProgress = Callable[[str, int, int], None]
"""Called with (table, rows read so far, rows in the source table)."""


@dataclass(slots=True)
class TableCopy:
    """One table's copy: rows in the source, rows added to the target, and the comparison at the end."""

    table: str
    source_rows: int = 0
    added: int = 0
    target_rows: int = 0
    source_checksum: str = ""
    target_checksum: str = ""

    @property
    def matches(self) -> bool:
        """Whether the target holds exactly the source's rows."""
        return self.source_rows == self.target_rows and self.source_checksum == self.target_checksum


@dataclass(slots=True)
class CopyReport:
    """Every table's :class:`TableCopy`."""

    tables: list[TableCopy] = field(default_factory=list)

    @property
    def mismatched(self) -> list[str]:
        """Tables whose target differs from the source."""
        return [entry.table for entry in self.tables if not entry.matches]

    def lines(self) -> list[str]:
        """One line per table, for people."""
        return [
            f"{entry.table}: {entry.source_rows:,} rows, {entry.added:,} added, "
            + ("counts and checksums match" if entry.matches else _difference(entry))
            for entry in self.tables
        ]


def _difference(entry: TableCopy) -> str:
    if entry.source_rows != entry.target_rows:
        return f"DIFFERS: {entry.source_rows:,} rows in the source, {entry.target_rows:,} in the target"
    return "DIFFERS: same row count, different checksum (a row's key or values differ)"


def _insert_unless_present(database: Database, table: Table) -> Any:
    if database.dialect_name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if database.dialect_name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    raise NotImplementedError(f"copy does not support {database.dialect_name}")


async def _count(database: Database, table: Table) -> int:
    async with database.read() as connection:
        return int((await connection.execute(select(func.count()).select_from(table))).scalar_one())


async def copy_database(
    source: Database,
    target: Database,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: CopyProgress | None = None,
    lock_wait_seconds: float = 60.0,
) -> CopyReport:
    """Copy every table from ``source`` to ``target`` and compare them; returns the report.

    Raises :class:`CopyMismatchError` (carrying the report) when a table differs after the copy.
    """
    head = head_revision()
    revision = await current_revision(source)
    if revision != head:
        raise MigrationError(
            f"the source is at schema revision {revision!r}, this release writes {head!r}: run"
            " `persistence-sidecar migrate` on the source with this release first",
            revision=revision,
        )
    await upgrade(target, lock_wait_seconds=lock_wait_seconds)
    report = CopyReport()
    for table in TABLES:
        entry = TableCopy(table.name)
        entry.source_rows = await _count(source, table)
        before = await _count(target, table)
        await _copy_table(source, target, table, chunk_rows, entry.source_rows, progress)
        if target.dialect_name == "postgresql" and isinstance(table.c.id.type, Integer):
            await _advance_sequence(target, table)
        entry.target_rows = await _count(target, table)
        entry.added = entry.target_rows - before
        report.tables.append(entry)
    for entry in report.tables:
        table = next(t for t in TABLES if t.name == entry.table)
        entry.source_checksum = await table_checksum(source, table, chunk_rows)
        entry.target_checksum = await table_checksum(target, table, chunk_rows)
    if report.mismatched:
        raise CopyMismatchError(report)
    return report


async def _copy_table(
    source: Database, target: Database, table: Table, chunk_rows: int, total: int, progress: CopyProgress | None
) -> None:
    statement = _insert_unless_present(target, table)
    names = [column.name for column in table.c]
    done = 0
    if progress is not None:
        progress(table.name, done, total)
    async with source.read() as reading:
        result = await reading.stream(select(table).order_by(table.c.id).execution_options(yield_per=chunk_rows))
        async for rows in result.partitions(chunk_rows):
            chunk = [dict(zip(names, row, strict=True)) for row in rows]
            async with target.write() as writing:
                await writing.execute(statement, chunk)
            done += len(chunk)
            if progress is not None:
                progress(table.name, done, total)


async def _advance_sequence(database: Database, table: Table) -> None:
    largest = f'SELECT COALESCE(MAX(id), 0) + 1 FROM "{table.name}"'  # noqa: S608 - a name from the schema
    async with database.write() as connection:
        await connection.execute(
            text(f"SELECT setval(pg_get_serial_sequence(:table, 'id'), ({largest}), false)"), {"table": table.name}
        )


def _canonical(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, int):
        return value
    return str(value)


def checksum_columns(table: Table) -> list[str]:
    """The columns a table's checksum covers: every one but a surrogate ``id`` beside a natural key."""
    natural = NATURAL_KEYS.get(table.name)
    return [column.name for column in table.c if not (natural and column.name == "id")]


def row_digest(values: Sequence[Any]) -> int:
    """One row's SHA-256 over its canonical JSON, as an integer."""
    payload = json.dumps([_canonical(value) for value in values], separators=(",", ":"), ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(payload.encode()).digest(), "big")


async def table_checksum(database: Database, table: Table, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> str:
    """An order-independent checksum of a table's natural keys and values, the same on SQLite and PostgreSQL."""
    columns = [table.c[name] for name in checksum_columns(table)]
    total = 0
    async with database.read() as connection:
        result = await connection.stream(select(*columns).execution_options(yield_per=chunk_rows))
        async for rows in result.partitions(chunk_rows):
            for row in rows:
                total = (total + row_digest(row)) % _CHECKSUM_MODULUS
    return f"{total:064x}"
