"""The chain pass of ``audit verify`` on PostgreSQL, done by the server: a chain cut into stretches, each walked on a
connection of its own (all in one snapshot) so the server checks them side by side on every core it has.

Each stretch is read in chunks of seq numbers; the server checks every entry of a chunk (:data:`~persistence.audit.
server_checks.STRETCH_SQL`) and sends back the few Python must see, which :func:`~persistence.audit.chain.
entry_problem` checks against the entry before them. The first entry of a stretch is checked last, against the end of
the stretch before it (:func:`join`). Stretches start at multiples of the chunk, so the chunks are those of the walk in
one process, and the break named is the one it names: the first chunk with a problem; in it, the first entry that
fails or whose checkpoint does not match, else the first entry whose record link fails.
"""

from __future__ import annotations

import bisect
import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.audit.anchors import AnchorLine
from persistence.audit.chain import GENESIS, entry_problem
from persistence.audit.links import ChainLinks
from persistence.audit.report import Break, Progress, mismatch
from persistence.audit.server_checks import STRETCH_SQL, UNLINKED_STRETCH_SQL, for_verify
from persistence.db.engine import Database, driver_of
from persistence.errors import AuditVerifyError

ENTRY, CHECKPOINT, LINK = 0, 1, 2
"""The kinds of problem, in their order at one seq."""
_MARKS_SQL = (
    "SELECT seq, hash, entity, natural_key FROM audit_log WHERE instance_id = $1 AND seq = ANY($2::bigint[]) "
    "ORDER BY seq"
)
_NEXT_SQL = "SELECT min(seq) FROM audit_log WHERE instance_id = $1 AND seq > $2"
_SNAPSHOT_ID = re.compile(r"[0-9A-F]+-[0-9A-F]+(-[0-9]+)?")

End = tuple[int, str, int]
"""Where a walk stands after an entry: the next seq it expects, the entry's hash and its id."""
START: End = (1, GENESIS, 0)
"""Where a chain's walk starts."""
Found = tuple[tuple[int, int, int, int], Break]
"""A problem and where it ranks: (its chunk's first seq - 1, 1 for a record link else 0, seq, :data:`ENTRY` /
:data:`CHECKPOINT` / :data:`LINK`)."""


@dataclass(slots=True)
class Stretch:
    """What the walk of one stretch found."""

    first: Sequence[Any] | None = None
    """Its first entry, not yet checked against the entry before it (in the stretch before)."""
    first_chunk: int = 0
    """Where the chunk of its first entry starts (the seq before it)."""
    end: End | None = None
    """Where it ended (``None``: it holds no entry)."""
    count: int = 0
    matched: int = 0
    """Checkpoints that matched."""
    found: Found | None = None
    """The first problem found in it, assuming its first entry links to the stretch before."""


