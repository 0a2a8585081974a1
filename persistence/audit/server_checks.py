"""The SQL with which PostgreSQL checks a trail itself, for ``audit verify``: the server does the work, on as many
backends as verify opens, and sends back only what Python must look at.

Both statements are filters. What they let through is checked again in Python (:func:`~persistence.audit.chain.
entry_problem`, the row decoded), which names what is wrong; what they hold back is what Python would have passed:

- :data:`STRETCH_SQL`: a stretch of a chain, each entry held to the one before it (gap, ``prev_hash``, id) and to its
  own hash, SHA-256 computed by the server over the header Python would write. Sent back: the stretch's first and
  last entries, any entry that fails, and any whose header the server cannot write as Python does.
- :func:`rows_comparison`: each row of a page, rendered by the server as the canonical JSON Python writes for it,
  held to its latest audited version's payload, byte for byte.

The server writes JSON as Python does where it can: ``to_json`` escapes ASCII as ``encode_basestring_ascii`` does
(but DEL), timestamps of the years 1 to 9999. Text with DEL or beyond ASCII, and other timestamps, are sent back to
Python, so a filter is never more lenient than Python. The statements run with :func:`for_verify`'s settings, so a
database's own settings (``standard_conforming_strings``, a ``search_path`` putting another ``=`` before the
built-in one) do not change what they compute; they trust the server's catalog, which the checks in Python, reading
plain values, did not need to.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy import BigInteger, Boolean, Integer, SmallInteger, Table, text
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.audit.trail import column_kinds
from persistence.db.engine import driver_of

_YEARS_1_TO_9999 = "{0} >= '0001-01-01 00:00:00+00'::timestamptz AND {0} < '10000-01-01 00:00:00+00'::timestamptz"
CANONICAL_TIME = (
    f"CASE WHEN {_YEARS_1_TO_9999} "
    """THEN to_char({0} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') END"""
)
"""A ``timestamptz`` as :func:`~persistence.audit.chain.canonical_time` writes it; ``NULL`` outside the years 1 to
9999, which Python cannot hold (``to_char`` would drop a BC era, and gives ``NULL`` for infinity)."""

_HEADER_SAFE = "octet_length({0}) = char_length({0}) AND strpos({0}, chr(127)) = 0"
"""A header value whose ``to_json`` is Python's ``encode_basestring_ascii``: every character below 0x7F (both escape
the quote, the backslash and control characters alike; Python also escapes DEL and all beyond ASCII)."""

_STRETCH = (
    "SELECT id, seq, entity, natural_key, payload, at, prev_hash, hash, key_prev_hash, p_seq, p_hash, p_id FROM ("  # noqa: S608 - fixed text
    "SELECT id, seq, entity, natural_key, payload, prev_hash, hash, key_prev_hash, "
    f"{CANONICAL_TIME.format('recorded_at')} AS at, "
    "lag(seq) OVER w AS p_seq, lag(hash) OVER w AS p_hash, lag(id) OVER w AS p_id, lead(seq) OVER w AS n_seq "
    "FROM (SELECT id, seq, entity, natural_key, payload, recorded_at, prev_hash, hash, {link} AS key_prev_hash "
    "FROM audit_log WHERE instance_id = $1 AND seq > $2 AND seq <= $3) AS stretch "
    "WINDOW w AS (ORDER BY seq)) AS e "
    "WHERE p_seq IS NULL OR n_seq IS NULL OR seq IS DISTINCT FROM p_seq + 1 OR prev_hash IS DISTINCT FROM p_hash "
    "OR id <= p_id "
    f"OR NOT ({_HEADER_SAFE.format('entity')} AND {_HEADER_SAFE.format('natural_key')} "
    f"AND (key_prev_hash IS NULL OR {_HEADER_SAFE.format('key_prev_hash')})) "
    "OR hash IS DISTINCT FROM encode(sha256(convert_to(prev_hash || E'\\n{{\"entity\":' || to_json(entity)::text "
    "|| ',\"instance_id\":' || $4 "
    "|| CASE WHEN key_prev_hash IS NULL THEN '' ELSE ',\"key_prev_hash\":' || to_json(key_prev_hash)::text END "
    '|| \',"natural_key":\' || to_json(natural_key)::text || \',"recorded_at":"\' || at || \'","seq":\' || seq '
    "|| E'}}\\n' || payload, 'UTF8')), 'hex') "
    "ORDER BY seq"
)
STRETCH_SQL = _STRETCH.format(link="key_prev_hash")
"""The entries of a chain's stretch that Python must see: (id, seq, entity, natural_key, payload, recorded_at as
canonical text, prev_hash, hash, key_prev_hash, and the entry before it in the stretch: its seq, hash and id, ``NULL``
for the first). Parameters: instance ($1), after seq ($2), up to seq ($3), the instance's JSON text as Python
writes it ($4)."""
UNLINKED_STRETCH_SQL = _STRETCH.format(link="NULL::varchar")
""":data:`STRETCH_SQL` on a database from before migration 0005 (no ``key_prev_hash`` column)."""

_PRINTABLE = "'^[ !#-\\[\\]-~]*$'"
"""Printable ASCII but the quote and the backslash: text that is its own JSON between quotes."""


