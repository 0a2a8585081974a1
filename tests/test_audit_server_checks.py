"""``audit verify`` on PostgreSQL, where the server checks the trail itself (:mod:`persistence.audit.server_checks`,
:mod:`persistence.audit.stretches`): its filters hold back only what Python would pass, and send back everything
else; the chain cut into stretches walked side by side names the break the walk in one process names, whatever the
chunk and the number of stretches."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from decimal import Decimal
from typing import Any
from unittest import mock

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from persistence.audit import verify as verify_module
from persistence.audit.chain import VersionEncoder
from persistence.audit.report import VerifyReport
from persistence.audit.server_checks import STRETCH_SQL, rows_comparison
from persistence.audit.stretches import beside
from persistence.audit.trail import column_kinds
from persistence.audit.verify import verify
from persistence.db.engine import Database, create_database
from persistence.db.schema import trades
from persistence.records.models import Trade
from persistence.tables.repositories import Repositories
from tests.support.audit import closed_version, tamper
from tests.support.databases import make_settings
from tests.support.factories import make_trade

pytestmark = pytest.mark.postgres


@pytest.fixture
def database_url(postgres_url: str) -> str:
    return postgres_url


async def connect(database_url: str) -> asyncpg.Connection:
    url = make_url(database_url)
    return await asyncpg.connect(host=url.host, port=url.port or 5432, user=url.username, database=url.database)


TRICKY_TEXT = [
    # Every ASCII character but NUL (in two: a field holds 64), each escaped or not as Python does.
    "".join(chr(code) for code in range(1, 64)),
    "".join(chr(code) for code in range(64, 128)),
    'a "quoted" \\ back\\slash',
    "flag é € 😀",
    "tab\there, new\nline, DEL\x7f",
]


async def tricky_trail(repos: Repositories) -> list[Trade]:
    """Trades whose text needs every kind of escaping, two of them in two versions, and plain ones."""
    saved = []
    for n, value in enumerate(TRICKY_TEXT):
        trade = make_trade(trade_id=f"T-TRICKY-{n}", pattern_type=value, symbol=value[:16] or "EURUSD")
        saved.append(trade)
        await repos.trades.save_trade(trade)
    for trade in saved[:2]:
        await repos.trades.save_trade(closed_version(trade, 60, "-12.5"))
    for n in range(10):
        await repos.trades.save_trade(make_trade(trade_id=f"T-PLAIN-{n:02d}"))
    return saved


async def compared(database_url: str) -> dict[str, bool]:
    """Each trade's key and whether the server's rows filter holds it equal to its latest version (one page)."""
    statement = rows_comparison(trades, tuple(Trade.model_fields), "trade_id", False, False, True)
    connection = await connect(database_url)
    try:
        rows = await connection.fetch(statement.replace("NOT same OR next IS NULL", "true"), "trade", None, 1000)
    finally:
        await connection.close()
    return {str(key): bool(same) for key, same, _ in rows}


async def test_the_rows_filter_holds_every_ascii_row_the_sidecar_wrote_equal_to_its_version(
    database: Database, database_url: str
) -> None:
    """Text of every ASCII character but DEL, quotes, backslashes and ``NULL``: the server writes each row as Python
    does, so none is left to the slower check in Python. Text with DEL or beyond ASCII is (Python is faster at it)."""
    await tricky_trail(Repositories(database))
    found = await compared(database_url)
    left = {f"T-TRICKY-{n}" for n, value in enumerate(TRICKY_TEXT) if any(ord(char) >= 127 for char in value)}
    assert len(found) == len(TRICKY_TEXT) + 10 and left == {"T-TRICKY-1", "T-TRICKY-3", "T-TRICKY-4"}
    assert {key for key, same in found.items() if not same} == left
    assert (await verify(database)).ok


async def test_to_json_escapes_ascii_as_python_does(database_url: str) -> None:
    """What the filters rely on: below DEL, ``to_json`` writes text exactly as ``encode_basestring_ascii``."""
    from json.encoder import encode_basestring_ascii

    values = ["", *(chr(code) for code in range(1, 127)), "".join(map(chr, range(1, 127)))]
    connection = await connect(database_url)
    try:
        found = await connection.fetch("SELECT v, to_json(v)::text FROM unnest($1::text[]) AS t(v)", values)
    finally:
        await connection.close()
    assert [escaped for _, escaped in found] == [encode_basestring_ascii(value) for value in values]


PAYLOAD_VARIANTS = [
    # The same values as JSON, but not the bytes Python writes: each is a difference Python reports.
    pytest.param(("\\u00e9", "é"), id="raw-non-ascii"),
    pytest.param(("\\u00e9", "\\u00E9"), id="uppercase-escape"),
    pytest.param(('"pnl":"-12.50000000"', '"pnl":"-12.5"'), id="decimal-places"),
    pytest.param(('"pnl":"-12.50000000"', '"pnl":-12.5'), id="decimal-as-number"),
    pytest.param(('Z"', '+00:00"'), id="timestamp-offset"),
    pytest.param(('{"account_id":null,', '{"account_id": null,'), id="a-space"),
    pytest.param(('"direction":"BUY"', '"direction":"B\\u0055Y"'), id="needless-escape"),
    pytest.param(('"account_id":null', '"account_id":""'), id="null-as-empty"),
]


@pytest.mark.parametrize("variant", PAYLOAD_VARIANTS)
async def test_the_rows_filter_never_passes_a_payload_python_would_not(
    database: Database, database_url: str, variant: tuple[str, str]
) -> None:
    old, new = variant
    trade = make_trade(trade_id="T-VARIANT", pattern_type="flag é", pnl=Decimal("-12.5"))
    await Repositories(database).trades.save_trade(trade)
    encoded = VersionEncoder(tuple(Trade.model_fields), column_kinds(trades)).encode(trade.__dict__)
    assert old in encoded
    await tamper(database_url, f"UPDATE audit_log SET payload = replace(payload, '{old}', '{new}')")
    assert (await compared(database_url))["T-VARIANT"] is False
    broken = (await verify(database)).broken  # and verify names it (the hash breaks first: the payload was edited)
    assert broken is not None and broken.natural_key == "T-VARIANT"


async def test_an_infinite_timestamp_is_left_to_python(database: Database, database_url: str) -> None:
    """The server cannot write ``infinity`` as Python does (``to_char`` gives ``NULL``, which must not read as
    ``null``): the row goes to the check in Python, which reports it."""
    await Repositories(database).trades.save_trade(make_trade(trade_id="T-OPEN"))
    await tamper(database_url, "UPDATE trades SET exit_time = 'infinity' WHERE trade_id = 'T-OPEN'")
    assert (await compared(database_url))["T-OPEN"] is False
    broken = (await verify(database)).broken
    assert broken is not None and broken.natural_key == "T-OPEN" and "exit_time" in broken.problem


@pytest.mark.parametrize(
    "moved",
    [
        pytest.param("((entry_time AT TIME ZONE 'UTC')::text || '+00 BC')::timestamptz", id="same-date-bc"),
        pytest.param("entry_time + interval '8000 years'", id="after-9999"),
    ],
)
async def test_a_time_python_cannot_hold_is_left_to_python(database: Database, database_url: str, moved: str) -> None:
    """``to_char`` drops a BC era: a row whose time moved to the same date BC would read as its payload. Such a row,
    and one after 9999, goes to the check in Python, which cannot read it: a break either way."""
    await Repositories(database).trades.save_trade(make_trade(trade_id="T-ERA"))
    await tamper(database_url, f"UPDATE trades SET entry_time = {moved}")
    assert (await compared(database_url))["T-ERA"] is False
    broken = (await verify(database)).broken
    assert broken is not None and broken.natural_key == "T-ERA"


async def three_trades(database: Database) -> None:
    """A chain of three entries, seq 1 to 3."""
    repos = Repositories(database)
    for n in range(3):
        await repos.trades.save_trade(make_trade(trade_id=f"T-{n}"))


async def test_an_entry_recorded_at_a_time_python_cannot_hold_is_a_break(database: Database, database_url: str) -> None:
    """An entry's ``recorded_at`` moved to the same date BC keeps its canonical text under ``to_char``, and so its
    hash: the walk names it, by the server or in Python."""
    await three_trades(database)
    await tamper(
        database_url,
        "UPDATE audit_log SET recorded_at = ((recorded_at AT TIME ZONE 'UTC')::text || '+00 BC')::timestamptz "
        "WHERE seq = 2",
    )
    for report in (await verify(database), await python_walk(database)):
        assert report.broken is not None and report.broken.seq == 2 and "years 1 to 9999" in report.broken.problem


async def test_an_entry_given_a_far_seq_is_named_at_once(database: Database, database_url: str) -> None:
    """One entry inserted with seq 2**62: the walk skips the seq numbers no entry holds instead of reading them a
    chunk at a time (2**62 / 20,000 statements), and names the gap the walk in one process names."""
    await three_trades(database)
    await tamper(
        database_url,
        "INSERT INTO audit_log (id, instance_id, seq, entity, natural_key, payload, recorded_at, prev_hash, hash, "
        f"key_prev_hash) SELECT id + 1000, instance_id, {2**62}, entity, natural_key, payload, recorded_at, hash, "
        "hash, key_prev_hash FROM audit_log WHERE seq = 3",
    )
    expected = await python_walk(database)
    assert expected.broken is not None and "a gap in the chain" in expected.broken.problem
    for jobs in (1, 3):
        report = await asyncio.wait_for(verify(database, jobs=jobs), 30)
        assert (report.broken, report.heads) == (expected.broken, expected.heads)


async def test_the_databases_own_settings_do_not_change_what_the_server_computes(
    database: Database, database_url: str
) -> None:
    """``standard_conforming_strings = off`` (backslashes in literals read as escapes) and a ``search_path`` that
    puts an ``=`` of its own before the built-in one: verify's statements run with their own settings, so an
    untouched trail passes and an edited row is still named."""
    repos = Repositories(database)
    await repos.trades.save_trade(make_trade(trade_id="T-EDITED", pattern_type='a "quoted" \\ one'))
    await repos.trades.save_trade(make_trade(trade_id="T-KEPT"))
    name = make_url(database_url).database
    await tamper(
        database_url,
        "CREATE FUNCTION public.loose_text(text, text) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$SELECT true$$",
        "CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.loose_text)",
        f'ALTER DATABASE "{name}" SET search_path = public, pg_catalog',
        f'ALTER DATABASE "{name}" SET standard_conforming_strings = off',
    )
    settled = create_database(make_settings(database_url=database_url))
    try:
        assert (await verify(settled)).ok
        await tamper(database_url, "UPDATE trades SET symbol = 'GBPUSD' WHERE trade_id = 'T-EDITED'")
        broken = (await verify(settled, jobs=3, parallel_from=0)).broken
        assert broken is not None and broken.natural_key == "T-EDITED" and "symbol" in broken.problem
    finally:
        await settled.dispose()
        await tamper(
            database_url,
            f'ALTER DATABASE "{name}" RESET ALL',
            "DROP OPERATOR public.= (text, text)",
            "DROP FUNCTION public.loose_text(text, text)",
        )


async def stretch_rows(database_url: str, instance: str, after: int, upto: int) -> list[int]:
    connection = await connect(database_url)
    try:
        rows = await connection.fetch(STRETCH_SQL, instance, after, upto, json.dumps(instance))
    finally:
        await connection.close()
    return [int(row["seq"]) for row in rows]


async def test_the_chain_filter_sends_back_the_ends_and_what_python_must_see(
    database: Database, database_url: str
) -> None:
    """An untouched stretch comes back as its first and last entries only; an entry whose hash does not match, and
    one whose key the server cannot write as Python does (beyond ASCII), come back too."""
    repos = Repositories(database)
    for n in range(20):
        await repos.trades.save_trade(make_trade(trade_id=f"T-{n:02d}"))
    instance = database.settings.instance_id
    assert await stretch_rows(database_url, instance, 0, 20) == [1, 20]
    assert await stretch_rows(database_url, instance, 5, 12) == [6, 12]
    await repos.trades.save_trade(make_trade(trade_id="T-é"))
    await repos.trades.save_trade(make_trade(trade_id="T-LAST"))
    assert await stretch_rows(database_url, instance, 0, 22) == [1, 21, 22]
    await tamper(database_url, "UPDATE audit_log SET payload = replace(payload, 'EURUSD', 'GBPUSD') WHERE seq = 9")
    assert await stretch_rows(database_url, instance, 0, 22) == [1, 9, 21, 22]
    report = await verify(database)  # the non-ASCII key's entry passes in Python; the edited one does not
    assert report.broken is not None and report.broken.seq == 9 and "hash does not match" in report.broken.problem


async def python_walk(database: Database, **options: Any) -> VerifyReport:
    """The report of the walk in one process, in Python (what the server's walk must agree with)."""
    with mock.patch.object(verify_module._Verifier, "_chain_on_server", new=verify_module._Verifier._chain):
        return await verify(database, **options)


ATTACKS = {
    "untouched": [],
    "payload-edited": ["UPDATE audit_log SET payload = replace(payload, 'EURUSD', 'GBPUSD') WHERE seq = 9"],
    "first-entry-edited": ["UPDATE audit_log SET payload = replace(payload, 'EURUSD', 'GBPUSD') WHERE seq = 1"],
    "entry-deleted": ["DELETE FROM audit_log WHERE seq = 8"],
    "two-deleted-across-a-cut": ["DELETE FROM audit_log WHERE seq IN (12, 13)"],
    "prev-hash-edited": ["UPDATE audit_log SET prev_hash = repeat('a', 64) WHERE seq = 5"],
    "entry-moved": ["UPDATE audit_log SET id = 100000 WHERE seq = 1"],
    "link-edited": ["UPDATE audit_log SET key_prev_hash = repeat('b', 64) WHERE seq = 16"],
    "two-breaks-far-apart": [
        "UPDATE audit_log SET payload = replace(payload, 'EURUSD', 'GBPUSD') WHERE seq IN (6, 21)",
    ],
    "link-before-entry": [
        "UPDATE audit_log SET key_prev_hash = repeat('b', 64) WHERE seq = 2",
        "UPDATE audit_log SET payload = replace(payload, 'EURUSD', 'GBPUSD') WHERE seq = 3",
    ],
    # In one chunk of 7 (seq 8 to 14) a changed entry (seq 10) is named before a broken link (seq 8, T-04's first
    # entry, which now follows an entry of its record that another chain holds), wherever the chain is cut.
    "link-and-entry-in-one-chunk": [
        "INSERT INTO audit_log (id, instance_id, seq, entity, natural_key, payload, recorded_at, prev_hash, hash) "
        "VALUES (0, 'zz-other', 1, 'trade', 'T-04', '{}', now(), repeat('0', 64), repeat('f', 64))",
        "UPDATE audit_log SET payload = replace(payload, 'EURUSD', 'GBPUSD') WHERE seq = 10",
    ],
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_stretches_side_by_side_name_the_break_the_walk_in_one_process_names(
    database: Database, database_url: str, attack: str
) -> None:
    repos = Repositories(database)
    trade = make_trade(trade_id="T-MANY")
    for version in (trade, closed_version(trade, 60, "1.5"), closed_version(trade, 120, "2.5")):
        await repos.trades.save_trade(version)  # seq 1 to 3, linked to each other
    for n in range(20):
        await repos.trades.save_trade(make_trade(trade_id=f"T-{n:02d}"))
    await repos.trades.save_trade(closed_version(trade, 180, "3.5"))  # seq 24, linked back to seq 3
    await tamper(database_url, *ATTACKS[attack])
    for chunk in (1, 4, 7, 100):
        expected = await python_walk(database, chunk=chunk)
        for jobs in (1, 3, 8):
            report = await verify(database, chunk=chunk, jobs=jobs, parallel_from=10**9)
            assert (report.broken, report.heads) == (expected.broken, expected.heads), (chunk, jobs)
            if expected.ok:
                assert asdict(report) == asdict(expected), (chunk, jobs)
    if attack != "untouched":
        assert expected.broken is not None


async def test_the_stretches_share_one_snapshot(database: Database, database_url: str) -> None:
    """Entries written while verify runs are seen by none of its connections, however late each one opens."""
    repos = Repositories(database)
    await repos.trades.save_trade(make_trade(trade_id="T-BEFORE"))
    count = text("SELECT count(*) FROM audit_log")
    async with database.snapshot() as connection:
        assert (await connection.execute(count)).scalar_one() == 1
        await repos.trades.save_trade(make_trade(trade_id="T-DURING"))
        async with beside(database, connection, 2) as others:
            assert [(await other.execute(count)).scalar_one() for other in others] == [1, 1]
