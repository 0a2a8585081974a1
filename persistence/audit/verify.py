"""``audit verify``: walk every audit chain and hold every current row against its latest audited version.

Three passes, each streamed in chunks (memory stays bounded whatever the size of the trail):

1. **Chains.** Per instance, entries in ``seq`` order: no gap (``seq`` 1, 2, 3, …), each ``prev_hash`` equal to the
   hash of the entry before (:data:`~persistence.audit.chain.GENESIS` for the first), each ``hash`` equal to the hash of
   the entry's own columns. A changed payload, a deleted entry, a swapped pair or an inserted one breaks this.
   **Record links.** Per record (entity and natural key), entries in ``id`` order, whichever instance wrote them:
   each ``key_prev_hash`` equal to the hash of the record's entry before (``GENESIS`` for its first); an entry
   without one (written before migration 0005) only before the record's first linked entry. The hashes cover the
   links, so two versions of a record swapped between instances (ids, rows and entries rewritten) break this unless
   the chains are rewritten too, which a checkpoint catches. The database checks each stretch of a chain as it is
   walked (an index seek or two an entry).
2. **Rows.** Each row of ``trades``, ``signals``, ``performance_snapshots`` and ``parameter_history`` equals the
   latest audited version of its key (the entry with the highest ``id``, whichever instance wrote it), every field
   and the ``instance_id``. A row edited by hand, or inserted by hand, breaks this.
3. **Deletions.** Every audited key still has its row.

With anchors (``audit verify --anchors DIR``, :mod:`persistence.audit.anchors`), the chain pass also holds every
checkpoint against its chain: the entry at the checkpoint's ``seq`` must exist and have its hash. That catches what a
chain cannot catch by itself: a row and every later entry rewritten with recomputed hashes, a tail deleted together
with its rows, a whole chain replaced. Entries that waited more than twice the interval for a checkpoint are reported
(not a break). ``since_last_anchor`` starts each chain after its newest checkpoint that still matches and checks the
rows of only the keys written after it.

The first problem found ends the walk: :class:`VerifyReport` names it (instance, ``seq``, entity, key and what
differs; the checkpoint, for an anchor). What a passing verify proves, and what it cannot, is in docs/audit.md.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import Boolean, Table, bindparam, func, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.audit.anchors import AnchorLine, Anchors, unanchored_gaps
from persistence.audit.chain import GENESIS, VersionEncoder, canonical_time, entry_hash, header_text
from persistence.audit.rows_worker import RowsWorker
from persistence.audit.trail import column_kinds
from persistence.db.columns import decode_datetime
from persistence.db.engine import Database, driver_of, sqlite_path
from persistence.db.rowcodec import RowReader
from persistence.db.schema import TABLE_OF, audit_log
from persistence.errors import StoredValueNotAsWritten
from persistence.records.models import Record, utc_now
from persistence.records.registry import RECORD_KINDS

CHUNK = 20_000
"""Entries or rows fetched at once (a chunk is a few tens of MiB at most)."""
PARALLEL_FROM_ROWS = 200_000
"""With ``jobs`` > 1, the fewest rows whose check goes to child processes: a child costs about 0.6 s to start (its
imports), about what checking 80,000 rows here costs, so a smaller trail is checked faster in one process."""
_AUDITED: tuple[tuple[Table, type[Record]], ...] = tuple((TABLE_OF[kind.entity], kind.model) for kind in RECORD_KINDS)

_CHAIN_COLUMNS = ("id", "seq", "entity", "natural_key", "payload", "recorded_at", "prev_hash", "hash", "key_prev_hash")
_SQLITE_CHAIN = (
    f"SELECT {', '.join(_CHAIN_COLUMNS)} FROM audit_log "  # noqa: S608 - fixed column names
    "WHERE instance_id = ? AND seq > ? ORDER BY seq LIMIT ?"
)
_SQLITE_UNLINKED_CHAIN = _SQLITE_CHAIN.replace("key_prev_hash", "NULL")
_POSTGRES_CHAIN = (
    "SELECT id, seq, entity, natural_key, payload, "
    """to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), prev_hash, hash, key_prev_hash """
    "FROM audit_log WHERE instance_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
)
_POSTGRES_UNLINKED_CHAIN = _POSTGRES_CHAIN.replace("key_prev_hash", "NULL")
"""The chain's query on a database from before migration 0005 (no links)."""
_SQLITE_LATEST = (
    "SELECT id, natural_key, instance_id, seq, payload FROM audit_log WHERE id IN ("
    "SELECT max(id) FROM audit_log WHERE entity = ? AND natural_key IN (SELECT value FROM json_each(?)) "
    "GROUP BY natural_key)"
)

KEY_LINKS_SQL = (
    "SELECT entity, natural_key, instance_id, seq, key_prev_hash, prior_instance, prior_seq, prior_hash, chain_linked "  # noqa: S608 - fixed text
    "FROM (SELECT id, entity, natural_key, instance_id, seq, key_prev_hash, "
    "lag(instance_id) OVER k AS prior_instance, lag(seq) OVER k AS prior_seq, lag(hash) OVER k AS prior_hash, "
    "sum(CASE WHEN key_prev_hash IS NULL THEN 0 ELSE 1 END) OVER k AS linked, "
    "sum(CASE WHEN key_prev_hash IS NULL THEN 0 ELSE 1 END) OVER c AS chain_linked "
    "FROM audit_log WINDOW k AS (PARTITION BY entity, natural_key ORDER BY id), "
    "c AS (PARTITION BY instance_id ORDER BY seq)) AS links "
    f"WHERE (key_prev_hash IS NOT NULL AND key_prev_hash <> coalesce(prior_hash, '{GENESIS}')) "
    "OR (key_prev_hash IS NULL AND linked > 0) ORDER BY id"
)
"""The entries of a whole exported trail, by ``id``, that do not link to their record's entry before it (window
functions, on the offline check's temporary SQLite file). Not all are breaks (:func:`_export_links`): a link to an
entry the file does not hold (an export filtered by instance), and an unlinked entry of a chain that never linked
one (a release before migration 0005 still writing), are reported."""

_PRIOR = (
    "(SELECT max(id) FROM audit_log AS q WHERE q.entity = e.entity AND q.natural_key = e.natural_key AND q.id < e.id)"
)
CHUNK_LINKS_SQL = (
    "SELECT e.id, e.seq, e.entity, e.natural_key, e.key_prev_hash FROM audit_log AS e "  # noqa: S608 - fixed text
    "WHERE e.instance_id = :instance AND e.seq > :after AND e.seq <= :last AND CASE "
    f"WHEN e.key_prev_hash = '{GENESIS}' THEN EXISTS (SELECT 1 FROM audit_log AS q WHERE q.entity = e.entity "
    "AND q.natural_key = e.natural_key AND q.id < e.id) "
    f"WHEN e.key_prev_hash IS NULL THEN EXISTS (SELECT 1 FROM audit_log AS p WHERE p.id = {_PRIOR} "
    "AND p.key_prev_hash IS NOT NULL) "
    f"ELSE e.key_prev_hash {{distinct}} (SELECT p.hash FROM audit_log AS p WHERE p.id = {_PRIOR}) END "
    "ORDER BY e.seq LIMIT 1"
)
"""The first entry of a stretch of a chain that does not link to its record's entry before it by ``id``.

Per entry an index seek or two, in the database: a record's first entry (linked to ``GENESIS``) must have no entry
before it (the index alone answers), a linked one must name the hash of the one before it, and an unlinked one
(before migration 0005) must not follow a linked one. ``{distinct}``: ``IS NOT`` on SQLite, ``IS DISTINCT FROM``
on PostgreSQL."""
FIRST_LINKED_SQL = (
    "SELECT min(seq) FROM audit_log WHERE instance_id = :instance AND seq >= :start AND seq < :seq "
    "AND key_prev_hash IS NOT NULL"
)
"""The first linked entry of a chain before ``seq``, if any: a chain that has one was written by this release."""
PRIOR_SQL = (
    "SELECT instance_id, seq, hash FROM audit_log WHERE id = (SELECT max(id) FROM audit_log "
    "WHERE entity = :entity AND natural_key = :natural_key AND id < :id)"
)
"""The entry before an entry of a record, by ``id`` (to name it in a break)."""