def rows_comparison(
    table: Table, fields: Sequence[str], key: str, one_instance: bool, bounded: bool, start: bool
) -> str:
    """PostgreSQL SQL: the rows of a page of ``table`` (in key order) that may not be their latest audited version,
    and its last row: (key, whether it is (true) or may not be (false: Python decides), its place in the page).

    The row is written by the server as its canonical JSON (keys sorted, decimals as their eight-place text, timestamps
    as :data:`CANONICAL_TIME`, text quoted, escaped by ``to_json`` when it needs to be) and compared with the payload,
    and ``instance_id`` with the version's. A row with text beyond ASCII or DEL, or a timestamp outside the years 1 to
    9999, compares as false.

    The versions are read in key order beside the rows (the latest of a key is the one the next entry does not share
    its key with), bounded by the page's last key, so a page costs its own rows whichever join the planner picks.
    Parameters: entity ($1), after ($2; with ``start`` it is NULL: from the first key), limit ($3)[, instance
    ($4)][, up to ($4 or $5)].
    """
    kinds = column_kinds(table)
    pieces: list[str] = []
    escaped: list[str] = []
    texts: list[str] = []
    in_range: list[str] = []
    for index, name in enumerate(sorted(fields)):
        column = f't."{name}"'
        label = (("{" if index == 0 else ",") + json.dumps(name) + ":").replace("'", "''")
        if kinds[name] == "decimal":
            value = f"""'"' || {column}::text || '"'"""
        elif kinds[name] == "datetime":
            value = f"""'"' || {CANONICAL_TIME.format(column)} || '"'"""
            in_range.append(f"({column} IS NULL OR {_YEARS_1_TO_9999.format(column)})")
        elif kinds[name] == "text":
            value = f"""'"' || {column} || '"'"""
            texts.append(column)
            escaped.append(f"'{label}' || COALESCE(to_json({column})::text, 'null')")
        elif isinstance(table.c[name].type, Boolean | Integer | SmallInteger | BigInteger):
            value = f"{column}::text"
        else:
            raise TypeError(f"{table.name}.{name}: no canonical text for {table.c[name].type} on the server")
        pieces.append(f"'{label}' || COALESCE({value}, 'null')")
        if kinds[name] != "text":
            escaped.append(pieces[-1])
    rendered = f"{' || '.join(pieces)} || '}}'"
    if texts:
        # Printable ASCII but the quote and the backslash is its own JSON; other ASCII but DEL is written by to_json
        # as Python escapes it; text with DEL or beyond ASCII (NULL here) is left to Python, which is faster at it.
        every = f"concat({', '.join(texts)})"
        rendered = (
            f"CASE WHEN {every} ~ {_PRINTABLE} THEN {rendered} "
            f"WHEN {_HEADER_SAFE.format(every)} THEN {' || '.join(escaped)} || '}}' END"
        )
    tests = [f"a.payload = {rendered}", "t.instance_id IS NOT DISTINCT FROM a.instance_id", *in_range]
    where = ["$2::text IS NULL" if start else f't."{key}" > $2']
    if one_instance:
        where.append("t.instance_id = $4")
    if bounded:
        where.append(f't."{key}" <= ${5 if one_instance else 4}')
    rows_where = " AND ".join(where)
    versions_where = "entity = $1" + ("" if start else " AND natural_key > $2")
    last_key = (
        f'(SELECT max(k) FROM (SELECT t."{key}" AS k FROM "{table.name}" AS t '  # noqa: S608 - schema names only
        f'WHERE {rows_where} ORDER BY t."{key}" LIMIT $3) AS page)'
    )
    page = (
        f'SELECT t."{key}" AS k, COALESCE({" AND ".join(tests)}, false) AS same FROM "{table.name}" AS t '  # noqa: S608
        "LEFT JOIN (SELECT natural_key, instance_id, payload FROM ("
        "SELECT natural_key, instance_id, payload, lead(natural_key) OVER (ORDER BY natural_key, id) AS next_key "
        f"FROM audit_log WHERE {versions_where} AND natural_key <= {last_key}) AS versions "
        f'WHERE next_key IS DISTINCT FROM natural_key) AS a ON a.natural_key = t."{key}" '
        f'WHERE {rows_where} ORDER BY t."{key}" LIMIT $3'
    )
    # Only the rows Python must see travel, and the page's last (where the next page starts, and how many it held).
    return (
        "SELECT k, same, n FROM (SELECT k, same, row_number() OVER w AS n, lead(k) OVER w AS next "  # noqa: S608
        f"FROM ({page}) AS page WINDOW w AS (ORDER BY k)) AS counted WHERE NOT same OR next IS NULL ORDER BY k"
    )


async def for_verify(connection: AsyncConnection) -> None:
    """Settings for the rest of ``connection``'s transaction (``set_config(…, true)``, as ``SET LOCAL``), so that the
    statements here compute what they say whatever the database's own settings: the built-in operators and functions
    first on the search path, standard string literals, and no JIT compilation (these statements are cheap, but their
    estimated cost counts branches that run for almost no row, and compiling one took over a second, longer than
    running it)."""
    jit = ", set_config('jit', 'off', true)" if (await driver_of(connection)).get_server_version().major >= 11 else ""
    await connection.execute(
        text(
            "SELECT set_config('search_path', 'pg_catalog, ' || current_setting('search_path'), true), "
            f"set_config('standard_conforming_strings', 'on', true){jit}"
        )
    )
