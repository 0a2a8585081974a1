"""Record links: each audit entry names the hash of its record's entry before it (by ``id``, whichever instance wrote
it), and the database checks a stretch of a chain against that, an index seek or two an entry.

:class:`ChainLinks` is the check ``audit verify`` runs on each stretch it walks; :data:`KEY_LINKS_SQL` is the same
check over a whole exported trail (window functions, on the offline check's temporary SQLite file).
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.audit.chain import GENESIS
from persistence.audit.report import Break

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


class ChainLinks:
    """The first entry of a stretch of a chain that does not link to its record's entry before it (:meth:`first_break`),
    on SQLite or PostgreSQL. ``unlinked`` counts, per instance, the entries without a link that are not breaks (a
    release before migration 0005 still writing): the report's."""

    def __init__(self, sqlite: bool, unlinked: dict[str, int]) -> None:
        self._sql = text(CHUNK_LINKS_SQL.format(distinct="IS NOT" if sqlite else "IS DISTINCT FROM"))
        self._unlinked = unlinked
        self._first_linked: dict[str, int] = {}
        """Per chain, its first linked entry's seq, once asked for."""
        self._unlinked_before: dict[str, int] = {}
        """Per chain, a seq below which it has no linked entry, once asked for."""

    async def first_break(self, connection: AsyncConnection, instance: str, after: int, last: int) -> Break | None:
        """The entries of ``instance``'s chain after seq ``after`` up to ``last`` link to their records' entries
        before them (:data:`CHUNK_LINKS_SQL`); the first break, if any."""
        while True:
            parameters = {"instance": instance, "after": after, "last": last}
            found = (await connection.execute(self._sql, parameters)).first()
            if found is None:
                return None
            entry_id, seq, entity, key, link = found
            if link is not None or await self._linked_before(connection, instance, seq):
                break
            # An instance that has never linked an entry runs a release from before migration 0005 (a rolling
            # upgrade): its entries are hashed without a link, as that release writes them. Not a break.
            self._unlinked[instance] = self._unlinked.get(instance, 0) + 1
            after = seq
        prior = (
            await connection.execute(text(PRIOR_SQL), {"entity": entity, "natural_key": key, "id": entry_id})
        ).first()
        return link_break(entity, key, instance, seq, link, *(prior or (None, None, None)))

    async def _linked_before(self, connection: AsyncConnection, instance: str, seq: int) -> bool:
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


def link_break(
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
