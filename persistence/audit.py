"""The audit trail: every version the sidecar writes, appended to ``audit_log`` as a hash chain per instance.

Each committed version of a trade, a signal (an execution update included), a performance snapshot or a parameter
change becomes one entry, in the same transaction as the row it describes. An entry holds the version as canonical
JSON (:func:`canonical_version`: sorted keys, decimals as strings with exactly eight places, timestamps in UTC as
``YYYY-MM-DDTHH:MM:SS.ffffffZ``) and links to the one before it in its instance's chain::

    hash = SHA-256(prev_hash "\\n" header "\\n" payload)

where ``header`` is the canonical JSON of the entry's other columns (``instance_id``, ``seq``, ``entity``,
``natural_key``, ``recorded_at``), so every stored column is covered. A chain starts at ``seq`` 1 with ``prev_hash``
:data:`GENESIS`. The chain's head is read inside the write transaction, under the database's lock for that chain
(SQLite's write lock; ``pg_advisory_xact_lock`` on PostgreSQL, taken just before the head is read and held to the
commit), so two processes sharing an instance id append one after the other and a chain never forks; a unique
index on ``(instance_id, seq)`` refuses a fork outright.

What the trail proves and what it does not is in the README ("Audit trail"). :mod:`persistence.audit_verify` walks
the chains.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import bindparam, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.db import Database
from persistence.models import utc_now
from persistence.pgcopy import COPY_MIN_ROWS, CopyUpsert
from persistence.rowcodec import DriverBatch
from persistence.schema import audit_log

GENESIS = "0" * 64
"""The ``prev_hash`` of a chain's first entry."""
BASELINE_INSTANCE = "pre-audit"
"""The instance id that migration 0003 gives rows written before the trail, and the chain of their entries."""
ENTRY_COLUMNS = ("instance_id", "seq", "entity", "natural_key", "payload", "recorded_at", "prev_hash", "hash")


@dataclass(frozen=True, slots=True)
class Version:
    """One version of a record as it was written: its entity, natural key and every field's value."""

    entity: str
    key: str
    values: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AuditHead:
    """Where a chain ends: its instance, the last ``seq`` and that entry's hash."""

    instance_id: str
    seq: int
    hash: str


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One entry of ``audit_log``, decoded; ``version`` is the parsed payload."""

    id: int
    instance_id: str
    seq: int
    entity: str
    natural_key: str
    payload: str
    recorded_at: datetime
    prev_hash: str
    hash: str

    @property
    def version(self) -> dict[str, Any]:
        """The version this entry records, as JSON values (decimals and timestamps as strings)."""
        value: dict[str, Any] = json.loads(self.payload)
        return value

    def to_json(self) -> dict[str, Any]:
        """The entry as JSON values, the version parsed."""
        return {
            "seq": self.seq,
            "instance_id": self.instance_id,
            "entity": self.entity,
            "natural_key": self.natural_key,
            "recorded_at": canonical_time(self.recorded_at),
            "version": self.version,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def canonical_time(value: datetime) -> str:
    """A timestamp's one canonical text: UTC, microseconds always present, ``Z``."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    elif value.utcoffset():
        value = value.astimezone(UTC)
    return f"{value:%Y-%m-%dT%H:%M:%S.%f}Z"


def _canonical_value(value: Any) -> Any:
    if value is None or value is True or value is False:
        return value
    kind = type(value)
    if kind is Decimal:
        return f"{value:.8f}"
    if kind is datetime:
        return canonical_time(value)
    if kind is int or kind is str:
        return value
    if isinstance(value, Decimal):
        return f"{value:.8f}"
    if isinstance(value, datetime):
        return canonical_time(value)
    if isinstance(value, bool | int | str):
        return value
    raise TypeError(f"no canonical form for {kind.__name__}")


def canonical_json(values: Mapping[str, Any]) -> str:
    """Canonical JSON of a mapping of JSON-ready values: sorted keys, no spaces, ASCII only."""
    return json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical_version(values: Mapping[str, Any], fields: Sequence[str]) -> str:
    """The canonical JSON of a record version: ``fields`` of ``values``, decimals and timestamps as text."""
    return canonical_json({name: _canonical_value(values[name]) for name in fields})


