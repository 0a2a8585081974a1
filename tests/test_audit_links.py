"""The order of one record's versions, sealed: each entry links to the previous entry of its record (issue 22, item 4).

Two instances write versions of the same trade into one database (SQLite file or PostgreSQL); every entry carries
``key_prev_hash``, the hash of the trade's entry before it whichever instance wrote it. Swapping the two versions
(the ids, the rows, the entries, each chain's own hashes recomputed) is caught by ``audit verify`` and by the offline
check of an export; an untouched database and one upgraded from 0004 with unlinked entries verify.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, text

from persistence.audit.chain import (
    GENESIS,
    AuditHead,
    VersionEncoder,
    canonical_time,
    chain_entries,
    entry_hash,
    header_text,
    linked_entries,
)
from persistence.audit.trail import column_kinds
from persistence.audit.verify import verify, verify_export
from persistence.db.engine import Database, create_database
from persistence.db.schema import audit_log, trades
from persistence.migrations import migrate_to, upgrade
from persistence.records.models import Trade
from persistence.tables.repositories import Repositories
from persistence.tools.export import export
from tests.support.audit import closed_version, tamper
from tests.support.databases import make_settings
from tests.support.factories import make_signal, make_trade, trade_data

ENTRY = ("id", "instance_id", "seq", "natural_key", "payload", "recorded_at", "prev_hash", "hash", "key_prev_hash")


async def desk(database_url: str, instance: str) -> Database:
    return create_database(make_settings(database_url=database_url, instance_id=instance, query_timeout_ms=5000))


@pytest.fixture
async def repos(database: Database, database_url: str) -> AsyncIterator[Repositories]:
    """An orchestrator (instance ``desk-a``) on ``database``."""
    one = await desk(database_url, "desk-a")
    try:
        yield Repositories(one)
    finally:
        await one.dispose()


@pytest.fixture
async def second(database: Database, database_url: str) -> AsyncIterator[Repositories]:
    """A second orchestrator (instance ``desk-b``) on the same database as ``repos`` (instance ``desk-a``)."""
    other = await desk(database_url, "desk-b")
    try:
        yield Repositories(other)
    finally:
        await other.dispose()


async def entries_of(database: Database, key: str) -> list[dict[str, Any]]:
    statement = select(*(audit_log.c[name] for name in ENTRY)).where(audit_log.c.natural_key == key)
    async with database.read() as connection:
        return [dict(row) for row in (await connection.execute(statement.order_by(audit_log.c.id))).mappings()]


async def two_instances_two_versions(repos: Repositories, second: Repositories) -> tuple[Trade, Trade]:
    """``desk-a`` opens T-SWAP, ``desk-b`` closes it; an unrelated trade on each side keeps both chains going.

    The ids go desk-a 1, 2 (T-SWAP), desk-b 3 (T-SWAP), 4: exchanging 2 and 3 keeps the ids rising in each chain."""
    opened = make_trade(trade_id="T-SWAP")
    closed = closed_version(opened, 60, "-250")
    await repos.trades.save_trade(make_trade(trade_id="T-LOCAL"))
    await repos.trades.save_trade(opened)
    await second.trades.save_trade(closed)
    await second.trades.save_trade(make_trade(trade_id="T-DESK-B"))
    return opened, closed


def rechained(rows: list[dict[str, Any]], changed: dict[int, dict[str, Any]]) -> list[str]:
    """UPDATEs rewriting one chain (``rows``, in seq order) with ``changed`` columns per seq, every hash of the chain
    recomputed from its first changed entry so that the chain verifies on its own."""
    statements = []
    previous = rows[0]["prev_hash"]
    for row in rows:
        row = {**row, **changed.get(row["seq"], {})}
        header = header_text(
            row["instance_id"],
            row["seq"],
            "trade" if row.get("entity") is None else row["entity"],
            row["natural_key"],
            canonical_time(row["recorded_at"]),
            row["key_prev_hash"],
        )
        digest = entry_hash(previous, header, row["payload"])
        link = "NULL" if row["key_prev_hash"] is None else f"'{row['key_prev_hash']}'"
        payload = row["payload"].replace("'", "''")
        statements.append(
            f"UPDATE audit_log SET payload = '{payload}', prev_hash = '{previous}', "
            f"hash = '{digest}', key_prev_hash = {link} "
            f"WHERE instance_id = '{row['instance_id']}' AND seq = {row['seq']}"
        )
        previous = digest
    return statements


async def chain_of(database: Database, instance: str) -> list[dict[str, Any]]:
    statement = select(*(audit_log.c[name] for name in ENTRY), audit_log.c.entity).where(
        audit_log.c.instance_id == instance
    )
    async with database.read() as connection:
        return [dict(row) for row in (await connection.execute(statement.order_by(audit_log.c.seq))).mappings()]


# ---------------------------------------------------------------------------------------------- the links


async def test_a_records_versions_link_across_instances_and_within_a_batch(
    database: Database, repos: Repositories, second: Repositories
) -> None:
    await two_instances_two_versions(repos, second)
    first, closed = await entries_of(database, "T-SWAP")
    assert (first["instance_id"], closed["instance_id"]) == ("desk-a", "desk-b")
    assert first["key_prev_hash"] == GENESIS and closed["key_prev_hash"] == first["hash"]
    # Three versions in one transaction chain to one another, after the stored one.
    trade = make_trade(trade_id="T-BATCH")
    await repos.trades.save_trade(trade)
    async with database.write() as connection:
        await repos.trades.upsert(connection, [closed_version(trade, n, f"{n}.5") for n in (10, 20, 30)])
    batch = await entries_of(database, "T-BATCH")
    assert len(batch) == 4
    assert [entry["key_prev_hash"] for entry in batch] == [GENESIS] + [entry["hash"] for entry in batch[:-1]]
    report = await verify(database)
    assert report.ok, report.lines()


async def test_an_execution_update_links_to_its_signals_entry(database: Database, repos: Repositories) -> None:
    signal = make_signal()
    await repos.signals.save_signal(signal)
    assert await repos.signals.update_signal_execution(signal.signal_id, True, "FILLED")
    saved, executed = await entries_of(database, signal.signal_id)
    assert executed["key_prev_hash"] == saved["hash"]
    assert (await verify(database)).ok


# ---------------------------------------------------------------------------------------------- attacks


async def test_two_versions_swapped_by_their_ids_are_caught_naming_the_record_and_entries(
    database: Database, repos: Repositories, second: Repositories, database_url: str
) -> None:
    """The older version given the later id and the row rolled back to it: the rows, the ids and each chain agree
    (the id is in no hash), but the record's links run the other way."""
    await two_instances_two_versions(repos, second)
    first, closed = await entries_of(database, "T-SWAP")
    await tamper(
        database_url,
        f"UPDATE audit_log SET id = -1 WHERE id = {first['id']}",
        f"UPDATE audit_log SET id = {first['id']} WHERE id = {closed['id']}",
        f"UPDATE audit_log SET id = {closed['id']} WHERE id = -1",
        "UPDATE trades SET pnl = NULL, exit_time = NULL, exit_price = NULL, updated_at = created_at, "
        "instance_id = 'desk-a' WHERE trade_id = 'T-SWAP'",
    )
    broken = (await verify(database)).broken
    assert broken is not None, "the swap went unnoticed"
    assert (broken.entity, broken.natural_key) == ("trade", "T-SWAP")
    # Whichever of the two entries is met first, the other is named beside it.
    named = {("desk-a", first["seq"]): ("desk-b", closed["seq"]), ("desk-b", closed["seq"]): ("desk-a", first["seq"])}
    assert (broken.instance_id, broken.seq) in named
    other_instance, other_seq = named[(broken.instance_id, broken.seq)]
    assert f"seq {other_seq} of instance {other_instance!r}" in broken.problem or "first entry by id" in broken.problem
    assert "key_prev_hash" in broken.problem and "reordered" in broken.problem