Progress = Callable[[int], None]
"""Told the number of entries and rows checked so far."""


@dataclass(frozen=True, slots=True)
class Break:
    """The first problem found: where, and what is wrong."""

    problem: str
    entity: str | None = None
    natural_key: str | None = None
    instance_id: str | None = None
    seq: int | None = None
    anchor: str | None = None
    """The checkpoint that does not match (its file, line, instance and seq), when a checkpoint found it."""

    def describe(self) -> str:
        """One line for a human: the checkpoint, the entry or row, then the problem."""
        where: list[str] = [self.anchor] if self.anchor is not None else []
        if self.instance_id is not None and self.seq is not None:
            where.append(f"entry seq {self.seq} of instance {self.instance_id!r}")
        if self.entity is not None and self.natural_key is not None:
            where.append(f"{self.entity} {self.natural_key!r}")
        return f"{', '.join(where)}: {self.problem}" if where else self.problem


@dataclass(slots=True)
class VerifyReport:
    """What ``verify`` checked, and the first break (``None`` when everything holds)."""

    chains: dict[str, int] = field(default_factory=dict)
    """Entries walked per instance."""
    heads: dict[str, str] = field(default_factory=dict)
    """Each chain's last hash."""
    rows: dict[str, int] = field(default_factory=dict)
    """Rows checked per table."""
    anchors: dict[str, int] = field(default_factory=dict)
    """Checkpoints that matched their chain, per instance (with anchors)."""
    since: dict[str, int] = field(default_factory=dict)
    """Per instance, the ``seq`` of the checkpoint the walk started after (``since_last_anchor``)."""
    gaps: list[str] = field(default_factory=list)
    """Where entries waited more than twice the interval for a checkpoint (reported, not a break)."""
    unlinked: dict[str, int] = field(default_factory=dict)
    """Per instance, entries without a record link written after a linked entry of their record by an instance that
    has never linked one: a release from before migration 0005 still writing (a rolling upgrade). Reported, not a
    break; their order against the record's other versions is not sealed."""
    outside: int = 0
    """In an export: entries whose record link names an entry the file does not hold (an export filtered by
    instance). Reported, not a break."""
    broken: Break | None = None

    @property
    def ok(self) -> bool:
        return self.broken is None

    def lines(self) -> list[str]:
        """The report for a terminal: one line per chain and per table, then the verdict."""
        lines = [
            f"chain {instance}: {count:,} entries"
            + (f" after checkpoint seq {self.since[instance]:,}" if instance in self.since else "")
            + f", head {self.heads.get(instance, GENESIS)}"
            for instance, count in self.chains.items()
        ]
        lines += [f"anchors {instance}: {count:,} checkpoints match" for instance, count in self.anchors.items()]
        lines += [f"GAP: {gap}" for gap in self.gaps]
        lines += [
            f"NOTE: instance {instance}: {count:,} entries without a record link after linked ones (a release before "
            "migration 0005 still writing): their order is not sealed"
            for instance, count in self.unlinked.items()
        ]
        if self.outside:
            lines.append(
                f"NOTE: {self.outside:,} entries link to entries this export does not hold (a filtered export): "
                "those links are not checked"
            )
        lines += [f"{table}: {count:,} rows match their latest audited version" for table, count in self.rows.items()]
        lines.append("audit trail verified" if self.broken is None else f"BROKEN: {self.broken.describe()}")
        return lines