def entry_hash(prev_hash: str, header: Mapping[str, Any], payload: str) -> str:
    """SHA-256 (hex) linking an entry to ``prev_hash``, over its header's canonical JSON and its payload."""
    digest = hashlib.sha256(prev_hash.encode("ascii"))
    digest.update(b"\n")
    digest.update(canonical_json(header).encode("ascii"))
    digest.update(b"\n")
    digest.update(payload.encode("ascii"))
    return digest.hexdigest()


def header_of(instance_id: str, seq: int, entity: str, natural_key: str, recorded_at: datetime) -> dict[str, Any]:
    """The hashed header of an entry: every column but the payload and the two hashes."""
    return {
        "instance_id": instance_id,
        "seq": seq,
        "entity": entity,
        "natural_key": natural_key,
        "recorded_at": canonical_time(recorded_at),
    }


def chain_entries(
    head: AuditHead | None, instance_id: str, versions: Sequence[tuple[str, str, str]], recorded_at: datetime
) -> list[dict[str, Any]]:
    """The rows that extend the chain ending at ``head`` by ``versions`` (entity, key, payload), in order."""
    seq = head.seq if head is not None else 0
    previous = head.hash if head is not None else GENESIS
    rows: list[dict[str, Any]] = []
    for entity, key, payload in versions:
        seq += 1
        digest = entry_hash(previous, header_of(instance_id, seq, entity, key, recorded_at), payload)
        rows.append(
            {
                "instance_id": instance_id,
                "seq": seq,
                "entity": entity,
                "natural_key": key,
                "payload": payload,
                "recorded_at": recorded_at,
                "prev_hash": previous,
                "hash": digest,
            }
        )
        previous = digest
    return rows


def chain_lock_key(instance_id: str) -> int:
    """The PostgreSQL advisory lock key of an instance's chain (a signed 64-bit number)."""
    return int.from_bytes(hashlib.sha256(b"persistence-audit:" + instance_id.encode()).digest()[:8], "big", signed=True)


class AuditLog:
    """``audit_log`` over one database: append a transaction's versions, read a chain's head and a record's versions.

    ``fields`` maps each entity to the record fields its versions hold (the JSON's keys), in any order.
    """

    def __init__(self, database: Database, fields: Mapping[str, Sequence[str]]) -> None:
        self._db = database
        self.instance_id = database.settings.instance_id
        self._fields = {entity: tuple(names) for entity, names in fields.items()}
        insert = (postgresql if database.dialect_name == "postgresql" else sqlite).insert(audit_log)
        self._insert = insert
        self._fast = DriverBatch(insert, audit_log, database.engine.dialect) if database.is_sqlite else None
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

    async def head(self, connection: AsyncConnection, instance_id: str | None = None) -> AuditHead | None:
        """The last entry of a chain (this instance's by default), or ``None`` for an empty chain."""
        instance = instance_id or self.instance_id
        row = (await connection.execute(self._head, {"instance": instance})).first()
        return AuditHead(instance, int(row[0]), str(row[1])) if row is not None else None

    async def append(self, connection: AsyncConnection, versions: Sequence[Version]) -> AuditHead | None:
        """Append one entry per version, in order, inside the caller's write transaction; the new head.

        Nothing is appended (and ``None`` returned) when there are no versions.
        """
        if not versions:
            return None
        if self._db.dialect_name == "postgresql":
            # Held to the commit: a second process on the same instance id waits here, then reads the new head.
            await connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": chain_lock_key(self.instance_id)}
            )
        head = await self.head(connection)
        fields = self._fields
        payloads = [
            (version.entity, version.key, canonical_version(version.values, fields[version.entity]))
            for version in versions
        ]
        rows = chain_entries(head, self.instance_id, payloads, utc_now())
        if self._fast is not None:
            await self._db.executemany_on_driver(connection, self._fast.sql, self._fast.encode(rows))
        elif self._copy is not None and len(rows) >= COPY_MIN_ROWS:
            await self._copy.write(connection, rows)
        else:
            await connection.execute(self._insert, rows)
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
    )
