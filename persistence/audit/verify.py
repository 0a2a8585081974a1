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

On PostgreSQL the server does passes 1 and 2 itself and sends back only what may be wrong, which is checked again
here (:mod:`.server_checks`); a chain is walked in stretches side by side (:mod:`.stretches`).

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

from sqlalchemy import Boolean, Table, bindparam, func, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.audit.anchors import AnchorLine, Anchors, unanchored_gaps
from persistence.audit.chain import GENESIS, VersionEncoder, canonical_time, entry_problem
from persistence.audit.links import KEY_LINKS_SQL, ChainLinks, link_break
from persistence.audit.report import Break, Progress, VerifyReport, mismatch
from persistence.audit.rows_worker import RowsWorker
from persistence.audit.server_checks import CANONICAL_TIME, for_verify, rows_comparison
from persistence.audit.stretches import StretchWalker, beside, join
from persistence.audit.trail import column_kinds
from persistence.db.columns import decode_datetime
from persistence.db.engine import Database, driver_of, sqlite_path
from persistence.db.rowcodec import RowReader
from persistence.db.schema import TABLE_OF, audit_log
from persistence.errors import AuditVerifyError, StoredValueNotAsWritten
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
    f"SELECT id, seq, entity, natural_key, payload, {CANONICAL_TIME.format('recorded_at')}, "  # noqa: S608 - fixed
    "prev_hash, hash, key_prev_hash "
    "FROM audit_log WHERE instance_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
)
_POSTGRES_UNLINKED_CHAIN = _POSTGRES_CHAIN.replace("key_prev_hash", "NULL")
"""The chain's query on a database from before migration 0005 (no links)."""
_POSTGRES_WRITTEN_AT = (
    f"SELECT seq, {CANONICAL_TIME.format('recorded_at')} FROM audit_log "  # noqa: S608 - fixed text
    "WHERE instance_id = $1 AND seq = ANY($2::bigint[])"
)
"""The canonical ``recorded_at`` of some entries of a chain."""
_SQLITE_LATEST = (
    "SELECT id, natural_key, instance_id, seq, payload FROM audit_log WHERE id IN ("
    "SELECT max(id) FROM audit_log WHERE entity = ? AND natural_key IN (SELECT value FROM json_each(?)) "
    "GROUP BY natural_key)"
)


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
        self._links = ChainLinks(database.is_sqlite, self.report.unlinked)

    def _advance(self, count: int) -> None:
        self._done += count
        self._progress(self._done)

    async def run(self) -> VerifyReport:
        anchors = self._anchors
        if _anchor_files_break(self.report, anchors):
            return self.report
        async with self._db.snapshot() as connection:
            if not self._db.is_sqlite:
                await for_verify(connection)
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
                    walked = (
                        await self._chain(connection, instance)
                        if self._db.is_sqlite or self._since
                        else await self._chain_on_server(connection, instance)
                    )
                    if not walked:
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
            # Every checkpoint of that seq must match, not only the first: two lines may contradict each other.
            for line in marks[seq]:
                assert line.checkpoint is not None
                if row is not None and str(row[1]) == line.checkpoint.hash:
                    continue
                if row is None:
                    problem = f"there is no entry at seq {seq}: the chain ends before it (entries were deleted)"
                else:
                    problem = mismatch(seq, str(row[1]), line.checkpoint.hash)
                self.report.broken = Break(problem, instance_id=instance, seq=seq, anchor=line.describe())
                return None
            assert row is not None
            self.report.since[instance] = seq
            self.report.anchors[instance] = len(marks[seq])
            return seq + 1, str(row[1]), int(row[0])
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
            for row in rows:
                entry_id, seq, entity, key, _, recorded_at, _, digest, _ = row
                at = _canonical_at(recorded_at)
                problem = entry_problem(expected, previous, previous_id, instance, row, at)
                if problem is not None:
                    self.report.broken = Break(problem, entity, key, instance, seq)
                    return False
                if seq in marks:
                    for line in marks[seq]:
                        assert line.checkpoint is not None
                        if line.checkpoint.hash != digest:
                            problem = mismatch(seq, digest, line.checkpoint.hash)
                            self.report.broken = Break(problem, entity, key, instance, seq, line.describe())
                            return False
                        matched += 1
                if seq in wanted:
                    written_at[seq] = datetime.fromisoformat(at[:-1] + "+00:00")
                if self._since:
                    touched.setdefault(entity, set()).add(key)
                expected, previous, previous_id = seq + 1, digest, entry_id
            if self._linked:
                broken = await self._links.first_break(connection, instance, rows[0][1] - 1, rows[-1][1])
                if broken is not None:
                    self.report.broken = broken
                    return False
            self.report.chains[instance] += len(rows)
            self._advance(len(rows))
            del rows  # before the next chunk arrives: one chunk in memory at a time
        self.report.heads[instance] = previous
        return self._ends(instance, marks, expected - 1, matched, written_at)

    async def _chain_on_server(self, connection: AsyncConnection, instance: str) -> bool:
        """PostgreSQL: the chain cut into up to ``jobs`` stretches, checked side by side by the server
        (:mod:`.stretches`), each on a connection in this one's snapshot."""
        marks = self._anchors.marks.get(instance, {}) if self._anchors is not None else {}
        last_seq = select(func.max(audit_log.c.seq)).where(audit_log.c.instance_id == instance)
        last = int((await connection.execute(last_seq)).scalar() or 0)
        chunks = -(-last // self._chunk)
        parts = max(1, min(self._jobs, self._db.settings.pool_size, chunks))
        # At multiples of the chunk: the chunks, and so the break named, are those of the walk in one process.
        cuts = [min(chunks * part // parts * self._chunk, last) for part in range(parts + 1)]
        walker = StretchWalker(self._links if self._linked else None, self._chunk, self._advance)
        async with beside(self._db, connection, parts - 1) as others, asyncio.TaskGroup() as group:
            walks = [
                group.create_task(walker.walk(each, instance, cuts[part], cuts[part + 1], marks))
                for part, each in enumerate([connection, *others])
            ]
        stretches = [walk.result() for walk in walks]
        end, matched, found = join(instance, stretches)
        if found is not None:
            self.report.chains[instance] = found[0][0]  # as the walk in one process counts: the chunks before the break
            self.report.broken = found[1]
            return False
        self.report.chains[instance] = sum(stretch.count for stretch in stretches)
        self.report.heads[instance] = end[1]
        written_at: dict[int, datetime] = {}
        if marks:
            wanted = sorted(seq for seq in {1, *(seq + 1 for seq in marks)} if seq < end[0])
            driver = await driver_of(connection)
            for seq, at in await driver.fetch(_POSTGRES_WRITTEN_AT, instance, wanted):
                written_at[seq] = datetime.fromisoformat(at[:-1] + "+00:00")
        return self._ends(instance, marks, end[0] - 1, matched, written_at)

    def _ends(
        self,
        instance: str,
        marks: dict[int, list[AnchorLine]],
        last: int,
        matched: int,
        written_at: dict[int, datetime],
    ) -> bool:
        """A chain walked up to seq ``last`` without a break, held to its checkpoints: none beyond its end (a deleted
        tail); the checkpoints matched counted, and where entries waited too long for one reported."""
        if self._anchors is None:
            return True
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
        """PostgreSQL: the server compares each row with its latest version's payload (:func:`~persistence.audit.
        server_checks.rows_comparison`, one statement a chunk, on the driver); only rows it does not find equal
        (normally none) are checked again by :meth:`_rows`, which names what differs."""
        fields = tuple(record.model_fields)
        key = record.key_field
        after, upto = self._ranges.get(table.name, (None, None))
        one_instance = self._instance is not None
        statements = {
            start: rows_comparison(table, fields, key, one_instance, upto is not None, start) for start in (False, True)
        }
        self.report.rows[table.name] = 0
        while True:
            parameters: tuple[Any, ...] = (record.entity, after, self._chunk)
            if self._instance is not None:
                parameters += (self._instance,)
            if upto is not None:
                parameters += (upto,)
            async with self._db.snapshot() as connection:
                await for_verify(connection)
                driver = await driver_of(connection)
                found = await driver.fetch(statements[after is None], *parameters)
            if not found:
                return True
            different = [str(key_value) for key_value, same, _ in found if not same]
            if different and not await self._rows(table, record, different):
                return False
            after, count = str(found[-1][0]), int(found[-1][2])
            self.report.rows[table.name] += count
            self._advance(count)

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
                if not self._db.is_sqlite:
                    await for_verify(connection)
                try:
                    rows = (await connection.execute(statement, {"keys": chunk})).all()
                except OverflowError:  # a value the driver cannot read (asyncpg: a time outside the years 1 to 9999)
                    return await self._unreadable(table, record, sorted(chunk), statement)
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

    async def _unreadable(self, table: Table, record: type[Record], keys: list[str], statement: Any) -> bool:
        """``keys`` (in order) of which a row the driver cannot read: the rows before the first such one checked as
        usual, then that one named."""
        for index, key in enumerate(keys):
            async with self._db.snapshot() as connection:
                if not self._db.is_sqlite:
                    await for_verify(connection)
                try:
                    await connection.execute(statement, {"keys": [key]})
                except OverflowError as error:
                    if not await self._rows(table, record, keys[:index]):
                        return False
                    self.report.broken = Break(f"the {table.name} row cannot be read: {error}", record.entity, key)
                    return False
        raise AuditVerifyError(f"{table.name}: {len(keys)} rows could not be read together, yet each can alone")

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
                await for_verify(connection)
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
    if value is None:  # PostgreSQL's text of a time outside the years 1 to 9999 (:data:`CANONICAL_TIME`)
        return ""
    return _canonical_stored(value)


def _canonical_stored(stored: Any) -> str:
    """The canonical text of a SQLite timestamp not in the sidecar's fixed-width form (written by hand)."""
    try:
        return canonical_time(decode_datetime(str(stored)))
    except ValueError:
        return str(stored)  # not a timestamp: its hash will not match, and that is reported


def _first(marks: dict[int, list[AnchorLine]]) -> AnchorLine:
    """The checkpoint of the lowest seq among ``marks``."""
    return marks[min(marks)][0]


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
    A child that cannot finish raises :class:`~persistence.errors.AuditVerifyError`. On PostgreSQL the server checks
    the hashes and rows itself (:mod:`.server_checks`), each chain in up to ``N`` stretches side by side
    (:mod:`.stretches`).
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


def _anchor_files_break(report: VerifyReport, anchors: Anchors | None) -> bool:
    """Put in ``report`` what the anchor files hold beside their checkpoints (lines cut short, unsigned lines from
    before signing began); ``True``, with the break, when one of their lines cannot be trusted on its own."""
    if anchors is None:
        return False
    report.cut_short = [line.where for line in anchors.cut_short]
    report.unsigned = anchors.unsigned
    if anchors.problem is None:
        return False
    line, problem = anchors.problem
    report.broken = Break(problem, anchor=line.describe())
    return True


def verify_export(path: Path, anchors: Anchors | None = None, progress: Progress = lambda done: None) -> VerifyReport:
    """Check an exported trail (``export audit --format jsonl``) and its checkpoints, without any database.

    The same chain checks as :func:`verify` (no gap, every link, every hash, ids rising within a chain, every record's
    links) and the same checkpoint checks; the current rows are not in an export, so they are not checked. Streams
    the file (blocking: run it in a thread); memory holds one line and each chain's last entry, and the record links
    are checked by SQLite in a temporary file (:data:`KEY_LINKS_SQL`), so memory stays bounded there too.
    """
    report = VerifyReport()
    if _anchor_files_break(report, anchors):
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
                report.broken = link_break(entity, key, instance, seq, link, prior_instance, prior_seq, prior_hash)
                return
            report.unlinked[str(instance)] = report.unlinked.get(str(instance), 0) + 1
        elif link != GENESIS and held.execute("SELECT 1 FROM audit_log WHERE hash = ?", (link,)).fetchone() is None:
            report.outside += 1  # it links to an entry left out of this export: not checkable here
        else:
            report.broken = link_break(entity, key, instance, seq, link, prior_instance, prior_seq, prior_hash)
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

    entries = 0
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
            except (ValueError, KeyError, TypeError, RecursionError) as error:
                if not entries:  # another format (Parquet, CSV) or another file: nothing to check, no verdict
                    raise AuditVerifyError(
                        f"{path} is not an audit trail exported as JSON Lines (line {number}: {error}); "
                        "export it with `export audit --format jsonl`"
                    ) from None
                if not raw.endswith(b"\n"):  # the last line, unfinished
                    raise AuditVerifyError(
                        f"{path} ends in the middle of its line {number}: the export was cut short or copied while "
                        "it was written; export it again"
                    ) from None
                report.broken = Break(f"line {number} of {path} is not an exported audit entry ({error})")
                return
            entries += 1
            state = states.get(instance)
            if state is None:
                state = states[instance] = _ChainState()
                report.chains[instance] = 0
            problem = entry_problem(
                state.expected,
                state.previous,
                state.previous_id,
                instance,
                (entry_id, seq, entity, key, payload, at, prev_hash, digest, link),
                at,
            )
            if problem is not None:
                report.broken = Break(problem, entity, key, instance, seq)
                return
            found = marks.get(instance, {}).get(seq)
            for line in found or ():
                assert line.checkpoint is not None
                if line.checkpoint.hash != digest:
                    report.broken = Break(
                        mismatch(seq, digest, line.checkpoint.hash), entity, key, instance, seq, line.describe()
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
