"""Copy every table from one database to another (SQLite ↔ PostgreSQL, either way), then prove the copy equal.

Before writing anything the copy makes sure it may: source and target are compared by what they are, not how their
URLs are spelled (:func:`database_identity`: SQLite's resolved file, symlinks included; PostgreSQL's system identifier
and database), so a copy onto itself is refused; the source must be at this release's head revision (a newer one
advises a newer release); and the target must be empty, an earlier copy of this same source, or the database this
source was itself copied from (the way back after a move), and then not written to on its own since: each of its
audit chains must end at an entry the source holds with the same hash. The target records the source in
``copy_sources`` before the first row is written. Anything else is refused naming what the target holds.

Rows are matched by what identifies them in any database, never by surrogate ids, which are each database's own:
trades by ``trade_id``, signals by ``signal_id``, snapshots and parameter changes by their UUID ``id``, audit entries by
``(instance_id, seq)``, dead letters by their whole content. The integer ids are not copied; rows are inserted in the
source's ``id`` order, so the target numbers them in the order they were recorded. A row missing at the target is
inserted; a row that differs is amended when the table's rule says the source's version replaces the target's (the
writer's rule: a trade's newer ``updated_at`` wins, an executed signal is never reset; other tables keep the first
version). The audit entries of the amendments come along with the rest of ``audit_log``, so a later run brings a
target up to date: copy while the bot runs, stop it, copy once more, and both trails verify.

Each table is read in ``id`` order through a streaming cursor and written in chunks, one transaction per chunk: a run
killed half way leaves whole chunks behind, and running it again finishes the rest (idempotent and resumable). The
copy ends by comparing, table by table, the row counts and a checksum over the natural key and every value (an
order-independent sum of per-row SHA-256 digests; integer surrogate ids left out).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Integer, Table, bindparam, func, inspect, select, table, text, update
from sqlalchemy.dialects import postgresql, sqlite

from persistence.db.engine import Database, sqlite_path
from persistence.db.schema import TABLE_OF, TABLES, audit_log, copy_sources
from persistence.errors import CopyMismatchError, CopyRefusedError, MigrationError
from persistence.migrations import alembic_config, current_revision, head_revision, upgrade
from persistence.migrations.guard import is_known
from persistence.records.models import utc_now
from persistence.records.registry import RECORD_KINDS

DEFAULT_CHUNK_ROWS = 2_000
NATURAL_KEYS: Mapping[str, tuple[str, ...]] = {
    **{TABLE_OF[kind.entity].name: kind.natural_key for kind in RECORD_KINDS},
    audit_log.name: ("instance_id", "seq"),
}
"""What identifies a row in any database; ``dead_letters`` has no key: its whole content identifies a row."""
Amends = Callable[[Mapping[str, Any], Mapping[str, Any]], bool]
"""``amends(source_row, target_row)``: whether the source's version replaces the target's (the writer's rule)."""
_CHECKSUM_MODULUS = 1 << 256
_NOT_COPIED = ("alembic_version", copy_sources.name)
CopyProgress = Callable[[str, int, int], None]
"""Called with (table, rows read so far, rows in the source table)."""


@dataclass(slots=True)
class TableCopy:
    """One table's copy: rows in the source, rows added to and amended at the target, and the comparison."""

    table: str
    source_rows: int = 0
    added: int = 0
    amended: int = 0
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
            + (f"{entry.amended:,} amended, " if entry.amended else "")
            + ("counts and checksums match" if entry.matches else _difference(entry))
            for entry in self.tables
        ]


def _difference(entry: TableCopy) -> str:
    if entry.source_rows != entry.target_rows:
        return f"DIFFERS: {entry.source_rows:,} rows in the source, {entry.target_rows:,} in the target"
    return "DIFFERS: same row count, different checksum (a row's key or values differ)"


