"""The audit trail: every version the sidecar writes, appended to ``audit_log`` as a hash chain per instance.

Each committed version of a trade, a signal (an execution update included), a performance snapshot or a parameter
change becomes one entry, in the same transaction as the row it describes. An entry holds the version as canonical
JSON (:func:`canonical_version`: sorted keys, decimals as strings with exactly eight places, timestamps in UTC as
``YYYY-MM-DDTHH:MM:SS.ffffffZ``) and links to the one before it in its instance's chain::

    hash = SHA-256(prev_hash "\\n" header "\\n" payload)

where ``header`` is the canonical JSON of the entry's other columns (``instance_id``, ``seq``, ``entity``,
``natural_key``, ``recorded_at``, ``key_prev_hash``), so every stored column is covered. A chain starts at ``seq`` 1
with ``prev_hash`` :data:`GENESIS`. ``key_prev_hash`` is the hash of the previous entry of the same record, whichever
instance wrote it: :mod:`persistence.tables.versioned` reads it with the stored rows it already reads (a batch of new
records reads nothing), under the same locks, so one record's versions chain in the order they were committed. The
chain's head is read inside the write transaction, under the database's lock for that chain
(SQLite's write lock; ``pg_advisory_xact_lock`` on PostgreSQL, held to the commit and taken before the head is read:
before the transaction's first row lock, or, in a transaction begun ahead, when it continues), so two processes
sharing an instance id append one after the other and a chain never forks; a unique index on ``(instance_id, seq)``
refuses a fork outright.

What the trail proves and what it does not is in docs/audit.md. :mod:`persistence.audit.verify` walks
the chains.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from sqlalchemy import String, Table, bindparam, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.audit.chain import AuditEntry, AuditHead, Version, VersionEncoder, linked_entries
from persistence.db.columns import ExactNumeric, UTCDateTime, to_sqlite_datetime
from persistence.db.driver import DriverSession
from persistence.db.engine import Database
from persistence.db.pgcopy import COPY_MIN_ROWS, CopyUpsert
from persistence.db.schema import TABLE_OF, audit_log
from persistence.records.models import utc_now
from persistence.records.registry import RECORD_KINDS

ENCODE_SLICE = 128
"""Entries encoded and hashed between two hand-backs of the event loop."""
LOCK_INFO = "persistence.audit_lock"
"""Key in a connection's ``info`` of the transaction that holds the chain lock (so it is taken once)."""
HEAD_SQL = "SELECT seq, hash FROM audit_log WHERE instance_id = ? ORDER BY seq DESC LIMIT 1"
"""This instance's chain head, on SQLite's driver (the same query as :meth:`AuditLog.head`)."""
ENTRY_COLUMNS = (
    "instance_id",
    "seq",
    "entity",
    "natural_key",
    "payload",
    "recorded_at",
    "prev_hash",
    "hash",
    "key_prev_hash",
)


def column_kinds(table: Table) -> dict[str, str]:
    """Each column's kind for :class:`VersionEncoder`: ``decimal``, ``datetime``, ``text`` or ``other``."""
    kinds: dict[str, str] = {}
    for column in table.c:
        if isinstance(column.type, ExactNumeric):
            kinds[column.name] = "decimal"
        elif isinstance(column.type, UTCDateTime):
            kinds[column.name] = "datetime"
        elif isinstance(column.type, String):
            kinds[column.name] = "text"
        else:
            kinds[column.name] = "other"
    return kinds


def chain_lock_key(instance_id: str) -> int:
    """The PostgreSQL advisory lock key of an instance's chain (a signed 64-bit number)."""
    return int.from_bytes(hashlib.sha256(b"persistence-audit:" + instance_id.encode()).digest()[:8], "big", signed=True)