async def test_two_versions_swapped_between_the_chains_with_each_chains_hashes_recomputed_are_caught(
    database: Database, repos: Repositories, second: Repositories, database_url: str
) -> None:
    """The payloads of the two versions exchanged and each chain rewritten so that it verifies on its own (the
    links left as they were): the newer version's link no longer names the hash of the entry before it."""
    await two_instances_two_versions(repos, second)
    first, closed = await entries_of(database, "T-SWAP")
    statements = rechained(await chain_of(database, "desk-a"), {first["seq"]: {"payload": closed["payload"]}})
    statements += rechained(await chain_of(database, "desk-b"), {closed["seq"]: {"payload": first["payload"]}})
    statements.append(
        "UPDATE trades SET pnl = NULL, exit_time = NULL, exit_price = NULL, updated_at = created_at "
        "WHERE trade_id = 'T-SWAP'"
    )
    await tamper(database_url, *statements)
    broken = (await verify(database)).broken
    assert broken is not None and broken.natural_key == "T-SWAP", broken
    assert (broken.instance_id, broken.seq) == ("desk-b", closed["seq"]) and "does not link" in broken.problem
    assert f"seq {first['seq']} of instance 'desk-a'" in broken.problem


async def test_an_older_release_still_writing_after_0005_is_reported_and_not_a_break(
    database: Database, repos: Repositories, second: Repositories, database_url: str, tmp_path: Path
) -> None:
    """A rolling upgrade: ``desk-b`` still runs a release before migration 0005 (its chain has never linked an entry)
    and closes a trade that ``desk-a``, already upgraded, opened with a link. Its entry is hashed without a link, as
    that release writes it: reported, on the database and offline, not a break."""
    await two_instances_two_versions(repos, second)
    chain = await chain_of(database, "desk-b")
    await tamper(database_url, *rechained(chain, {row["seq"]: {"key_prev_hash": None} for row in chain}))
    report = await verify(database)
    assert report.ok, report.lines()
    assert report.unlinked == {"desk-b": 1}
    assert any(line.startswith("NOTE: instance desk-b: 1 entries without a record link") for line in report.lines())
    exported = tmp_path / "rolling.jsonl"
    await export(database, "audit", exported, "jsonl")
    offline = verify_export(exported)
    assert offline.ok, offline.lines()
    assert offline.unlinked == {"desk-b": 1}