async def database_identity(database: Database) -> str:
    """What a database is, whatever its URL's spelling: SQLite's resolved file (symlinks followed), or PostgreSQL's
    system identifier and database name."""
    if database.is_sqlite:
        path = sqlite_path(database.settings.url)
        if path is None:
            return f"sqlite:memory:{id(database)}"
        return f"sqlite:{await asyncio.to_thread(lambda: Path(path).resolve())}"
    async with database.read() as connection:
        row = (
            await connection.execute(text("SELECT system_identifier, current_database() FROM pg_control_system()"))
        ).one()
    return f"postgresql:{row[0]}/{row[1]}"


async def _count(database: Database, of: Table) -> int:
    async with database.read() as connection:
        return int((await connection.execute(select(func.count()).select_from(of))).scalar_one())


async def _check_source(source: Database) -> None:
    path = sqlite_path(source.settings.url) if source.is_sqlite else None
    if path is not None and not await asyncio.to_thread(path.exists):
        raise CopyRefusedError(f"the source database {path} does not exist")
    head = head_revision()
    revision = await current_revision(source)
    if revision == head:
        return
    if revision is not None and not is_known(ScriptDirectory.from_config(alembic_config()), revision):
        raise MigrationError(
            f"the source is at schema revision {revision!r}, newer than this release knows (its newest is {head!r}):"
            " copy it with a newer release of persistence-sidecar",
            revision=revision,
        )
    raise MigrationError(
        f"the source is at schema revision {revision!r}, this release writes {head!r}: run"
        " `persistence-sidecar migrate` on the source with this release first",
        revision=revision,
    )


def _holdings(sync_connection: Connection) -> tuple[dict[str, int], list[str]]:
    """The target's tables holding rows (with their counts), and the sources it records having been copied from."""
    names = set(inspect(sync_connection).get_table_names())
    ordered = [t.name for t in TABLES if t.name in names] + sorted(names - {t.name for t in TABLES})
    counts: dict[str, int] = {}
    for name in ordered:
        if name in _NOT_COPIED:
            continue
        rows = int(sync_connection.execute(select(func.count()).select_from(table(name))).scalar_one())
        if rows:
            counts[name] = rows
    sources = []
    if copy_sources.name in names:
        sources = list(sync_connection.execute(select(copy_sources.c.source)).scalars())
    return counts, sources


async def _copied_from(database: Database) -> list[str]:
    async with database.read() as connection:
        return list((await connection.execute(select(copy_sources.c.source))).scalars())


async def _check_target(source: Database, target: Database, source_identity: str, target_identity: str) -> None:
    """Refuse a target that holds data unless it is an earlier copy of this source, or the database this source was
    copied from (the way back after a move); reads only."""
    path = sqlite_path(target.settings.url) if target.is_sqlite else None
    if path is not None and not await asyncio.to_thread(path.exists):
        return
    async with target.read() as connection:
        counts, sources = await connection.run_sync(_holdings)
    if not counts:
        return
    if source_identity in sources or target_identity in await _copied_from(source):
        if audit_log.name in counts:
            await _check_not_diverged(source, target)
        return
    found = ", ".join(f"{name} ({rows:,} row{'' if rows == 1 else 's'})" for name, rows in counts.items())
    origin = f"copied from {', '.join(sources)}" if sources else "not a copy of this source"
    raise CopyRefusedError(
        f"the target already holds data, {origin}: {found}; nothing was written (copy into an empty database)"
    )


async def _chain_heads(database: Database) -> dict[str, tuple[int, str]]:
    """Each instance's chain head in ``database``: ``{instance_id: (seq, hash)}``."""
    newest = select(audit_log.c.instance_id, func.max(audit_log.c.seq).label("seq")).group_by(audit_log.c.instance_id)
    heads = newest.subquery()
    statement = select(audit_log.c.instance_id, audit_log.c.seq, audit_log.c.hash).join(
        heads, (audit_log.c.instance_id == heads.c.instance_id) & (audit_log.c.seq == heads.c.seq)
    )
    async with database.read() as connection:
        return {instance: (int(seq), str(digest)) for instance, seq, digest in await connection.execute(statement)}