class AuditLog:
    """``audit_log`` over one database: append a transaction's versions, read a chain's head and a record's versions.

    A version's JSON holds its record's fields (the keys), encoded as its table's columns are.
    """

    def __init__(self, database: Database) -> None:
        self._db = self.database = database
        self.instance_id = database.settings.instance_id
        self._encoders: dict[str, Callable[[Mapping[str, Any]], str]] = {
            kind.entity: VersionEncoder(tuple(kind.model.model_fields), column_kinds(TABLE_OF[kind.entity])).encode
            for kind in RECORD_KINDS
        }
        insert = (postgresql if database.dialect_name == "postgresql" else sqlite).insert(audit_log)
        self._insert = insert
        self._sqlite_sql = ""
        if database.is_sqlite:
            compiled = insert.compile(dialect=database.engine.dialect, column_keys=list(ENTRY_COLUMNS))
            if list(compiled.positiontup or ()) != list(ENTRY_COLUMNS):
                raise AssertionError("audit_log's insert does not take ENTRY_COLUMNS in order")
            self._sqlite_sql = str(compiled)
        self._copy: CopyUpsert | None = None
        if database.dialect_name == "postgresql":
            columns = [column.name for column in audit_log.c if column.name != "id"]
            self._copy = CopyUpsert(audit_log, columns, None, database.settings.query_timeout_ms)
        self._head = (
            select(audit_log.c.seq, audit_log.c.hash)
            .where(audit_log.c.instance_id == bindparam("instance"))
            .order_by(audit_log.c.seq.desc())
            .limit(1)
        )

    async def lock(self, connection: AsyncConnection) -> None:
        """Take this instance's chain lock for the rest of the transaction (PostgreSQL; SQLite's write lock is it).

        The repositories take it before their first row lock, so a second process on the same instance id waits
        here for the first one's commit instead of deadlocking with it over rows; a transaction begun ahead has
        claimed its new rows before it takes this (:mod:`persistence.tables.ahead` says what the server resolves
        then). Taken once per transaction.
        """
        if self._db.dialect_name != "postgresql":
            return
        transaction = connection.sync_connection.get_transaction() if connection.sync_connection else None
        if transaction is not None and connection.info.get(LOCK_INFO) is transaction:
            return
        await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": chain_lock_key(self.instance_id)})
        connection.info[LOCK_INFO] = transaction

    async def warm(self, connection: AsyncConnection) -> None:
        """PostgreSQL: send an append's statements once on ``connection`` (the chain lock, the head read, an empty
        ``COPY`` of entries), inside a begun transaction the caller rolls back; see
        :meth:`VersionedTable.warm <persistence.tables.versioned.VersionedTable.warm>`."""
        if self._db.dialect_name != "postgresql":
            return
        await self.lock(connection)
        await self.head(connection)
        if self._copy is not None:
            await self._copy.warm(connection)

    async def head(self, connection: AsyncConnection, instance_id: str | None = None) -> AuditHead | None:
        """The last entry of a chain (this instance's by default), or ``None`` for an empty chain."""
        instance = instance_id or self.instance_id
        row = (await connection.execute(self._head, {"instance": instance})).first()
        return AuditHead(instance, int(row[0]), str(row[1])) if row is not None else None

    def head_on(self, session: DriverSession) -> AuditHead | None:
        """This instance's chain head, read on SQLite's driver thread inside the caller's transaction."""
        rows = session.execute(HEAD_SQL, (self.instance_id,))
        return AuditHead(self.instance_id, int(rows[0][0]), str(rows[0][1])) if rows else None

    async def append(self, connection: AsyncConnection, versions: Sequence[Version]) -> AuditHead | None:
        """Append one entry per version, in order, inside the caller's write transaction; the new head.

        Nothing is appended (and ``None`` returned) when there are no versions.
        """
        if not versions:
            return None
        if self._db.is_sqlite:
            return await self._db.on_driver(connection, partial(self._append_on, versions=versions))
        await self.lock(connection)  # normally taken already, before the rows: see lock()
        head = await self.head(connection)
        encoders = self._encoders
        recorded_at = utc_now()
        rows: list[dict[str, Any]] = []
        links: dict[tuple[str, str], str] = {}  # a record's last entry in an earlier slice
        # Encoding and hashing take a few microseconds an entry: in slices, handing the loop back between them, so
        # the host's event loop never waits for a whole batch's worth.
        for start in range(0, len(versions), ENCODE_SLICE):
            if start:
                await asyncio.sleep(0)
            payloads = [
                (
                    version.entity,
                    version.key,
                    version.payload or encoders[version.entity](version.values),
                    links.get((version.entity, version.key), version.key_prev_hash),
                )
                for version in versions[start : start + ENCODE_SLICE]
            ]
            rows += linked_entries(head, self.instance_id, payloads, recorded_at)
            links.update(((row["entity"], row["natural_key"]), row["hash"]) for row in rows[-len(payloads) :])
            head = AuditHead(self.instance_id, int(rows[-1]["seq"]), str(rows[-1]["hash"]))
        if self._copy is not None and len(rows) >= COPY_MIN_ROWS:
            await self._copy.write(connection, rows)
        else:
            await connection.execute(self._insert, rows)
        return head

    def _append_on(self, session: DriverSession, versions: Sequence[Version]) -> AuditHead | None:
        appender = self.appender_on(session)
        appender.append(versions)
        return appender.appended

    def appender_on(self, session: DriverSession) -> DriverAppender:
        """Appends for one transaction on SQLite's driver thread, reading the chain's head once, at the first entry."""
        return DriverAppender(self, session)

    def append_on(
        self, session: DriverSession, versions: Sequence[Version], head: AuditHead | None
    ) -> AuditHead | None:
        """:meth:`append`, on SQLite's driver thread, after ``head``: the chain's head read in this transaction
        (:meth:`head_on`), so a transaction that appends for several tables reads it once. The new head."""
        if not versions:
            return head
        encoders = self._encoders
        recorded_at = utc_now()
        payloads = [
            (
                version.entity,
                version.key,
                version.payload or encoders[version.entity](version.values),
                version.key_prev_hash,
            )
            for version in versions
        ]
        rows = linked_entries(head, self.instance_id, payloads, recorded_at)
        # The driver's values directly: every column is text or an integer but recorded_at, one value a batch.
        at = to_sqlite_datetime(recorded_at)
        session.executemany(
            self._sqlite_sql,
            [
                (
                    row["instance_id"],
                    row["seq"],
                    row["entity"],
                    row["natural_key"],
                    row["payload"],
                    at,
                    row["prev_hash"],
                    row["hash"],
                    row["key_prev_hash"],
                )
                for row in rows
            ],
        )
        last = rows[-1]
        return AuditHead(self.instance_id, int(last["seq"]), str(last["hash"]))

    async def versions(self, entity: str, key: str) -> list[AuditEntry]:
        """Every audited version of one record, oldest first, whichever instance wrote it."""
        statement = (
            select(audit_log)
            .where(audit_log.c.entity == entity, audit_log.c.natural_key == key)
            .order_by(audit_log.c.id)
        )
        async with self._db.read() as connection:
            rows = (await connection.execute(statement)).mappings().all()
        return [entry_of(row) for row in rows]