async def test_a_link_removed_from_a_chain_that_links_is_caught(
    database: Database, repos: Repositories, second: Repositories, database_url: str, tmp_path: Path
) -> None:
    """An entry made to look as if written before links existed (its link NULL, its chain recomputed), in a chain
    that already linked an entry before it: this release wrote it, so the link was removed."""
    opened = make_trade(trade_id="T-SWAP")
    await repos.trades.save_trade(opened)
    await second.trades.save_trade(make_trade(trade_id="T-DESK-B"))
    await second.trades.save_trade(closed_version(opened, 60, "-250"))
    _, closed = await entries_of(database, "T-SWAP")
    assert closed["instance_id"] == "desk-b" and closed["seq"] == 2
    await tamper(database_url, *rechained(await chain_of(database, "desk-b"), {2: {"key_prev_hash": None}}))
    broken = (await verify(database)).broken
    assert broken is not None and (broken.natural_key, broken.seq) == ("T-SWAP", 2)
    assert "has no key_prev_hash" in broken.problem
    exported = tmp_path / "removed.jsonl"
    await export(database, "audit", exported, "jsonl")
    offline = verify_export(exported).broken
    assert offline is not None and (offline.natural_key, offline.seq) == ("T-SWAP", 2)


async def test_an_export_filtered_by_instance_verifies_offline_and_says_which_links_it_cannot_check(
    database: Database, repos: Repositories, second: Repositories, tmp_path: Path
) -> None:
    """Versions of one trade alternate between the two instances; ``desk-b``'s entries alone link to ``desk-a``'s,
    which the filtered file does not hold: those links are reported as not checkable, and a swap inside the file is
    still caught."""
    opened = make_trade(trade_id="T-ALT")
    versions = [closed_version(opened, minutes, str(-minutes)) for minutes in (10, 20, 30, 40)]
    await repos.trades.save_trade(opened)
    for index, version in enumerate(versions):
        await (second if index % 2 == 0 else repos).trades.save_trade(version)
    only_b = tmp_path / "desk-b.jsonl"
    await export(database, "audit", only_b, "jsonl", instance_id="desk-b")
    lines = [json.loads(line) for line in only_b.read_text().splitlines()]
    assert {line["instance_id"] for line in lines} == {"desk-b"} and len(lines) == 2
    report = verify_export(only_b)
    assert report.ok, report.lines()
    assert report.outside == 2
    assert any("2 entries link to entries this export does not hold" in line for line in report.lines())
    everything = tmp_path / "all.jsonl"
    await export(database, "audit", everything, "jsonl")
    whole = verify_export(everything)
    assert whole.ok and whole.outside == 0, whole.lines()