class StretchWalker:
    """Walks stretches of one database's chains (:meth:`walk`): ``chunk`` seq numbers a statement."""

    def __init__(self, links: ChainLinks | None, chunk: int, progress: Progress) -> None:
        self._links = links
        self._sql = STRETCH_SQL if links is not None else UNLINKED_STRETCH_SQL
        self._chunk = chunk
        self._progress = progress

    async def walk(
        self, connection: AsyncConnection, instance: str, after: int, last: int, marks: dict[int, list[AnchorLine]]
    ) -> Stretch:
        """The entries of ``instance``'s chain after seq ``after`` up to ``last``, held to each other, to their hashes,
        to ``marks`` (the chain's checkpoints) and to their records' entries before them."""
        driver = await driver_of(connection)
        quoted = encode_basestring_ascii(instance)
        marked = sorted(seq for seq in marks if after < seq <= last)
        stretch = Stretch()
        end: End | None = None
        while after < last:
            upto = min(after + self._chunk, last)
            rows = await driver.fetch(self._sql, instance, after, upto, quoted)
            if not rows:
                # Seq numbers no entry holds (a gap, or an entry given a far seq by hand): on to the next entry's chunk.
                following = await driver.fetchval(_NEXT_SQL, instance, upto)
                if following is None or following > last:
                    break
                after = max(upto, (following - 1) // self._chunk * self._chunk)
                continue
            found: Found | None = None
            for row in rows:
                if row[9] is not None:  # the entry before it is in this chunk
                    problem = entry_problem(row[9] + 1, row[10], row[11], instance, tuple(row)[:9], row[5])
                elif end is not None:
                    problem = entry_problem(*end, instance, tuple(row)[:9], row[5])
                else:
                    stretch.first, stretch.first_chunk, problem = tuple(row)[:9], after, None
                if problem is not None:
                    found = ((after, 0, row[1], ENTRY), Break(problem, row[2], row[3], instance, row[1]))
                    break
            found = await self._checkpoints(driver, instance, after, upto, marked, marks, stretch, found)
            if found is None and self._links is not None:
                broken = await self._links.first_break(connection, instance, after, upto)
                if broken is not None:
                    found = ((after, 1, int(broken.seq or 0), LINK), broken)
            if found is not None:
                stretch.found = found
                return stretch
            end = (rows[-1][1] + 1, rows[-1][7], rows[-1][0])
            stretch.count += rows[-1][1] - rows[0][1] + 1  # no gap: every seq from the first to the last
            self._progress(rows[-1][1] - rows[0][1] + 1)
            after = upto
        stretch.end = end
        return stretch

    @staticmethod
    async def _checkpoints(
        driver: Any,
        instance: str,
        after: int,
        upto: int,
        marked: list[int],
        marks: dict[int, list[AnchorLine]],
        stretch: Stretch,
        found: Found | None,
    ) -> Found | None:
        """The checkpoints of seq after ``after`` up to ``upto`` (below an entry's problem) held to their entries'
        hashes; the first that does not match, or ``found``. A checkpoint whose entry is missing is left to the
        chain (a gap, or the chain ending before it)."""
        below = found[0][2] if found is not None else upto + 1
        seqs = marked[bisect.bisect_right(marked, after) : bisect.bisect_left(marked, below)]
        if not seqs:
            return found
        for seq, digest, entity, key in await driver.fetch(_MARKS_SQL, instance, seqs):
            for line in marks[seq]:
                assert line.checkpoint is not None
                if line.checkpoint.hash != digest:
                    problem = mismatch(seq, digest, line.checkpoint.hash)
                    return (after, 0, seq, CHECKPOINT), Break(problem, entity, key, instance, seq, line.describe())
                stretch.matched += 1
        return found


def join(instance: str, stretches: Sequence[Stretch]) -> tuple[End, int, Found | None]:
    """The stretches of one chain in order, each first entry checked against the end of the stretch before: where the
    chain ends, the checkpoints matched and its first problem."""
    end, matched, first = START, 0, None
    for stretch in stretches:
        found = [stretch.found] if stretch.found is not None else []
        if stretch.first is not None:
            row = stretch.first
            problem = entry_problem(*end, instance, tuple(row)[:9], row[5])
            if problem is not None:
                where = (stretch.first_chunk, 0, row[1], ENTRY)
                found.append((where, Break(problem, row[2], row[3], instance, row[1])))
        for candidate in found:
            if first is None or candidate[0] < first[0]:
                first = candidate
        matched += stretch.matched
        if stretch.end is not None:
            end = stretch.end
    return end, matched, first


@contextlib.asynccontextmanager
async def beside(database: Database, connection: AsyncConnection, count: int) -> AsyncIterator[list[AsyncConnection]]:
    """``count`` more PostgreSQL connections that see ``connection``'s snapshot (``pg_export_snapshot``)."""
    if count < 1:
        yield []
        return
    snapshot = str((await connection.execute(text("SELECT pg_export_snapshot()"))).scalar_one())
    if not _SNAPSHOT_ID.fullmatch(snapshot):
        raise AuditVerifyError(f"PostgreSQL exported a snapshot id verify cannot use: {snapshot!r}")
    async with contextlib.AsyncExitStack() as stack:
        others = []
        for _ in range(count):
            other = await stack.enter_async_context(database.snapshot())
            await other.execute(text(f"SET TRANSACTION SNAPSHOT '{snapshot}'"))
            await for_verify(other)
            others.append(other)
        yield others
