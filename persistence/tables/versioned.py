"""Versioned writes: what a batch really changes, decided under the write lock, then written.

A batch may hold several versions of one record (a trade opened and closed within a second), replays of versions
already stored, and versions older than the stored one. Applying them in order under the table's rule (a trade's
newer ``updated_at`` wins; a signal that is ``executed`` is never reset by a replay of its unexecuted version) gives
the rows to store and the versions that were really written, one by one: the audit trail's entries. A version
identical to what is stored writes nothing and adds no entry.

The rule is applied here, in Python, against the stored rows read inside the write transaction and held by it,
together with the hash of each stored record's latest audit entry (each version's ``key_prev_hash``: the audit
trail links a record's versions in the order they were committed, :mod:`persistence.audit.chain`):

1. read the batch's keys that exist (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite's write lock holds the whole
   database);
2. insert the first version of each new key with ``ON CONFLICT DO NOTHING``. This comes first, for the first version
   of every key, so a batch of new keys (the common case) reads nothing: on PostgreSQL the keys inserted come back
   (``RETURNING``), and only the others are read (and locked) as in 1; on SQLite the claims go under a savepoint, and
   when one of them finds its key taken the savepoint is rolled back, the stored rows are read, and only the new keys
   are claimed;
3. apply every version in order; write the final state of each key that changed since 2, unconditionally (each of
   those rows is held by this transaction).

On PostgreSQL the claims go in key order (their surrogate ids drawn first, in batch order), like the ``FOR UPDATE``
read, so two writers of overlapping keys queue instead of deadlocking; batches of
:data:`~persistence.db.pgcopy.COPY_MIN_ROWS` rows or more go by binary ``COPY`` (:mod:`persistence.db.pgcopy`),
straight into the table when every key is new, and the new versions' canonical JSON is made while the server works.
There, 2 is :meth:`VersionedTable.claim` and 1 and 3 are :meth:`VersionedTable.finish`: the claim may run in a
transaction begun ahead, while the batch before commits (:mod:`persistence.tables.ahead`). On
SQLite the statements run on the driver's thread (:meth:`VersionedTable.write_on`, one call for the whole transaction,
:mod:`persistence.db.driver`) with rows encoded straight to driver values (:mod:`persistence.db.rowcodec`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from typing import Any, Generic

from sqlalchemy import String, Table, any_, bindparam, func, literal_column, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.audit.chain import GENESIS, Version, VersionEncoder
from persistence.audit.trail import column_kinds
from persistence.db.driver import DriverSession
from persistence.db.engine import Database
from persistence.db.pgcopy import COPY_MIN_ROWS, CopyUpsert
from persistence.db.rowcodec import DriverBatch, RowReader
from persistence.records.models import Record, RecordT

Row = dict[str, Any]
Replaces = Callable[[Mapping[str, Any], Mapping[str, Any]], bool]
"""``replaces(new, stored)``: whether ``new`` may overwrite ``stored`` (both rows of the same key)."""
Change = Callable[[Row], Row]

_READ_CHUNK = 5000
OVERLAP_SLICE = 32
"""First versions encoded between two hand-backs of the loop while their claim runs."""


def winning_version(new: Row, stored: Row, replaces: Replaces) -> Row | None:
    """The version rule: the row to store when ``new`` meets ``stored`` (same key), or ``None`` when it changes nothing.

    ``new`` wins only where the table's rule lets it replace ``stored``; the stored ``created_at`` is kept (the first
    version's); a winner identical to what is stored writes nothing.
    """
    if not replaces(new, stored):
        return None
    row = new if new["created_at"] == stored["created_at"] else {**new, "created_at": stored["created_at"]}
    return row if row != stored else None


def never(_new: Mapping[str, Any], _stored: Mapping[str, Any]) -> bool:
    """The rule of immutable records: the first version stays."""
    return False


@dataclass(frozen=True, slots=True)
class Claimed:
    """What :meth:`VersionedTable.claim` did in a transaction: the keys it touched, those it inserted (their first
    version written), and the canonical JSON of those first versions, by ``id`` of row."""

    rows: Sequence[Row]
    changes: Sequence[tuple[str, Change]]
    keys: list[str]
    written_first: set[str]
    payloads: dict[int, str]


class _Statement:
    """One batch statement in its fastest form per backend: driver rows on SQLite, ``COPY`` on PostgreSQL."""

    def __init__(
        self,
        database: Database,
        table: Table,
        statement: Any,
        conflict: str,
        returning: str | None,
        *,
        with_id: bool = False,
    ) -> None:
        self._db = database
        self._statement = statement
        self._returning = returning
        self._fast = DriverBatch(statement, table, database.engine.dialect) if database.is_sqlite else None
        self._copy: CopyUpsert | None = None
        if database.dialect_name == "postgresql":
            names = [
                column.name for column in table.c if column.name != "id" or with_id or isinstance(column.type, String)
            ]
            self._copy = CopyUpsert(table, names, conflict, database.settings.query_timeout_ms, returning=returning)
            if returning is not None:
                self._statement = statement.returning(table.c[returning])

    def run_on(self, session: DriverSession, rows: Sequence[Mapping[str, Any]]) -> int:
        """Execute for ``rows`` on SQLite's driver thread; how many rows it changed."""
        if self._fast is None:
            raise NotImplementedError("driver statements are SQLite's")
        return session.executemany(self._fast.sql, self._fast.encode(rows)) if rows else 0

    async def run(self, connection: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> list[Any] | None:
        """Execute for ``rows`` (PostgreSQL); the ``returning`` values of the rows written, or ``None`` if all were."""
        if not rows:
            return []
        if self._copy is not None and len(rows) >= COPY_MIN_ROWS:
            written = await self._copy.write(connection, rows)
            return written if self._returning is not None else None
        result = await connection.execute(self._statement, list(rows))
        return list(result.scalars()) if self._returning is not None else None

    async def warm(self, connection: AsyncConnection) -> None:
        """PostgreSQL: prepare this statement's ``COPY`` on ``connection`` (see :meth:`VersionedTable.warm`)."""
        if self._copy is not None:
            await self._copy.warm(connection)

    async def claim(self, connection: AsyncConnection, rows: Sequence[Mapping[str, Any]], key: str) -> list[Any] | None:
        """:meth:`run` an ``INSERT … DO NOTHING`` of ``rows``; on PostgreSQL a batch of only new keys takes a plain
        ``COPY`` into the table instead (:meth:`~persistence.db.pgcopy.CopyUpsert.write_new`)."""
        if self._copy is not None and len(rows) >= COPY_MIN_ROWS and await self._copy.write_new(connection, rows):
            return [row[key] for row in rows]
        return await self.run(connection, rows)


class VersionedTable(Generic[RecordT]):
    """The versioned writes of one table keyed by ``key``, under the rule ``replaces``; see the module docstring."""

    def __init__(
        self, database: Database, table: Table, key: str, record_type: type[RecordT], replaces: Replaces
    ) -> None:
        self._db = database
        self._key = key
        self._entity = record_type.entity
        self._replaces = replaces
        self.instance_id = database.settings.instance_id
        self.fields = tuple(record_type.model_fields)
        self._encode = VersionEncoder(self.fields, column_kinds(table)).encode
        dialect = postgresql if database.dialect_name == "postgresql" else sqlite
        if database.dialect_name not in ("postgresql", "sqlite"):
            raise NotImplementedError(f"upserts are not implemented for {database.dialect_name}")
        claim = dialect.insert(table).on_conflict_do_nothing(index_elements=[table.c[key]])
        # PostgreSQL claims in key order (see write()); an integer surrogate id is drawn first, in batch order.
        self._drawn_ids: Any = None
        if database.dialect_name == "postgresql" and not isinstance(table.c.id.type, String):
            # The table's name comes from the schema, never from input. The sequence is looked up once per statement
            # (an init plan), not once per id: 0.86 against 1.9 ms for 500 ids. (As one array they would come back
            # faster still, but asyncpg looks up an int8[] type on each new connection: 8 ms in a burst's first batch.)
            self._drawn_ids = text(
                f"SELECT nextval((SELECT pg_get_serial_sequence('{table.name}', 'id'))::regclass)"  # noqa: S608
                " FROM generate_series(1, :count) ORDER BY 1"
            )
        self._claim = _Statement(
            database, table, claim, f"ON CONFLICT ({key}) DO NOTHING", key, with_id=self._drawn_ids is not None
        )
        upsert = dialect.insert(table)
        kept = [column.name for column in table.c if column.name not in ("id", key)]
        overwrite = upsert.on_conflict_do_update(
            index_elements=[table.c[key]], set_={name: upsert.excluded[name] for name in kept}
        )
        conflict = f"ON CONFLICT ({key}) DO UPDATE SET " + ", ".join(f"{name} = EXCLUDED.{name}" for name in kept)
        self._overwrite = _Statement(database, table, overwrite, conflict, None)
        columns = [table.c[name] for name in self.fields]
        self._reader = RowReader(columns, record_type, sqlite=database.is_sqlite)
        # The keys go as one parameter (an array; a JSON list on SQLite), so the statement is compiled once.
        stored = select(*self._reader.columns, table.c.instance_id)
        if not self._entity.isidentifier():
            raise AssertionError(f"entity {self._entity!r} is not a plain name")  # it goes into SQL text below
        self._latest_entries: Any = None
        if database.dialect_name == "postgresql":
            keys = bindparam("keys", type_=postgresql.ARRAY(String()))
            # Locked in key order, so two writers of overlapping batches queue instead of deadlocking.
            stored = stored.where(table.c[key] == any_(keys)).order_by(table.c[key]).with_for_update()
            # Read after the rows are locked, by a statement of its own: the locking read's snapshot predates a
            # commit it waited for, whose entries it would not see (a stale link); this one's does not.
            self._latest_entries = text(
                "SELECT DISTINCT ON (natural_key) natural_key, hash FROM audit_log "  # noqa: S608
                f"WHERE entity = '{self._entity}' AND natural_key = ANY(:keys) ORDER BY natural_key, id DESC"
            ).bindparams(keys)
        else:
            listed = func.json_each(bindparam("keys", type_=String())).table_valued("value")
            stored = stored.where(table.c[key].in_(select(listed.c.value).scalar_subquery()))
            # The hash of each record's latest entry, in the same read (SQLite's write lock holds everything still).
            latest: Any = literal_column(
                "(SELECT hash FROM audit_log WHERE id = (SELECT max(id) FROM audit_log AS newest "  # noqa: S608
                f"WHERE newest.entity = '{self._entity}' AND newest.natural_key = {table.name}.{key}))"
            )
            stored = stored.add_columns(latest)
        self._stored = stored
        self._stored_sql = ""
        if database.is_sqlite:
            compiled = stored.compile(dialect=database.engine.dialect)
            if list(compiled.positiontup or ()) != ["keys"]:
                raise AssertionError("the stored rows' query does not take one parameter, the keys")
            self._stored_sql = str(compiled)

    async def _encode_meanwhile(self, claiming: asyncio.Future[Any], rows: Sequence[Row]) -> dict[int, str]:
        """The canonical JSON of each new key's first version, made while the claim is under way; by ``id`` of row.

        The claim's ``COPY`` runs in the PostgreSQL server while this encodes, a slice at a time, handing the loop back
        between slices so the claim's own sending goes on. A failure or cancellation here stops the claim.
        """
        encode = self._encode
        encoded: dict[int, str] = {}
        try:
            for start in range(0, len(rows), OVERLAP_SLICE):
                await asyncio.sleep(0)
                for row in rows[start : start + OVERLAP_SLICE]:
                    encoded[id(row)] = encode(row)
        except BaseException:
            claiming.cancel()
            with contextlib.suppress(BaseException):
                await claiming
            raise
        return encoded

    def rows(self, records: Sequence[Record]) -> list[Row]:
        """The rows of ``records`` as this process writes them (its ``instance_id`` added)."""
        instance = self.instance_id
        return [{**record.__dict__, "instance_id": instance} for record in records]

    async def warm(self, connection: AsyncConnection) -> None:
        """PostgreSQL: send a batch's statements once on ``connection``, inside a begun transaction the caller rolls
        back, with nothing to write or read (no ids drawn, no keys, empty ``COPY``), so that the connection has them
        prepared before the first batch after a start needs them."""
        if self._db.dialect_name != "postgresql":
            return
        if self._drawn_ids is not None:
            await connection.execute(self._drawn_ids, {"count": 0})
        await self._claim.warm(connection)
        await connection.execute(self._stored, {"keys": []})
        await connection.execute(self._latest_entries, {"keys": []})

    async def stored(self, connection: AsyncConnection, keys: Sequence[str], links: dict[str, str]) -> dict[str, Row]:
        """The stored rows of ``keys`` that exist, read (and on PostgreSQL locked) inside the transaction; ``links``
        gets the hash of each one's latest audit entry."""
        if self._db.is_sqlite:
            return await self._db.on_driver(connection, partial(self.stored_on, keys=keys, links=links))
        found: dict[str, Row] = {}
        decode = self._reader.decode
        key = self._key
        for start in range(0, len(keys), _READ_CHUNK):
            chunk = list(keys[start : start + _READ_CHUNK])
            locked = []
            for row in (await connection.execute(self._stored, {"keys": chunk})).all():
                values = dict(decode(row[:-1]).__dict__)
                values["instance_id"] = row[-1]
                found[values[key]] = values
                locked.append(values[key])
            if locked:
                for natural_key, digest in (await connection.execute(self._latest_entries, {"keys": locked})).all():
                    links[natural_key] = digest
        return found

    def stored_on(self, session: DriverSession, keys: Sequence[str], links: dict[str, str]) -> dict[str, Row]:
        """:meth:`stored`, on SQLite's driver thread."""
        found: dict[str, Row] = {}
        decode = self._reader.decode
        key = self._key
        for start in range(0, len(keys), _READ_CHUNK):
            for row in session.execute(self._stored_sql, (json.dumps(keys[start : start + _READ_CHUNK]),)):
                values = dict(decode(row[:-2]).__dict__)
                values["instance_id"] = row[-2]
                found[values[key]] = values
                if row[-1] is not None:
                    links[values[key]] = row[-1]
        return found

    async def write(
        self, connection: AsyncConnection, rows: Sequence[Row], changes: Sequence[tuple[str, Change]] = ()
    ) -> tuple[list[Version], list[int]]:
        """Apply ``rows`` in order, then ``changes`` (key, change of the stored row) in order, inside the transaction.

        Returns the versions written, in order, and the indexes of the changes whose key has no row.
        """
        if self._db.is_sqlite:
            return await self._db.on_driver(connection, partial(self.write_on, rows=rows, changes=changes))
        return await self.finish(connection, await self.claim(connection, rows, changes))

    async def claim(
        self, connection: AsyncConnection, rows: Sequence[Row], changes: Sequence[tuple[str, Change]] = ()
    ) -> Claimed:
        """The first half of :meth:`write` on PostgreSQL: insert the first version of each key that is new.

        It reads nothing of what is stored and takes no lock but on the keys it inserts, so it may run in a
        transaction begun ahead, before the chain lock (:mod:`persistence.tables.ahead`).
        """
        key = self._key
        keys = list(dict.fromkeys([row[key] for row in rows] + [change_key for change_key, _ in changes]))
        if not keys:
            return Claimed(rows, changes, keys, set(), {})
        # Each key's first version, in batch order: new rows take their surrogate ids in the order recorded.
        first: dict[str, Row] = {}
        for row in rows:
            first.setdefault(row[key], row)
        # Claim first; RETURNING names the keys that were new. Every other key has a committed row (an insert that
        # conflicts waits for the other transaction), read and locked by finish(). A batch of new keys, the common
        # case, needs no read at all. Claims go in key order, like the read, so two writers of overlapping keys queue
        # instead of deadlocking; the ids they take were drawn in batch order.
        claims = list(first.values())
        if self._drawn_ids is not None:
            drawn = (await connection.execute(self._drawn_ids, {"count": len(claims)})).scalars()
            claims = [{**row, "id": drawn_id} for row, drawn_id in zip(claims, drawn, strict=True)]
        claims.sort(key=itemgetter(key))
        claiming = asyncio.ensure_future(self._claim.claim(connection, claims, key))
        payloads = await self._encode_meanwhile(claiming, list(first.values()))
        return Claimed(rows, changes, keys, set(await claiming or ()), payloads)

    async def finish(self, connection: AsyncConnection, claimed: Claimed) -> tuple[list[Version], list[int]]:
        """The second half of :meth:`write` on PostgreSQL: read and lock the stored rows of the keys not claimed,
        apply every version, and write what changed; the versions written and the changes whose key has no row."""
        if not claimed.keys:
            return [], []
        written_first = claimed.written_first
        links: dict[str, str] = {}
        state = await self.stored(
            connection, [identity for identity in claimed.keys if identity not in written_first], links
        )
        versions, missing, finals = self._apply(
            claimed.rows, claimed.changes, state, written_first, claimed.payloads, links
        )
        await self._overwrite.run(connection, finals)
        return versions, missing

    def write_on(
        self, session: DriverSession, rows: Sequence[Row], changes: Sequence[tuple[str, Change]] = ()
    ) -> tuple[list[Version], list[int]]:
        """:meth:`write`, on SQLite's driver thread (inside the caller's transaction).

        SQLite's write lock holds the whole database, so nothing changes between the statements here. The first
        version of every key is claimed at once under a savepoint: when every claim lands (a batch of new records,
        the common case) nothing is read; when one does not, the savepoint is rolled back and the stored rows of
        the batch's keys are read first, so that only the new keys are claimed.
        """
        key = self._key
        keys = list(dict.fromkeys([row[key] for row in rows] + [change_key for change_key, _ in changes]))
        if not keys:
            return [], []
        first: dict[str, Row] = {}
        for row in rows:
            first.setdefault(row[key], row)
        fresh = list(first.values())
        state: dict[str, Row] = {}
        links: dict[str, str] = {}
        if fresh:
            session.execute("SAVEPOINT persistence_claim")
            if self._claim.run_on(session, fresh) == len(fresh):
                session.execute("RELEASE persistence_claim")
            else:
                session.execute("ROLLBACK TO persistence_claim")
                session.execute("RELEASE persistence_claim")
                state = self.stored_on(session, list(first), links)
                fresh = [row for identity, row in first.items() if identity not in state]
                self._claim.run_on(session, fresh)
        written_first = {row[key] for row in fresh}
        others = [identity for identity in keys if identity not in first]
        if others:  # keys that only changes name
            state.update(self.stored_on(session, others, links))
        versions, missing, finals = self._apply(rows, changes, state, written_first, {}, links)
        self._overwrite.run_on(session, finals)
        return versions, missing

    def _apply(
        self,
        rows: Sequence[Row],
        changes: Sequence[tuple[str, Change]],
        state: dict[str, Row],
        written_first: set[str],
        payloads: Mapping[int, str],
        links: Mapping[str, str],
    ) -> tuple[list[Version], list[int], list[Row]]:
        """Apply every version in order to ``state`` (the stored rows; the claimed ones are ``written_first``);
        ``links`` holds the hash of each stored record's latest audit entry (none: the record's first entry).

        Returns the versions written, the indexes of the changes whose key has no row, and the final rows to store
        over what the table holds now.
        """
        key = self._key
        stored_now = dict(state)
        versions: list[Version] = []
        entity = self._entity
        replaces = self._replaces
        for row in rows:
            identity = row[key]
            kept = state.get(identity)
            if kept is None:
                if identity in written_first:
                    state[identity] = stored_now[identity] = row
                    versions.append(Version(entity, identity, row, payloads.get(id(row)), links.get(identity, GENESIS)))
                continue
            new = winning_version(row, kept, replaces)
            if new is not None:
                state[identity] = new
                versions.append(Version(entity, identity, new, None, links.get(identity, GENESIS)))
        missing: list[int] = []
        for index, (identity, change) in enumerate(changes):
            kept = state.get(identity)
            if kept is None:
                missing.append(index)
                continue
            new = change(kept)
            new["instance_id"] = self.instance_id
            if new != kept:
                state[identity] = new
                versions.append(Version(entity, identity, new, None, links.get(identity, GENESIS)))
        finals = [state[identity] for identity in sorted(state) if state[identity] is not stored_now.get(identity)]
        return versions, missing, finals