async def test_one_instances_verify_checks_the_links_of_its_records(
    database: Database, repos: Repositories, second: Repositories, database_url: str
) -> None:
    await two_instances_two_versions(repos, second)
    first, closed = await entries_of(database, "T-SWAP")
    assert (await verify(database, instance_id="desk-b")).ok
    await tamper(
        database_url,
        f"UPDATE audit_log SET id = -1 WHERE id = {first['id']}",
        f"UPDATE audit_log SET id = {first['id']} WHERE id = {closed['id']}",
        f"UPDATE audit_log SET id = {closed['id']} WHERE id = -1",
    )
    broken = (await verify(database, instance_id="desk-b")).broken
    assert broken is not None and broken.natural_key == "T-SWAP"


async def test_the_export_carries_the_links_and_its_offline_check_catches_the_swap(
    database: Database, repos: Repositories, second: Repositories, database_url: str, tmp_path: Path
) -> None:
    await two_instances_two_versions(repos, second)
    untouched = tmp_path / "untouched.jsonl"
    await export(database, "audit", untouched, "jsonl")
    lines = [json.loads(line) for line in untouched.read_text().splitlines()]
    assert all(line["key_prev_hash"] is not None for line in lines)
    report = verify_export(untouched)
    assert report.ok, report.lines()
    first, closed = await entries_of(database, "T-SWAP")
    await tamper(
        database_url,
        f"UPDATE audit_log SET id = -1 WHERE id = {first['id']}",
        f"UPDATE audit_log SET id = {first['id']} WHERE id = {closed['id']}",
        f"UPDATE audit_log SET id = {closed['id']} WHERE id = -1",
    )
    swapped = tmp_path / "swapped.jsonl"
    await export(database, "audit", swapped, "jsonl")
    broken = verify_export(swapped).broken
    assert broken is not None and broken.natural_key == "T-SWAP" and broken.instance_id in ("desk-a", "desk-b")
    assert "reordered" in broken.problem


# ---------------------------------------------------------------------------------------------- before 0005


async def test_a_database_upgraded_from_0004_with_unlinked_entries_verifies_and_links_on(fresh_url: str) -> None:
    """Entries written at 0004 (no link) stay as they were hashed; the next version links to the newest of them;
    and a link removed once a record is linked is still caught."""
    database = create_database(make_settings(database_url=fresh_url, instance_id="desk-new"))
    try:
        await upgrade(database, "0004")
        encode = VersionEncoder(tuple(Trade.model_fields), column_kinds(trades)).encode
        old = [make_trade(trade_id="T-OLD"), make_trade(trade_id="T-OLD-2")]
        rows = [{**trade.__dict__, "instance_id": "desk-old"} for trade in old]
        updated = {**rows[0], **closed_version(old[0], 30, "7").__dict__}
        versions = [("trade", row["trade_id"], encode(row)) for row in [*rows, updated]]
        entries = chain_entries(None, "desk-old", versions, Trade.parse(trade_data()).created_at)
        async with database.write() as connection:
            await connection.execute(insert(trades), [updated, rows[1]])
            await connection.execute(insert(audit_log), entries)
        await upgrade(database)
        report = await verify(database)
        assert report.ok, report.lines()
        assert [entry["key_prev_hash"] for entry in await entries_of(database, "T-OLD")] == [None, None]
        repos = Repositories(database)
        await repos.trades.save_trade(closed_version(old[0], 90, "9"))
        *_, newest = await entries_of(database, "T-OLD")
        assert newest["key_prev_hash"] == entries[2]["hash"]
        report = await verify(database)
        assert report.ok, report.lines()
        assert (await migrate_to(database, "0004", force=True)).direction == "downgrade"
        async with database.read() as connection:
            columns = (await connection.execute(text("SELECT * FROM audit_log"))).keys()
        assert "key_prev_hash" not in columns
    finally:
        await database.dispose()