async def _check_not_diverged(source: Database, target: Database) -> None:
    """Refuse a target (an earlier copy of the source, or its origin) that was written to on its own since: each of its
    chains must end at an entry the source holds with the same hash. Otherwise both sides wrote after the last copy,
    and copying would interleave two histories in the target's trail for good; reads only."""
    target_heads = await _chain_heads(target)
    if not target_heads:
        return
    statement = select(audit_log.c.hash).where(
        audit_log.c.instance_id == bindparam("instance"), audit_log.c.seq == bindparam("seq")
    )
    async with source.read() as connection:
        for instance, (seq, digest) in sorted(target_heads.items()):
            found = (await connection.execute(statement, {"instance": instance, "seq": seq})).scalar()
            if found != digest:
                what = "has no such entry" if found is None else f"holds another one ({str(found)[:16]}…)"
                raise CopyRefusedError(
                    f"the target was written to since it was copied: its audit chain of instance {instance!r} ends "
                    f"at seq {seq} ({digest[:16]}…), and the source {what}; both sides hold their own history, and "
                    "copying would interleave them in the target's trail; nothing was written"
                )


async def copy_database(
    source: Database,
    target: Database,
    *,
    rules: Mapping[str, Amends],
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: CopyProgress | None = None,
    lock_wait_seconds: float = 60.0,
) -> CopyReport:
    """Copy every table from ``source`` to ``target`` and compare them; returns the report.

    ``rules`` maps each table whose rows are amended to the writer's rule (``tables.repositories.AMENDMENT_RULES``).
    Raises :class:`CopyRefusedError` or :class:`MigrationError` before writing anything when the copy may not be made,
    and :class:`CopyMismatchError` (carrying the report) when a table differs after the copy.
    """
    source_identity = await database_identity(source)
    target_identity = await database_identity(target)
    if source_identity == target_identity:
        raise CopyRefusedError(f"the source and the target are the same database ({source_identity})")
    await _check_source(source)
    await _check_target(source, target, source_identity, target_identity)
    await upgrade(target, lock_wait_seconds=lock_wait_seconds)
    async with target.write() as connection:
        await connection.execute(
            _insert(target, copy_sources).on_conflict_do_nothing(),
            {"source": source_identity, "first_copied_at": utc_now()},
        )
    report = CopyReport()
    for of in TABLES:
        entry = TableCopy(of.name)
        entry.source_rows = await _count(source, of)
        await _copy_table(source, target, of, rules.get(of.name), entry, chunk_rows, progress)
        entry.target_rows = await _count(target, of)
        report.tables.append(entry)
    for entry in report.tables:
        of = next(t for t in TABLES if t.name == entry.table)
        entry.source_checksum = await table_checksum(source, of, chunk_rows)
        entry.target_checksum = await table_checksum(target, of, chunk_rows)
    if report.mismatched:
        raise CopyMismatchError(report)
    return report


def _insert(database: Database, of: Table) -> Any:
    if database.dialect_name == "postgresql":
        return postgresql.insert(of)
    if database.dialect_name == "sqlite":
        return sqlite.insert(of)
    raise NotImplementedError(f"copy does not support {database.dialect_name}")


def _surrogate(of: Table) -> bool:
    """Whether the table's ``id`` is an integer each database numbers itself (not a natural UUID)."""
    return isinstance(of.c.id.type, Integer)