class _Verifier:
    def __init__(
        self,
        database: Database,
        instance_id: str | None,
        progress: Progress,
        chunk: int,
        anchors: Anchors | None,
        since_last_anchor: bool,
        jobs: int = 1,
        ranges: dict[str, tuple[str | None, str | None]] | None = None,
        check_deletions: bool = True,
        parallel_from: int = PARALLEL_FROM_ROWS,
    ) -> None:
        self._db = database
        self._jobs = jobs
        self._parallel_from = parallel_from
        self._ranges = ranges or {}
        """Per table, the part of its keys whose rows are checked: after the first (``None``: from the first key, ``""``
        included), up to the second (``None``: to the last)."""
        self._check_deletions = check_deletions
        self.broken_at: tuple[int, int] | None = None
        self._instance = instance_id
        self._progress = progress
        self._chunk = chunk
        self._anchors = anchors
        self._since = since_last_anchor and anchors is not None
        self._touched: dict[str, set[str]] = {}
        """With ``since_last_anchor``: the keys written after the checkpoints, per entity (their rows are checked)."""
        self._done = 0
        self.report = VerifyReport()
        self._linked = True
        """Whether ``audit_log`` has ``key_prev_hash`` (a database before migration 0005 has not)."""
        self._first_linked: dict[str, int] = {}
        """Per chain, its first linked entry's seq, once asked for."""
        self._unlinked_before: dict[str, int] = {}
        """Per chain, a seq below which it has no linked entry, once asked for."""
        self._chunk_links_sql = text(
            CHUNK_LINKS_SQL.format(distinct="IS NOT" if database.is_sqlite else "IS DISTINCT FROM")
        )

    def _advance(self, count: int) -> None:
        self._done += count
        self._progress(self._done)

    async def run(self) -> VerifyReport:
        anchors = self._anchors
        if anchors is not None and anchors.problem is not None:
            line, problem = anchors.problem
            self.report.broken = Break(problem, anchor=line.describe())
            return self.report
        async with self._db.snapshot() as connection:
            self._linked = await self._has_links(connection)
            instances = await self._instances(connection)
            if anchors is not None:
                for instance in sorted(anchors.marks):
                    if instance not in instances and (self._instance is None or instance == self._instance):
                        line = _first(anchors.marks[instance])
                        self.report.broken = Break(
                            "its chain has no entry at all (the chain was deleted or renamed)",
                            instance_id=instance,
                            anchor=line.describe(),
                        )
                        return self.report
            workers = await self._rows_elsewhere(connection)
            # The children are read from the start: their progress counts while this process walks the chains.
            waits = [asyncio.ensure_future(worker.result(self._advance)) for worker in workers]
            try:
                for instance in instances:
                    if not await self._chain(connection, instance):
                        return self.report
                if workers:
                    self._conclude(await asyncio.gather(*waits))
                    return self.report
            finally:
                for worker in workers:  # every child killed before any wait
                    worker.kill()
                for wait in waits:
                    wait.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
                for worker in workers:
                    await worker.stop()
        await self.rows_and_deletions()
        return self.report

    async def _rows_elsewhere(self, connection: AsyncConnection) -> list[RowsWorker]:
        """With ``jobs`` > 1, the rows and deletions checks started in ``jobs - 1`` child processes
        (:mod:`.rows_worker`), each on its part of every table's keys, which run while this one walks the chains; none
        to run them here after the walk (one job, an in-memory database, or ``since_last_anchor``, whose rows are the
        keys the walk finds)."""
        if self._jobs < 2 or self._since or (self._db.is_sqlite and sqlite_path(self._db.settings.url) is None):
            return []
        parts = self._jobs - 1
        counted: dict[str, int] = {}
        bounds = {
            table.name: await self._split(connection, table, record, parts, counted) for table, record in _AUDITED
        }
        if sum(counted.values()) < self._parallel_from:
            return []
        workers: list[RowsWorker] = []
        try:
            for part in range(parts):
                ranges = {name: (cuts[part], cuts[part + 1]) for name, cuts in bounds.items()}
                workers.append(await RowsWorker.start(self._db.settings, self._instance, self._chunk, ranges, part))
        except BaseException:
            for worker in workers:
                worker.kill()
            for worker in workers:
                await worker.stop()
            raise
        return workers

    async def _split(
        self, connection: AsyncConnection, table: Table, record: type[Record], parts: int, counted: dict[str, int]
    ) -> list[str | None]:
        """``parts + 1`` cuts of ``table``'s keys into parts of about equal size: part ``i`` is the keys after cut
        ``i`` up to cut ``i + 1`` (the first cut ``None``: from the first key, ``""`` included; the last ``None``: to
        the last). Taken once, here, and handed to every child, so the parts cover every key exactly once whatever is
        written meanwhile."""
        key = table.c[record.key_field]
        counting = select(func.count()).select_from(table)
        keys = select(key)
        if self._instance is not None:  # the parts of that instance's rows, which are the ones checked
            counting = counting.where(table.c.instance_id == self._instance)
            keys = keys.where(table.c.instance_id == self._instance)
        count = counted[table.name] = int((await connection.execute(counting)).scalar_one())
        cuts: list[str | None] = [None]
        for part in range(1, parts):
            at = keys.order_by(key).limit(1).offset(max(count * part // parts - 1, 0))
            found = (await connection.execute(at)).scalar()
            # Too few keys for a cut here: this part holds nothing (it starts and ends at the cut before).
            cuts.append(str(found) if found is not None and count >= parts else (cuts[-1] or ""))
        cuts.append(None)
        return cuts

    def _conclude(self, results: list[tuple[dict[str, int], dict[str, Any] | None, tuple[int, int] | None]]) -> None:
        """Every child's rows counted, and the break the checks in one process would have named first: the earliest
        table, a row before a deletion, then the earliest part of the keys."""
        first: tuple[tuple[int, int, int], dict[str, Any]] | None = None
        for part, (rows, broken, where) in enumerate(results):
            for table, count in rows.items():
                self.report.rows[table] = self.report.rows.get(table, 0) + count
            if broken is not None and where is not None:
                position = (where[0], where[1], part)
                if first is None or position < first[0]:
                    first = (position, broken)
        if first is not None:
            self.report.broken = Break(**first[1])

    async def rows_and_deletions(self) -> None:
        """Passes 2 and 3: every row against its latest audited version, then every audited key's row present;
        :attr:`broken_at` says where a break was found (the table's index, 0 for a row or 1 for a deletion)."""
        for index, (table, record) in enumerate(_AUDITED):
            if not await self._each_row(table, record):
                self.broken_at = (index, 0)
                return
            if self._check_deletions and not await self._deletions(table, record):
                self.broken_at = (index, 1)
                return

    async def _instances(self, connection: AsyncConnection) -> list[str]:
        if self._instance is not None:
            return [self._instance]
        statement = select(audit_log.c.instance_id).distinct().order_by(audit_log.c.instance_id)
        return [str(value) for value in (await connection.execute(statement)).scalars()]

    async def _start(
        self, connection: AsyncConnection, instance: str, marks: dict[int, list[AnchorLine]]
    ) -> tuple[int, str, int] | None:
        """``since_last_anchor``: (seq, hash, id) of the newest checkpoint that still matches; ``None`` after a break.

        A newer checkpoint that does not match is a break; with none matching, the walk starts at the beginning.
        """
        statement = select(audit_log.c.id, audit_log.c.hash).where(
            audit_log.c.instance_id == instance, audit_log.c.seq == bindparam("seq")
        )
        for seq in sorted(marks, reverse=True):
            row = (await connection.execute(statement, {"seq": seq})).first()
            line = marks[seq][0]
            assert line.checkpoint is not None
            if row is not None and str(row[1]) == line.checkpoint.hash:
                self.report.since[instance] = seq
                self.report.anchors[instance] = 1
                return seq + 1, str(row[1]), int(row[0])
            if row is None:
                problem = f"there is no entry at seq {seq}: the chain ends before it (entries were deleted)"
            else:
                problem = _mismatch(seq, str(row[1]), line.checkpoint.hash)
            self.report.broken = Break(problem, instance_id=instance, seq=seq, anchor=line.describe())
            return None
        return 1, GENESIS, 0

    async def _entries(self, connection: AsyncConnection, instance: str, after: int) -> Sequence[Any]:
        """The next chunk of a chain after seq ``after``: (id, seq, entity, key, payload, recorded_at, prev, hash).

        On SQLite straight from the driver in one hop, ``recorded_at`` as stored (``YYYY-MM-DD HH:MM:SS.ffffff``,
        UTC: :func:`_canonical_at` slices it into its canonical text): the chain pass is mostly this and the hashes.
        """
        if self._db.is_sqlite:
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            sql = _SQLITE_CHAIN if self._linked else _SQLITE_UNLINKED_CHAIN
            rows: Sequence[Any] = await driver.execute_fetchall(sql, (instance, after, self._chunk))
            # aiosqlite's thread keeps its last result referenced until its next call ends: a trivial call now lets
            # this chunk be the only one alive while the next is fetched.
            await driver.execute_fetchall("SELECT 1")
            return rows
        # PostgreSQL: on the driver, recorded_at formatted by the server as its canonical text (no datetime made).
        driver = await driver_of(connection)
        sql = _POSTGRES_CHAIN if self._linked else _POSTGRES_UNLINKED_CHAIN
        rows = await driver.fetch(sql, instance, after, self._chunk)
        return rows

    async def _chain(self, connection: AsyncConnection, instance: str) -> bool:
        marks = self._anchors.marks.get(instance, {}) if self._anchors is not None else {}
        expected, previous, previous_id = 1, GENESIS, 0
        if self._since:
            begun = await self._start(connection, instance, marks)
            if begun is None:
                return False
            expected, previous, previous_id = begun
        # The recorded_at of seq 1 and of each entry after a checkpoint: how long entries waited for one.
        wanted = {1, *(seq + 1 for seq in marks)}
        written_at: dict[int, datetime] = {}
        matched = 0
        touched = self._touched
        self.report.chains[instance] = 0
        while True:
            rows = await self._entries(connection, instance, expected - 1)
            if not rows:
                break
            for entry_id, seq, entity, key, payload, recorded_at, prev_hash, digest, link in rows:
                problem = None
                if seq != expected:
                    missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected} to {seq - 1}"
                    problem = f"{missing} missing before it (a gap in the chain)"
                elif prev_hash != previous:
                    problem = f"prev_hash {prev_hash[:16]}… does not link to the hash of seq {seq - 1}"
                elif digest != entry_hash(
                    previous, header_text(instance, seq, entity, key, at := _canonical_at(recorded_at), link), payload
                ):
                    problem = "hash does not match the entry's contents (the entry was changed)"
                elif entry_id <= previous_id:
                    # The id orders a key's versions across chains: within one chain it rises with seq.
                    problem = f"its id {entry_id} is not after seq {seq - 1}'s ({previous_id}): the entry was moved"
                if problem is not None:
                    self.report.broken = Break(problem, entity, key, instance, seq)
                    return False
                if seq in marks:
                    for line in marks[seq]:
                        assert line.checkpoint is not None
                        if line.checkpoint.hash != digest:
                            problem = _mismatch(seq, digest, line.checkpoint.hash)
                            self.report.broken = Break(problem, entity, key, instance, seq, line.describe())
                            return False
                        matched += 1
                if seq in wanted:
                    written_at[seq] = datetime.fromisoformat(at[:-1] + "+00:00")
                if self._since:
                    touched.setdefault(entity, set()).add(key)
                expected, previous, previous_id = seq + 1, digest, entry_id
            if self._linked and not await self._chunk_links(connection, instance, rows[0][1] - 1, rows[-1][1]):
                return False
            self.report.chains[instance] += len(rows)
            self._advance(len(rows))
            del rows  # before the next chunk arrives: one chunk in memory at a time
        self.report.heads[instance] = previous
        if self._anchors is not None:
            last = expected - 1
            beyond = [seq for seq in marks if seq > last]
            if beyond:
                line = _first({seq: marks[seq] for seq in beyond})
                self.report.broken = Break(
                    f"the chain ends at seq {last}, before the checkpoint's seq (entries were deleted)",
                    instance_id=instance,
                    seq=last,
                    anchor=line.describe(),
                )
                return False
            self.report.anchors[instance] = self.report.anchors.get(instance, 0) + matched
            if not self._since:
                self.report.gaps += [
                    f"instance {instance!r}: {gap}"
                    for gap in unanchored_gaps(marks, written_at, last, self._anchors.interval, utc_now())
                ]
        return True

    @staticmethod
    async def _has_links(connection: AsyncConnection) -> bool:
        def columns(sync: Any) -> list[str]:
            return [str(column["name"]) for column in inspect(sync).get_columns("audit_log")]

        return "key_prev_hash" in await connection.run_sync(columns)

    async def _chunk_links(self, connection: AsyncConnection, instance: str, after: int, last: int) -> bool:
        """The entries of a chain after seq ``after`` up to ``last`` link to their records' entries before them
        (:data:`CHUNK_LINKS_SQL`); the first break."""
        while True:
            parameters = {"instance": instance, "after": after, "last": last}
            found = (await connection.execute(self._chunk_links_sql, parameters)).first()
            if found is None:
                return True
            entry_id, seq, entity, key, link = found
            if link is not None or await self._chain_linked_before(connection, instance, seq):
                break
            # An instance that has never linked an entry runs a release from before migration 0005 (a rolling
            # upgrade): its entries are hashed without a link, as that release writes them. Not a break.
            self.report.unlinked[instance] = self.report.unlinked.get(instance, 0) + 1
            after = seq
        prior = (
            await connection.execute(text(PRIOR_SQL), {"entity": entity, "natural_key": key, "id": entry_id})
        ).first()
        self.report.broken = _link_break(entity, key, instance, seq, link, *(prior or (None, None, None)))
        return False

    async def _chain_linked_before(self, connection: AsyncConnection, instance: str, seq: int) -> bool:
        """Whether ``instance``'s chain has a linked entry before ``seq`` (asked only of an unlinked entry that follows
        a linked entry of its record: rare, so one query each, answered from the first linked entry of the chain)."""
        known = self._first_linked.get(instance)
        if known is not None:
            return known < seq
        start = self._unlinked_before.get(instance, 0)  # no linked entry below this seq: not asked again
        if start >= seq:
            return False
        parameters = {"instance": instance, "start": start, "seq": seq}
        found = (await connection.execute(text(FIRST_LINKED_SQL), parameters)).scalar()
        if found is None:
            self._unlinked_before[instance] = seq
            return False
        self._first_linked[instance] = int(found)
        return True

    async def _latest(
        self, connection: AsyncConnection, entity: str, keys: Sequence[str]
    ) -> dict[str, tuple[int, str, int, str]]:
        """Per key: the latest entry's (id, instance_id, seq, payload); only those entries are read."""
        if self._db.is_sqlite:  # the keys as one JSON parameter: no statement with thousands of parameters to build
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            found = await driver.execute_fetchall(_SQLITE_LATEST, (entity, json.dumps(list(keys))))
            return {key: (entry_id, instance, seq, payload) for entry_id, key, instance, seq, payload in found}
        newest = (
            select(func.max(audit_log.c.id))
            .where(audit_log.c.entity == entity, audit_log.c.natural_key.in_(bindparam("keys", expanding=True)))
            .group_by(audit_log.c.natural_key)
        )
        statement = select(
            audit_log.c.id, audit_log.c.natural_key, audit_log.c.instance_id, audit_log.c.seq, audit_log.c.payload
        ).where(audit_log.c.id.in_(newest.scalar_subquery()))
        rows = (await connection.execute(statement, {"keys": list(keys)})).all()
        return {key: (entry_id, instance, seq, payload) for entry_id, key, instance, seq, payload in rows}

    async def _each_row(self, table: Table, record: type[Record]) -> bool:
        """Every row (or the touched keys') against its latest audited version."""
        if self._since:
            self.report.rows[table.name] = 0
            return await self._rows(table, record, sorted(self._touched.get(record.entity, ())))
        if not self._db.is_sqlite:
            return await self._each_row_postgres(table, record)
        # SQLite: SQLite itself compares each row with its latest version (its JSON read back into stored values),
        # in chunks; only rows it finds different (normally none) are decoded and compared here, to name the field.
        key = record.key_field
        after, upto = self._ranges.get(table.name, (None, None))
        fields = tuple(record.model_fields)
        one_instance = self._instance is not None
        statements = {
            start: _sqlite_comparison(table, fields, key, one_instance, upto is not None, start)
            for start in (False, True)
        }
        self.report.rows[table.name] = 0
        while True:
            statement = statements[after is None]
            parameters: tuple[Any, ...] = (record.entity,) if after is None else (record.entity, after)
            if upto is not None:
                parameters += (upto,)
            if self._instance is not None:
                parameters += (self._instance,)
            async with self._db.snapshot() as connection:
                raw = await connection.get_raw_connection()
                driver = raw.driver_connection
                assert driver is not None
                found = await driver.execute_fetchall(statement, (*parameters, self._chunk))
            if not found:
                return True
            for row in found:
                if type(row[0]) is not str:  # a BLOB (sorted after all text): written by hand, not by the sidecar
                    self.report.broken = Break(
                        f"the {table.name} row's {key} is not text but {type(row[0]).__name__} {row[0]!r} "
                        "(written outside the sidecar)",
                        record.entity,
                        repr(row[0]),
                    )
                    return False
            different = [str(row[0]) for row in found if not row[1]]
            if different and not await self._rows(table, record, different):
                return False
            after = str(found[-1][0])
            self.report.rows[table.name] += len(found)
            self._advance(len(found))

    async def _each_row_postgres(self, table: Table, record: type[Record]) -> bool:
        """PostgreSQL: the server compares each row with its latest version's values (:func:`_postgres_comparison`,
        one statement a chunk, on the driver); only rows it finds different (normally none) are checked again by
        :meth:`_rows`, which names what differs. A chunk whose versions the server cannot read as JSON values (a
        payload written by hand) is compared here instead, each row's canonical JSON against its payload."""
        fields = tuple(record.model_fields)
        key = record.key_field
        after, upto = self._ranges.get(table.name, (None, None))
        one_instance = self._instance is not None
        statements = {
            start: _postgres_comparison(table, fields, key, one_instance, upto is not None, start)
            for start in (False, True)
        }
        self.report.rows[table.name] = 0
        while True:
            parameters: tuple[Any, ...] = (record.entity, after, self._chunk)
            if self._instance is not None:
                parameters += (self._instance,)
            if upto is not None:
                parameters += (upto,)
            try:
                async with self._db.snapshot() as connection:
                    driver = await driver_of(connection)
                    found = [
                        (str(key_value), bool(same))
                        for key_value, same in await driver.fetch(statements[after is None], *parameters)
                    ]
            except asyncpg.DataError:  # a payload that is not JSON, or a value that is not its field's type
                found = await self._compare_in_python(table, record, parameters, upto is not None)
            if not found:
                return True
            different = [key_value for key_value, same in found if not same]
            if different and not await self._rows(table, record, different):
                return False
            after = found[-1][0]
            self.report.rows[table.name] += len(found)
            self._advance(len(found))

    async def _compare_in_python(
        self, table: Table, record: type[Record], parameters: tuple[Any, ...], bounded: bool
    ) -> list[tuple[str, bool]]:
        """One chunk of :meth:`_each_row_postgres` compared here: each row's canonical JSON against its latest
        version's payload, byte for byte."""
        fields = tuple(record.model_fields)
        encode = VersionEncoder(fields, column_kinds(table)).encode
        key = record.key_field
        columns = ", ".join(f't."{name}"' for name in fields)
        statement = _postgres_page(
            table,
            key,
            f"{columns}, t.instance_id, a.payload, a.instance_id",
            "payload, instance_id",
            self._instance is not None,
            bounded,
            start=parameters[1] is None,
        )
        key_index = fields.index(key)
        async with self._db.snapshot() as connection:
            driver = await driver_of(connection)
            rows = await driver.fetch(statement, *parameters)
        return [
            (str(row[key_index]), row[-2] is not None and row[-3] == row[-1] and row[-2] == encode(row)) for row in rows
        ]

    async def _rows(self, table: Table, record: type[Record], keys: list[str]) -> bool:
        """The rows of ``keys`` (those of them still present) decoded and compared with their latest audited
        versions, naming what differs; counted as checked with ``since_last_anchor`` (whose rows are these)."""
        fields = tuple(record.model_fields)
        reader = RowReader([table.c[name] for name in fields], record, sqlite=self._db.is_sqlite)
        encode = VersionEncoder(fields, column_kinds(table)).encode
        stored_text = _stored_encoder(table, fields) if self._db.is_sqlite else None
        key_column = table.c[record.key_field]
        statement = (
            select(*reader.columns, table.c.instance_id)
            .where(key_column.in_(bindparam("keys", expanding=True)))
            .order_by(key_column)
        )
        while keys:
            chunk, keys = keys[: self._chunk], keys[self._chunk :]
            async with self._db.snapshot() as connection:
                rows = (await connection.execute(statement, {"keys": chunk})).all()
                if not rows:
                    continue
                key_index = fields.index(record.key_field)
                latest = await self._latest(connection, record.entity, [str(row[key_index]) for row in rows])
                if stored_text is not None:
                    # Rows whose stored values spell exactly their latest audited version pass here; any other is
                    # decoded and compared below, which names what differs.
                    rows_left = []
                    for row in rows:
                        entry = latest.get(row[key_index])
                        try:
                            if entry is not None and entry[3] == stored_text(row) and row[-1] == entry[1]:
                                continue
                        except StoredValueNotAsWritten:
                            pass
                        rows_left.append(row)
                else:
                    rows_left = list(rows)
            for row in rows_left:  # in key order: the first that breaks is named, whatever the chunks
                key = str(row[key_index])
                try:
                    values = reader.decode(row[:-1]).__dict__
                except (ValueError, TypeError, ArithmeticError) as error:  # a stored value nothing writes
                    self.report.broken = Break(f"the {table.name} row cannot be read: {error}", record.entity, key)
                    return False
                self.report.broken = _row_break(
                    table.name, record.entity, key, encode(values), row[-1], latest.get(key)
                )
                if self.report.broken is not None:
                    return False
            if self._since:
                self.report.rows[table.name] += len(rows)
                self._advance(len(rows))
        return True

    async def _deletions(self, table: Table, record: type[Record]) -> bool:
        key_column = table.c[record.key_field]
        if not self._db.is_sqlite and not self._since:
            # One statement: the first audited key whose row is gone (an anti-join).
            anti_join = text(
                "SELECT DISTINCT a.natural_key FROM audit_log AS a WHERE a.entity = :entity"  # noqa: S608
                + (" AND a.instance_id = :instance" if self._instance is not None else "")
                + f' AND NOT EXISTS (SELECT 1 FROM "{table.name}" AS t '  # noqa: S608 - schema names only
                + f'WHERE t."{record.key_field}" = a.natural_key) ORDER BY a.natural_key LIMIT 1'
            )
            async with self._db.snapshot() as connection:
                values = {"entity": record.entity, "instance": self._instance}
                gone_key = (await connection.execute(anti_join, values)).scalar()
                if gone_key is None:
                    return True
                latest = await self._latest(connection, record.entity, [str(gone_key)])
            _, instance, seq, _ = latest[str(gone_key)]
            self.report.broken = Break(
                f"audited, but the {table.name} row is gone (deleted)", record.entity, str(gone_key), instance, seq
            )
            return False
        if self._db.is_sqlite and not self._since:
            # One statement: the first audited key whose row is gone, found by SQLite's own index walk.
            key = record.key_field
            missing_sql = (
                "SELECT DISTINCT a.natural_key FROM audit_log AS a WHERE a.entity = ?"  # noqa: S608 - schema names
                + (" AND a.instance_id = ?" if self._instance is not None else "")
                + f' AND NOT EXISTS (SELECT 1 FROM "{table.name}" AS t WHERE t."{key}" = a.natural_key)'  # noqa: S608
                + " ORDER BY a.natural_key LIMIT 1"
            )
            parameters = (record.entity,) if self._instance is None else (record.entity, self._instance)
            async with self._db.snapshot() as connection:
                raw = await connection.get_raw_connection()
                driver = raw.driver_connection
                assert driver is not None
                gone = await driver.execute_fetchall(missing_sql, parameters)
                if not gone:
                    return True
                latest = await self._latest(connection, record.entity, [str(gone[0][0])])
            _, instance, seq, _ = latest[str(gone[0][0])]
            self.report.broken = Break(
                f"audited, but the {table.name} row is gone (deleted)", record.entity, str(gone[0][0]), instance, seq
            )
            return False
        # ``since_last_anchor``: the keys written after the checkpoints, each still with its row.
        present = select(key_column).where(key_column.in_(bindparam("keys", expanding=True)))
        touched = sorted(self._touched.get(record.entity, ()))
        while touched:
            keys, touched = touched[: self._chunk], touched[self._chunk :]
            async with self._db.snapshot() as connection:
                found = {str(key) for key in (await connection.execute(present, {"keys": keys})).scalars()}
                missing = [key for key in keys if key not in found]
                if missing:
                    latest = await self._latest(connection, record.entity, missing[:1])
                    _, instance, seq, _ = latest[missing[0]]
                    self.report.broken = Break(
                        f"audited, but the {table.name} row is gone (deleted)", record.entity, missing[0], instance, seq
                    )
                    return False
        return True


def _row_break(
    table: str, entity: str, key: str, stored: str, instance: str, entry: tuple[int, str, int, str] | None
) -> Break | None:
    """How a row (its canonical JSON ``stored`` and its ``instance``) differs from its latest audited version
    ``entry`` (id, instance, seq, payload), if it does."""
    if entry is None:
        return Break("the row has no audited version (it was written outside the sidecar)", entity, key)
    _, audited_instance, seq, payload = entry
    if stored != payload:
        difference = _difference(json.loads(stored), json.loads(payload))
        return Break(
            f"the {table} row differs from its latest audited version: {difference}", entity, key, audited_instance, seq
        )
    if instance != audited_instance:
        return Break(
            f"the row's instance_id is {instance!r}, its latest audited version's {audited_instance!r}",
            entity,
            key,
            audited_instance,
            seq,
        )
    return None


def _postgres_comparison(
    table: Table, fields: Sequence[str], key: str, one_instance: bool, bounded: bool, start: bool
) -> str:
    """PostgreSQL SQL: per row after a key, its key and whether it equals its latest audited version (true) or not.

    The version's JSON values are read back as the columns' types (a decimal string as ``numeric``, a canonical
    timestamp as ``timestamptz``, text as text, any other value compared as JSON), compared with ``IS NOT DISTINCT
    FROM`` (NULL equals NULL); a row with no audited version, or another ``instance_id``, compares as false. A payload
    that is not JSON, or a value that is not its field's type, raises ``DataError``. Parameters: entity ($1), after
    ($2; with ``start`` it is NULL: from the first key), limit ($3)[, instance ($4)][, up to ($4 or $5)].
    """
    kinds = column_kinds(table)
    tests = ["a.id IS NOT NULL", "t.instance_id IS NOT DISTINCT FROM a.instance_id"]
    for name in fields:
        value = f"(a.j ->> '{name}')"
        if kinds[name] == "decimal":
            tests.append(f't."{name}" IS NOT DISTINCT FROM {value}::numeric')
        elif kinds[name] == "datetime":
            tests.append(f't."{name}" IS NOT DISTINCT FROM {value}::timestamptz')
        elif kinds[name] == "text":
            tests.append(f't."{name}" IS NOT DISTINCT FROM {value}')
        else:
            tests.append(f"COALESCE(to_jsonb(t.\"{name}\"), 'null'::jsonb) IS NOT DISTINCT FROM (a.j -> '{name}')")
    selected = f't."{key}", COALESCE({" AND ".join(tests)}, false)'
    return _postgres_page(table, key, selected, "id, instance_id, payload::jsonb AS j", one_instance, bounded, start)


def _postgres_page(
    table: Table, key: str, selected: str, version: str, one_instance: bool, bounded: bool, start: bool
) -> str:
    """PostgreSQL SQL: ``selected`` of one page of ``table``'s rows in key order, each joined (``a``) with
    ``version``'s columns of its latest audit entry. Parameters as :func:`_postgres_comparison`'s."""
    where = "$2::text IS NULL" if start else f't."{key}" > $2'
    where += " AND t.instance_id = $4" if one_instance else ""
    where += f' AND t."{key}" <= ${5 if one_instance else 4}' if bounded else ""
    return (
        f'SELECT {selected} FROM "{table.name}" AS t '  # noqa: S608 - schema names only
        f"LEFT JOIN LATERAL (SELECT {version} FROM audit_log "
        f'WHERE entity = $1 AND natural_key = t."{key}" ORDER BY id DESC LIMIT 1) AS a ON true '
        f'WHERE {where} ORDER BY t."{key}" LIMIT $3'
    )


def _sqlite_comparison(
    table: Table, fields: Sequence[str], key: str, one_instance: bool, bounded: bool, start: bool = False
) -> str:
    """SQLite SQL: per row after a key, its key and whether it equals its latest audited version (1) or not (0).

    The version's JSON values are turned back into what the row stores: a decimal string without its point is the
    stored scaled integer, a canonical timestamp with a space for ``T`` and no ``Z`` is the stored text, JSON
    ``true``/``false`` read back as 1/0; compared with ``IS`` (NULL equals NULL). A row with no audited version
    compares as 0. Parameters: entity, after (not with ``start``: from the first key, ``""`` included)[, up to
    (``bounded``)][, instance], limit.
    """
    kinds = column_kinds(table)
    tests = ["a.id IS NOT NULL", "t.instance_id IS a.instance_id"]
    for name in fields:
        value = f"json_extract(a.payload, '$.\"{name}\"')"
        if kinds[name] == "decimal":
            value = f"CAST(replace({value}, '.', '') AS INTEGER)"
        elif kinds[name] == "datetime":
            value = f"replace(replace({value}, 'T', ' '), 'Z', '')"
        tests.append(f't."{name}" IS {value}')
    where = " AND ".join(
        ([] if start else [f't."{key}" > ?'])
        + ([f't."{key}" <= ?'] if bounded else [])
        + (["t.instance_id = ?"] if one_instance else [])
    )
    return (
        f'SELECT t."{key}", ({" AND ".join(tests)}) FROM "{table.name}" AS t '  # noqa: S608 - schema names only
        "LEFT JOIN audit_log AS a ON a.id = "
        f'(SELECT max(id) FROM audit_log WHERE entity = ? AND natural_key = t."{key}") '
        f'WHERE {where or "1"} ORDER BY t."{key}" LIMIT ?'
    )


def _stored_decimal(value: Any) -> str:
    if type(value) is not int:  # None is handled before
        raise StoredValueNotAsWritten
    sign, value = ("-", -value) if value < 0 else ("", value)
    return f'"{sign}{value // 100_000_000}.{value % 100_000_000:08d}"'


def _stored_datetime(value: Any) -> str:
    if type(value) is not str or len(value) != 26:
        raise StoredValueNotAsWritten
    return f'"{value[:10]}T{value[11:]}Z"'


def _stored_string(value: Any) -> str:
    if type(value) is not str:
        raise StoredValueNotAsWritten
    return encode_basestring_ascii(value)


def _stored_integer(value: Any) -> str:
    if value is None:
        return "null"
    if type(value) is not int:
        raise StoredValueNotAsWritten
    return str(value)


def _stored_boolean(value: Any) -> str:
    if value is None:
        return "null"
    if value == 1 and type(value) is int:
        return "true"
    if value == 0 and type(value) is int:
        return "false"
    raise StoredValueNotAsWritten


def _stored_encoder(table: Table, fields: Sequence[str]) -> Callable[[Sequence[Any]], str]:
    """The canonical JSON of a version, straight from a SQLite row's stored values (``fields`` in that order).

    The same text :class:`~persistence.audit.chain.VersionEncoder` writes for the decoded record, without decoding:
    scaled integers, fixed-width timestamps and text turned into their canonical text directly. A value the sidecar
    would not have stored raises ``StoredValueNotAsWritten``. Generated once per table.
    """
    kinds = column_kinds(table)
    pieces: list[str] = []
    template = ""
    for index, name in enumerate(sorted(fields)):
        template += ("{" if index == 0 else ",") + json.dumps(name).replace("%", "%%") + ":%s"
        kind = kinds[name]
        if kind == "other":
            kind = "boolean" if isinstance(table.c[name].type, Boolean) else "integer"
        value = f"row[{fields.index(name)}]"
        if kind == "decimal":  # the common case inline: a non-negative scaled integer
            text = f"""('"%d.%08d"' % divmod(v, 100000000) if type(v := {value}) is int and v >= 0 else _decimal(v))"""
        elif kind == "datetime":
            text = (
                f"""('"' + v[:10] + 'T' + v[11:] + 'Z"' """
                f"if type(v := {value}) is str and len(v) == 26 else _datetime(v))"
            )
        elif kind == "text":
            text = f"(_e(v) if type(v := {value}) is str else _text(v))"
        else:
            text = f"_{kind}({value})"
        pieces.append(text if kind in ("integer", "boolean") else f"('null' if {value} is None else {text})")
    source = f"def encode(row):\n    return {template + '}'!r} % (" + ", ".join(pieces) + ",)\n"
    namespace: dict[str, Any] = {
        "_decimal": _stored_decimal,
        "_datetime": _stored_datetime,
        "_text": _stored_string,
        "_integer": _stored_integer,
        "_boolean": _stored_boolean,
        "_e": encode_basestring_ascii,
    }
    exec(compile(source, f"<stored {table.name}>", "exec"), namespace)  # noqa: S102
    encode: Callable[[Sequence[Any]], str] = namespace["encode"]
    return encode


def _canonical_at(value: Any) -> str:
    """An entry's ``recorded_at`` as its canonical text: a SQLite stored text sliced, PostgreSQL's canonical text
    (formatted by the server) as it is, a datetime formatted."""
    if type(value) is str and len(value) == 26:
        return f"{value[:10]}T{value[11:]}Z"
    if type(value) is str and len(value) == 27 and value[10] == "T" and value[-1] == "Z":
        return value
    if isinstance(value, datetime):
        return canonical_time(value)
    return _canonical_stored(value)


def _canonical_stored(stored: Any) -> str:
    """The canonical text of a SQLite timestamp not in the sidecar's fixed-width form (written by hand)."""
    try:
        return canonical_time(decode_datetime(str(stored)))
    except ValueError:
        return str(stored)  # not a timestamp: its hash will not match, and that is reported


def _link_break(
    entity: str,
    key: str,
    instance: str,
    seq: int,
    link: str | None,
    prior_instance: str | None,
    prior_seq: int | None,
    prior_hash: str | None,
) -> Break:
    """The break of an entry that does not link to its record's entry before it, with the entry before it."""
    if link is None:
        problem = (
            "it has no key_prev_hash, but an earlier entry of this record has one "
            "(the record's versions were reordered, or the link removed)"
        )
    elif prior_hash is None:
        problem = (
            f"its key_prev_hash {link[:16]}… links to an earlier entry, but it is the record's first entry by id "
            "(the record's versions were reordered, or its earlier entries deleted)"
        )
    else:
        problem = (
            f"its key_prev_hash {link[:16]}… does not link to the record's entry before it by id, seq {prior_seq} "
            f"of instance {prior_instance!r} (hash {prior_hash[:16]}…): the record's versions were reordered"
        )
    return Break(problem, str(entity), str(key), str(instance), int(seq))


def _first(marks: dict[int, list[AnchorLine]]) -> AnchorLine:
    """The checkpoint of the lowest seq among ``marks``."""
    return marks[min(marks)][0]


def _mismatch(seq: int, found: str, anchored: str) -> str:
    return (
        f"the entry at seq {seq} has hash {found[:16]}…, the checkpoint says {anchored[:16]}… "
        "(the chain was rewritten after it was anchored)"
    )


def _difference(stored: dict[str, Any], audited: dict[str, Any]) -> str:
    fields = sorted(set(stored) | set(audited))
    changed = [name for name in fields if stored.get(name) != audited.get(name)]
    return "; ".join(f"{name} is {stored.get(name)!r}, audited {audited.get(name)!r}" for name in changed[:3])


async def count_checks(database: Database, instance_id: str | None = None) -> int:
    """How many entries and rows :func:`verify` walks (one instance's, with ``instance_id``): its progress total."""
    total = 0
    async with database.read() as connection:
        for table in (audit_log, *(table for table, _ in _AUDITED)):
            statement = select(func.count()).select_from(table)
            if instance_id is not None:
                statement = statement.where(table.c.instance_id == instance_id)
            total += int((await connection.execute(statement)).scalar_one())
    return total


async def verify(
    database: Database,
    *,
    instance_id: str | None = None,
    progress: Progress = lambda done: None,
    chunk: int = CHUNK,
    anchors: Anchors | None = None,
    since_last_anchor: bool = False,
    jobs: int = 1,
    parallel_from: int | None = None,
) -> VerifyReport:
    """Check every chain (or ``instance_id``'s), every row against its latest audited version, and deletions.

    With ``anchors`` (:func:`~persistence.audit.anchors.load_anchors`) every checkpoint is held against its chain;
    with ``since_last_anchor`` too, only what follows each chain's newest matching checkpoint is checked. With
    ``jobs=N`` (N > 1) and at least ``parallel_from`` rows (default :data:`PARALLEL_FROM_ROWS`), the rows and
    deletions are checked by ``N - 1`` child processes, each on its part of every table's keys, while this one walks
    the chains (on two cores, about half the time); the report names the same break, a break in a chain still first.
    A child that cannot finish raises :class:`~persistence.errors.AuditVerifyError`.
    """
    verifier = _Verifier(
        database,
        instance_id,
        progress,
        chunk,
        anchors,
        since_last_anchor,
        jobs,
        parallel_from=PARALLEL_FROM_ROWS if parallel_from is None else parallel_from,
    )
    return await verifier.run()


async def rows_and_deletions(
    database: Database,
    instance_id: str | None,
    chunk: int,
    progress: Progress,
    ranges: dict[str, tuple[str | None, str | None]],
    check_deletions: bool,
) -> tuple[dict[str, int], Break | None, tuple[int, int] | None]:
    """Passes 2 and 3 of :func:`verify` on a part of each table's keys (``ranges``: after, up to), run by
    :mod:`.rows_worker`: rows checked per table, the first break and where it was found (see
    :meth:`_Verifier.rows_and_deletions`)."""
    verifier = _Verifier(database, instance_id, progress, chunk, None, False, 1, ranges, check_deletions)
    await verifier.rows_and_deletions()
    return verifier.report.rows, verifier.report.broken, verifier.broken_at


@dataclass(slots=True)
class _ChainState:
    expected: int = 1
    previous: str = GENESIS
    previous_id: int = 0
    count: int = 0
    matched: int = 0
    written_at: dict[int, datetime] = field(default_factory=dict)


def verify_export(path: Path, anchors: Anchors | None = None, progress: Progress = lambda done: None) -> VerifyReport:
    """Check an exported trail (``export audit --format jsonl``) and its checkpoints, without any database.

    The same chain checks as :func:`verify` (no gap, every link, every hash, ids rising within a chain, every record's
    links) and the same checkpoint checks; the current rows are not in an export, so they are not checked. Streams
    the file (blocking: run it in a thread); memory holds one line and each chain's last entry, and the record links
    are checked by SQLite in a temporary file (:data:`KEY_LINKS_SQL`), so memory stays bounded there too.
    """
    report = VerifyReport()
    if anchors is not None and anchors.problem is not None:
        unusable, why = anchors.problem
        report.broken = Break(why, anchor=unusable.describe())
        return report
    with tempfile.TemporaryDirectory(prefix="persistence-verify-") as folder:
        links = sqlite3.connect(Path(folder) / "links.db", isolation_level=None)
        try:
            links.execute("PRAGMA journal_mode=OFF")
            links.execute("PRAGMA synchronous=OFF")
            links.execute(
                "CREATE TABLE audit_log (id INTEGER, entity TEXT, natural_key TEXT, instance_id TEXT, "
                "seq INTEGER, key_prev_hash TEXT, hash TEXT)"
            )
            _export_chains(path, anchors, progress, report, links)
            if report.broken is None:
                _export_links(links, report)
        finally:
            links.close()
    return report


def _export_links(links: sqlite3.Connection, report: VerifyReport) -> None:
    """:func:`verify_export`'s check of the record links (:data:`KEY_LINKS_SQL`): the first break, or the notes."""
    links.execute("CREATE INDEX held ON audit_log (hash)")
    held = links.cursor()
    for entity, key, instance, seq, link, prior_instance, prior_seq, prior_hash, chain_linked in links.execute(
        KEY_LINKS_SQL
    ):
        if link is None:
            if chain_linked:
                report.broken = _link_break(entity, key, instance, seq, link, prior_instance, prior_seq, prior_hash)
                return
            report.unlinked[str(instance)] = report.unlinked.get(str(instance), 0) + 1
        elif link != GENESIS and held.execute("SELECT 1 FROM audit_log WHERE hash = ?", (link,)).fetchone() is None:
            report.outside += 1  # it links to an entry left out of this export: not checkable here
        else:
            report.broken = _link_break(entity, key, instance, seq, link, prior_instance, prior_seq, prior_hash)
            return


def _export_chains(
    path: Path, anchors: Anchors | None, progress: Progress, report: VerifyReport, links: sqlite3.Connection
) -> None:
    """:func:`verify_export`'s walk of the file: the chains and the checkpoints; each entry's record link copied into
    ``links`` (checked afterwards)."""
    marks = anchors.marks if anchors is not None else {}
    states: dict[str, _ChainState] = {}
    pending: list[tuple[Any, ...]] = []

    def flush() -> None:
        links.execute("BEGIN")
        links.executemany("INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?)", pending)
        links.execute("COMMIT")
        pending.clear()

    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
                entry_id, instance, seq = int(entry["id"]), str(entry["instance_id"]), int(entry["seq"])
                entity, key, payload = str(entry["entity"]), str(entry["natural_key"]), str(entry["payload"])
                prev_hash, digest, at = str(entry["prev_hash"]), str(entry["hash"]), str(entry["recorded_at"])
                link = entry.get("key_prev_hash")
                link = None if link is None else str(link)
                if len(at) != 27:
                    at = canonical_time(datetime.fromisoformat(at.replace("Z", "+00:00")))
            except (ValueError, KeyError, TypeError) as error:
                report.broken = Break(f"line {number} of {path} is not an exported audit entry ({error})")
                return
            state = states.get(instance)
            if state is None:
                state = states[instance] = _ChainState()
                report.chains[instance] = 0
            problem = None
            if seq != state.expected:
                missing = f"seq {state.expected}" if seq == state.expected + 1 else f"seq {state.expected} to {seq - 1}"
                problem = f"{missing} missing before it (a gap in the chain)"
            elif prev_hash != state.previous:
                problem = f"prev_hash {prev_hash[:16]}… does not link to the hash of seq {seq - 1}"
            elif digest != entry_hash(state.previous, header_text(instance, seq, entity, key, at, link), payload):
                problem = "hash does not match the entry's contents (the entry was changed)"
            elif entry_id <= state.previous_id:
                problem = f"its id {entry_id} is not after seq {seq - 1}'s ({state.previous_id}): the entry was moved"
            if problem is not None:
                report.broken = Break(problem, entity, key, instance, seq)
                return
            found = marks.get(instance, {}).get(seq)
            for line in found or ():
                assert line.checkpoint is not None
                if line.checkpoint.hash != digest:
                    report.broken = Break(
                        _mismatch(seq, digest, line.checkpoint.hash), entity, key, instance, seq, line.describe()
                    )
                    return
                state.matched += 1
            if seq == 1 or seq - 1 in marks.get(instance, {}):
                state.written_at[seq] = datetime.fromisoformat(at[:-1] + "+00:00")
            state.expected, state.previous, state.previous_id = seq + 1, digest, entry_id
            report.chains[instance] += 1
            state.count += 1
            pending.append((entry_id, entity, key, instance, seq, link, digest))
            if len(pending) >= CHUNK:
                flush()
            if state.count % CHUNK == 0:
                progress(sum(report.chains.values()))
    if pending:
        flush()
    for instance, state in states.items():
        report.heads[instance] = state.previous
    if anchors is None:
        return
    for instance in sorted(marks):
        state = states.get(instance)
        if state is None:
            report.broken = Break(
                "its chain has no entry in the export (deleted, renamed, or filtered out)",
                instance_id=instance,
                anchor=_first(marks[instance]).describe(),
            )
            return
        last = state.expected - 1
        beyond = {seq: found for seq, found in marks[instance].items() if seq > last}
        if beyond:
            report.broken = Break(
                f"the chain ends at seq {last}, before the checkpoint's seq (entries were deleted)",
                instance_id=instance,
                seq=last,
                anchor=_first(beyond).describe(),
            )
            return
        report.anchors[instance] = state.matched
        report.gaps += [
            f"instance {instance!r}: {gap}"
            for gap in unanchored_gaps(marks[instance], state.written_at, last, anchors.interval, utc_now())
        ]