# ---------------------------------------------------------------------------------------------- the hashed text


def test_linked_entries_hash_each_entry_as_entry_hash_of_its_header_text_with_its_link() -> None:
    """linked_entries writes the hashed text in one piece; verify recomputes it with entry_hash and header_text. A
    record's second version here links to its first; a record's first here to the stored link it was given."""
    at = datetime(2026, 12, 5, 10, 0, 0, 5, tzinfo=UTC)
    stored = "cd" * 32
    versions = [
        ("trade", "T-1", '{"a":1}', GENESIS),
        ("signal", 'S"\\é\n', '{"b":"\\u00e9"}', stored),
        ("trade", "T-1", "{}", GENESIS),
        ("signal", "T-1", "{}", GENESIS),
    ]
    for head in (None, AuditHead('d"sk\\1', 41, "ab" * 32)):
        instance = head.instance_id if head is not None else "desk-1"
        rows = linked_entries(head, instance, versions, at)
        previous = head.hash if head is not None else GENESIS
        assert [row["key_prev_hash"] for row in rows] == [GENESIS, stored, rows[0]["hash"], GENESIS]
        for seq, (row, (entity, key, payload, _)) in enumerate(zip(rows, versions, strict=True), start=rows[0]["seq"]):
            header = header_text(instance, seq, entity, key, canonical_time(at), row["key_prev_hash"])
            assert json.loads(header) == {
                "entity": entity,
                "instance_id": instance,
                "key_prev_hash": row["key_prev_hash"],
                "natural_key": key,
                "recorded_at": canonical_time(at),
                "seq": seq,
            }
            assert list(json.loads(header)) == sorted(json.loads(header))
            assert (row["seq"], row["prev_hash"]) == (seq, previous)
            assert row["hash"] == entry_hash(previous, header, payload)
            previous = row["hash"]


# ---------------------------------------------------------------------------------------------- verify's fast paths


async def test_an_untouched_trail_is_verified_without_decoding_a_row(
    database: Database, repos: Repositories, second: Repositories
) -> None:
    """Every row matches its latest version in the fast comparison (in SQL, SQLite's or PostgreSQL's): none falls back
    to the slow check, which would make verify several times slower without failing anything. Only on PostgreSQL, a
    row with text beyond ASCII is left to Python on purpose (faster there than escaping it in SQL)."""
    from unittest import mock

    from persistence.audit import verify as verify_module
    from tests.support.factories import make_parameter_change, make_snapshot

    await two_instances_two_versions(repos, second)
    await repos.trades.save_trade(make_trade(trade_id="T-NON-ASCII", pattern_type="flag é € 😀", pnl=-12.5))
    await repos.signals.save_signal(make_signal())
    await repos.snapshots.save_snapshot(make_snapshot())
    await repos.parameters.save_change(make_parameter_change())
    fell_back: list[str] = []
    rows = verify_module._Verifier._rows

    async def counted(self: Any, table: Any, record: Any, keys: list[str]) -> bool:
        fell_back.extend(keys)
        result: bool = await rows(self, table, record, keys)
        return result

    with mock.patch.object(verify_module._Verifier, "_rows", counted):
        report = await verify(database)
    assert report.ok, report.lines()
    assert sum(report.rows.values()) == 7
    assert fell_back == ([] if database.is_sqlite else ["T-NON-ASCII"])