class _Matcher:
    """Finds, inside the target's write transaction, the target's rows of one chunk of source rows."""

    def __init__(self, of: Table) -> None:
        self.columns = [column.name for column in of.c if not (column.name == "id" and _surrogate(of))]
        self.key = NATURAL_KEYS.get(of.name)
        first = of.c[self.key[0]] if self.key else of.c.natural_key
        self._first = self.key[0] if self.key else "natural_key"
        statement = select(*(of.c[name] for name in self.columns)).where(first.in_(bindparam("firsts", expanding=True)))
        if self.key and len(self.key) == 2:
            second = of.c[self.key[1]]
            statement = statement.where(second.between(bindparam("low"), bindparam("high")))
        self._statement = statement

    def identity(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(row[name] for name in self.key) if self.key else tuple(row[name] for name in self.columns)

    async def stored(self, connection: Any, chunk: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        parameters: dict[str, Any] = {"firsts": sorted({row[self._first] for row in chunk})}
        if self.key and len(self.key) == 2:
            seconds = [row[self.key[1]] for row in chunk]
            parameters.update(low=min(seconds), high=max(seconds))
        result = await connection.execute(self._statement, parameters)
        return [dict(zip(self.columns, row, strict=True)) for row in result]


async def _copy_table(
    source: Database,
    target: Database,
    of: Table,
    amends: Amends | None,
    entry: TableCopy,
    chunk_rows: int,
    progress: CopyProgress | None,
) -> None:
    matcher = _Matcher(of)
    insert = _insert(target, of).on_conflict_do_nothing()
    amend = None
    if matcher.key is not None and amends is not None:
        kept = [name for name in matcher.columns if name not in matcher.key]
        amend = (
            update(of)
            .where(*(of.c[name] == bindparam(f"key_{name}") for name in matcher.key))
            .values({name: bindparam(f"new_{name}") for name in kept})
        )
    done = 0
    if progress is not None:
        progress(of.name, done, entry.source_rows)
    async with source.read() as reading:
        result = await reading.stream(
            select(*(of.c[name] for name in matcher.columns)).order_by(of.c.id).execution_options(yield_per=chunk_rows)
        )
        async for rows in result.partitions(chunk_rows):
            chunk = [dict(zip(matcher.columns, row, strict=True)) for row in rows]
            async with target.write() as writing:
                stored = await matcher.stored(writing, chunk)
                fresh, amended = _changes(matcher, chunk, stored, amends)
                if fresh:
                    await writing.execute(insert, fresh)
                if amended and amend is not None:
                    keys = matcher.key or ()
                    bound = [{("key_" if n in keys else "new_") + n: v for n, v in row.items()} for row in amended]
                    await writing.execute(amend, bound)
            entry.added += len(fresh)
            entry.amended += len(amended)
            done += len(chunk)
            if progress is not None:
                progress(of.name, done, entry.source_rows)


def _changes(
    matcher: _Matcher,
    chunk: Sequence[dict[str, Any]],
    stored: Sequence[dict[str, Any]],
    amends: Amends | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The source rows to insert, and those whose version replaces the target's under the table's rule."""
    if matcher.key is None:  # rows identified by their whole content: insert as many as the target lacks
        lacking = Counter(matcher.identity(row) for row in stored)
        fresh = []
        for row in chunk:
            identity = matcher.identity(row)
            if lacking[identity] > 0:
                lacking[identity] -= 1
            else:
                fresh.append(row)
        return fresh, []
    found = {matcher.identity(row): row for row in stored}
    fresh, amended = [], []
    for row in chunk:
        kept = found.get(matcher.identity(row))
        if kept is None:
            fresh.append(row)
        elif kept != row and amends is not None and amends(row, kept):
            amended.append(row)
    return fresh, amended


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


def checksum_columns(of: Table) -> list[str]:
    """The columns a table's checksum covers: every one but an integer surrogate ``id`` (each database's own)."""
    return [column.name for column in of.c if not (column.name == "id" and _surrogate(of))]


def row_digest(values: Sequence[Any]) -> int:
    """One row's SHA-256 over its canonical JSON, as an integer."""
    payload = json.dumps([_canonical(value) for value in values], separators=(",", ":"), ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(payload.encode()).digest(), "big")


async def table_checksum(database: Database, of: Table, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> str:
    """An order-independent checksum of a table's natural keys and values, the same on SQLite and PostgreSQL."""
    columns = [of.c[name] for name in checksum_columns(of)]
    total = 0
    async with database.read() as connection:
        result = await connection.stream(select(*columns).execution_options(yield_per=chunk_rows))
        async for rows in result.partitions(chunk_rows):
            for row in rows:
                total = (total + row_digest(row)) % _CHECKSUM_MODULUS
    return f"{total:064x}"