class DriverAppender:
    """The entries of one transaction on SQLite's driver thread (:meth:`AuditLog.appender_on`).

    ``appended`` is the chain's head after the last entry appended, or ``None`` while none was: a value the writer
    gets back, not a slot on the connection.
    """

    def __init__(self, audit: AuditLog, session: DriverSession) -> None:
        self._audit = audit
        self._session = session
        self.appended: AuditHead | None = None
        self._head_read = False

    def append(self, versions: Sequence[Version]) -> None:
        """Append one entry per version, in order, after this transaction's earlier entries."""
        if not versions:
            return
        head = self.appended
        if not self._head_read:
            head = self._audit.head_on(self._session)
            self._head_read = True
        self.appended = self._audit.append_on(self._session, versions, head)


def entry_of(row: Any) -> AuditEntry:
    """An :class:`AuditEntry` from an ``audit_log`` row mapping (a result's ``mappings()`` row)."""
    return AuditEntry(
        id=int(row["id"]),
        instance_id=str(row["instance_id"]),
        seq=int(row["seq"]),
        entity=str(row["entity"]),
        natural_key=str(row["natural_key"]),
        payload=str(row["payload"]),
        recorded_at=row["recorded_at"],
        prev_hash=str(row["prev_hash"]),
        hash=str(row["hash"]),
        key_prev_hash=row["key_prev_hash"],
    )
