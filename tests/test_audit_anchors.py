"""Anchored checkpoints of the audit trail: written off the write path, signed, and held against the chains."""

from __future__ import annotations

import asyncio
import json
import stat
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from structlog.testing import capture_logs

from persistence import PersistenceSidecar
from persistence.audit import anchors as anchors_module
from persistence.audit.anchors import (
    Anchors,
    Checkpoint,
    anchor_path,
    generate_key,
    load_anchors,
    load_public_key,
    load_signing_key,
    sign,
)
from persistence.audit.chain import canonical_time, entry_hash, header_text
from persistence.audit.report import VerifyReport
from persistence.audit.verify import verify
from persistence.config import Settings
from persistence.db.engine import Database, create_database
from persistence.db.schema import audit_log
from persistence.errors import AuditKeyError
from persistence.observe.events import AuditAnchored, Event
from persistence.records.models import utc_now
from persistence.testing import FakeClock
from tests.support import eventually
from tests.support.audit import (
    anchored_trail,
    audit_cli,
    audit_cli_in_a_subprocess,
    audit_export,
    closed_version,
    lines_of,
    tamper,
)
from tests.support.databases import make_settings, reset_postgres
from tests.support.factories import make_trade

SettingsFactory = Callable[..., Settings]
INTERVAL = 30.0


async def head_of(database: Database, instance: str) -> tuple[int, str]:
    async with database.read() as connection:
        row = (
            await connection.execute(
                text("SELECT seq, hash FROM audit_log WHERE instance_id = :i ORDER BY seq DESC LIMIT 1"),
                {"i": instance},
            )
        ).one()
    return int(row[0]), str(row[1])


async def check(database: Database, directory: Path, *, public: Path | None = None, **options: Any) -> VerifyReport:
    keys = [load_public_key(public)] if public is not None else []
    anchors = load_anchors(directory, INTERVAL, keys)
    return await verify(database, anchors=anchors, **options)


# ---------------------------------------------------------------------------------------------- writing checkpoints


async def test_a_checkpoint_is_written_each_interval_while_entries_are_written_and_at_close(
    clean_database_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    clock = FakeClock()
    settings = sidecar_settings(clean_database_url, instance_id="bot-anchor")
    path = anchor_path(tmp_path / "anchors", "bot-anchor")
    published: list[Event] = []
    sidecar = PersistenceSidecar(settings, clock=clock, sleep=clock.sleep)
    sidecar.events.subscribe(lambda event: published.append(event) if isinstance(event, AuditAnchored) else None)
    with capture_logs() as logs:
        await sidecar.start()
        try:
            for _ in range(5):
                sidecar.record_trade(make_trade())
            await sidecar.flush()
            assert lines_of(path) == []  # nothing before the interval: never on the write path
            clock.advance(INTERVAL)
            await eventually(lambda: len(lines_of(path)) == 1)
            clock.advance(INTERVAL)  # nothing written since: no new checkpoint
            await asyncio.sleep(0.05)
            assert len(lines_of(path)) == 1
            sidecar.record_trade(make_trade())
            await sidecar.flush()
        finally:
            await sidecar.close()
    database = create_database(settings)
    try:
        first, last = lines_of(path)
        assert (first["instance_id"], first["seq"]) == ("bot-anchor", 5)
        assert (last["seq"], last["hash"]) == await head_of(database, "bot-anchor")  # the one at close()
        assert "signature" not in last
        assert [(event.seq, event.hash) for event in published if isinstance(event, AuditAnchored)] == [
            (5, first["hash"]),
            (6, last["hash"]),
        ]
        anchored = [entry for entry in logs if entry["event"] == "audit_anchored"]
        assert [entry["seq"] for entry in anchored] == [5, 6] and anchored[1]["path"] == str(path)
        assert (await check(database, tmp_path / "anchors")).ok
    finally:
        await database.dispose()


async def test_checkpoints_follow_the_chain_across_restarts_a_journal_replay_and_set_enabled_flips(
    sqlite_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = sidecar_settings(sqlite_url, instance_id="bot-flips")
    path = anchor_path(tmp_path / "anchors", "bot-flips")
    async with PersistenceSidecar(settings) as sidecar:
        sidecar.record_trade(make_trade())
        await sidecar.flush()
        await sidecar.set_enabled(False)  # stops the runtime: its checkpoint is written
        assert [line["seq"] for line in lines_of(path)] == [1]
        sidecar.record_trade(make_trade())  # not persisted: no entry, no checkpoint
        await sidecar.set_enabled(True)
        sidecar.record_trade(make_trade())
        await sidecar.flush()
    assert [line["seq"] for line in lines_of(path)] == [1, 2]
    async with PersistenceSidecar(settings) as sidecar:
        trades = [make_trade() for _ in range(3)]
        for trade in trades:
            sidecar.record_trade(trade)
        await sidecar.flush()
    async with PersistenceSidecar(settings) as sidecar:
        sidecar.record_trade(closed_version(trades[0]))
        await sidecar.flush()
    assert [line["seq"] for line in lines_of(path)] == [1, 2, 5, 6]
    database = create_database(settings)
    try:
        report = await check(database, tmp_path / "anchors")
        assert report.ok and report.anchors == {"bot-flips": 4} and report.gaps == [], report.lines()
    finally:
        await database.dispose()


async def test_the_heads_of_a_journal_replay_at_start_up_are_checkpointed(
    sqlite_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    from tests.support import DatabaseLock

    settings = sidecar_settings(sqlite_url, instance_id="bot-replay")
    path = anchor_path(tmp_path / "anchors", "bot-replay")
    async with PersistenceSidecar(settings) as sidecar:
        sidecar.record_trade(make_trade())
        await sidecar.flush()
    lock = DatabaseLock(sqlite_url)
    await lock.acquire()
    try:
        sidecar = PersistenceSidecar(settings)
        await sidecar.start()
        receipts = [sidecar.record_trade(make_trade()) for _ in range(4)]
        await sidecar.close(timeout=0.5)
        assert {receipt.status for receipt in receipts} == {"journaled"}
    finally:
        await lock.release()
    assert [line["seq"] for line in lines_of(path)] == [1]  # the locked run wrote no entry: no checkpoint
    clock = FakeClock()
    sidecar = PersistenceSidecar(settings, clock=clock, sleep=clock.sleep)
    await sidecar.start()  # replays the journal
    try:
        clock.advance(INTERVAL)
        await eventually(lambda: [line["seq"] for line in lines_of(path)] == [1, 5])
    finally:
        await sidecar.close()
    assert [line["seq"] for line in lines_of(path)] == [1, 5]


async def test_nothing_is_anchored_when_persistence_is_disabled(
    sqlite_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    async with PersistenceSidecar(sidecar_settings(sqlite_url, enabled=False)) as sidecar:
        sidecar.record_trade(make_trade())
    assert not (tmp_path / "anchors").exists()


async def test_a_commit_never_waits_for_a_checkpoint_being_written(
    sqlite_url: str, sidecar_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The anchor file's disk hangs: the writer keeps committing; the checkpoint lands when the disk answers."""
    real_append = anchors_module.append_checkpoint
    release = threading.Event()
    entered = threading.Event()

    def hanging_append(path: Path, checkpoint: Checkpoint) -> None:
        entered.set()
        release.wait(30)
        real_append(path, checkpoint)

    monkeypatch.setattr(anchors_module, "append_checkpoint", hanging_append)
    clock = FakeClock()
    settings = sidecar_settings(sqlite_url, instance_id="bot-slow-disk")
    sidecar = PersistenceSidecar(settings, clock=clock, sleep=clock.sleep)
    await sidecar.start()
    try:
        sidecar.record_trade(make_trade())
        await sidecar.flush()
        clock.advance(INTERVAL)
        await eventually(entered.is_set)
        receipts = [sidecar.record_trade(make_trade()) for _ in range(50)]
        await asyncio.wait_for(sidecar.flush(), 10)  # committed while the checkpoint hangs
        assert {receipt.status for receipt in receipts} == {"persisted"}
        release.set()
    finally:
        release.set()
        await sidecar.close()
    assert [line["seq"] for line in lines_of(anchor_path(tmp_path / "anchors", "bot-slow-disk"))] == [1, 51]


async def test_two_instances_on_one_postgres_database_anchor_their_own_chains(
    postgres_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    await reset_postgres(postgres_url)
    sidecars = [
        PersistenceSidecar(sidecar_settings(postgres_url, instance_id=name, journal_dir=tmp_path / name))
        for name in ("bot-a", "bot-b")
    ]
    shared = [make_trade(trade_id=f"T-SHARED-{i}") for i in range(20)]
    for sidecar in sidecars:
        await sidecar.start()
    for index, sidecar in enumerate(sidecars):  # both running; each amends every shared trade in turn
        for trade in shared:
            sidecar.record_trade(closed_version(trade, 10 + index))
        await sidecar.flush()
    for sidecar in sidecars:
        await sidecar.close()
    database = create_database(make_settings(database_url=postgres_url))
    try:
        for name in ("bot-a", "bot-b"):
            assert [(line["seq"], line["hash"]) for line in lines_of(anchor_path(tmp_path / "anchors", name))] == [
                await head_of(database, name)
            ]
        report = await check(database, tmp_path / "anchors")
        assert report.ok and (report.anchors["bot-a"], report.anchors["bot-b"]) == (1, 1), report.lines()
    finally:
        await database.dispose()


# ---------------------------------------------------------------------------------------------- keys and signatures


def test_keygen_writes_a_private_key_only_its_owner_reads_and_the_public_key(tmp_path: Path) -> None:
    key = tmp_path / "signing.pem"
    public = generate_key(key)
    assert public == tmp_path / "signing.pem.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    private = load_signing_key(key)
    checkpoint = sign(private, Checkpoint("bot", 3, "a" * 64, canonical_time(utc_now())))
    assert anchors_module.signature_ok(load_public_key(public), checkpoint)
    with pytest.raises(AuditKeyError, match="never overwritten"):
        generate_key(key)


def test_a_signing_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "signing.pem"
    generate_key(key)
    key.chmod(0o644)
    with pytest.raises(AuditKeyError, match=r"readable by others.*chmod 600"):
        load_signing_key(key)


async def test_a_sidecar_refuses_to_start_with_a_key_others_can_read(
    sqlite_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    key = tmp_path / "signing.pem"
    generate_key(key)
    key.chmod(0o640)
    sidecar = PersistenceSidecar(sidecar_settings(sqlite_url, audit_signing_key=key))
    with pytest.raises(AuditKeyError, match="readable by others"):
        await sidecar.start()
    await sidecar.close()


async def test_signed_checkpoints_verify_with_their_key_and_fail_with_another(
    clean_database_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    key, other = tmp_path / "signing.pem", tmp_path / "other.pem"
    generate_key(key)
    generate_key(other)
    settings = sidecar_settings(clean_database_url, instance_id="bot-signed", audit_signing_key=key)
    async with PersistenceSidecar(settings) as sidecar:
        sidecar.record_trade(make_trade())
        await sidecar.flush()
    (line,) = lines_of(anchor_path(tmp_path / "anchors", "bot-signed"))
    assert line["signature"]
    database = create_database(settings)
    try:
        assert (await check(database, tmp_path / "anchors", public=tmp_path / "signing.pem.pub")).ok
        broken = (await check(database, tmp_path / "anchors", public=tmp_path / "other.pem.pub")).broken
        assert broken is not None and broken.anchor is not None and "bot-signed.jsonl:1" in broken.anchor
        assert "signature does not verify" in broken.problem
        with pytest.raises(AuditKeyError, match="signed: pass --public-key"):
            load_anchors(tmp_path / "anchors", INTERVAL)
    finally:
        await database.dispose()


# ---------------------------------------------------------------------------------------------- attacks


async def rewrite_from(database: Database, database_url: str, instance: str, seq: int, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` in the payload of entry ``seq`` and recompute every hash from there: a chain that
    verifies on its own, record links included (the rewrite an attacker with the database would make)."""
    columns = ("seq", "entity", "natural_key", "payload", "recorded_at", "prev_hash", "key_prev_hash", "hash")
    statement = (
        select(*(audit_log.c[name] for name in columns))
        .where(audit_log.c.instance_id == instance, audit_log.c.seq >= seq)
        .order_by(audit_log.c.seq)
    )
    async with database.read() as connection:
        rows = (await connection.execute(statement)).all()
    previous = rows[0][5]
    statements = []
    renamed: dict[str, str] = {}  # old hash → new: the record links that named a rewritten entry follow it
    for number, entity, key, payload, recorded_at, _, link, old_hash in rows:
        if number == seq:
            assert old in payload
            payload = payload.replace(old, new)
        link = renamed.get(link, link)
        header = header_text(instance, number, entity, key, canonical_time(recorded_at), link)
        digest = renamed[old_hash] = entry_hash(previous, header, payload)
        quoted = payload.replace("'", "''")
        statements.append(
            f"UPDATE audit_log SET payload = '{quoted}', prev_hash = '{previous}', hash = '{digest}', "
            f"key_prev_hash = '{link}' WHERE instance_id = '{instance}' AND seq = {number}"
        )
        previous = digest
    await tamper(database_url, *statements)


async def test_a_consistent_rewrite_of_a_row_and_every_later_entry_is_caught_by_a_checkpoint(
    clean_database_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings, trades = await anchored_trail(clean_database_url, sidecar_settings)
    database = create_database(settings)
    try:
        assert (await check(database, tmp_path / "anchors")).ok  # untouched: passes
        # Trade 1's closed version (seq 6) becomes GBPUSD, in the row and in the trail, every hash recomputed.
        await rewrite_from(database, clean_database_url, "bot-x", 6, '"symbol":"EURUSD"', '"symbol":"GBPUSD"')
        await tamper(clean_database_url, f"UPDATE trades SET symbol = 'GBPUSD' WHERE trade_id = '{trades[1].trade_id}'")
        assert (await verify(database)).ok  # the chain and the rows alone cannot tell
        report = await check(database, tmp_path / "anchors")
        broken = report.broken
        assert broken is not None and broken.seq == 8 and broken.anchor is not None
        assert "bot-x.jsonl:2" in broken.anchor and "seq 8" in broken.anchor
        # The walk ended at the break: the chain's line shows no head (it had none to show), only what was checked.
        assert report.lines()[0] == "chain bot-x: 0 entries checked before the break", report.lines()
        assert "the entry at seq 8 has hash" in broken.problem and "rewritten" in broken.problem
    finally:
        await database.dispose()


async def test_a_tail_deleted_with_its_rows_is_caught_by_a_checkpoint(
    clean_database_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings, _ = await anchored_trail(clean_database_url, sidecar_settings)
    async with PersistenceSidecar(settings) as sidecar:  # a third run: two new trades, seq 9 and 10
        sidecar.record_trade(make_trade(trade_id="T-LATE-1"))
        sidecar.record_trade(make_trade(trade_id="T-LATE-2"))
    database = create_database(settings)
    try:
        # The third run never happened: its entries and its rows gone together.
        await tamper(
            clean_database_url,
            "DELETE FROM audit_log WHERE seq > 8",
            "DELETE FROM trades WHERE trade_id LIKE 'T-LATE-%'",
        )
        assert (await verify(database)).ok  # the chain and the rows alone cannot tell
        broken = (await check(database, tmp_path / "anchors")).broken
        assert broken is not None and broken.anchor is not None and "bot-x.jsonl:3" in broken.anchor
        assert "the chain ends at seq 8" in broken.problem
    finally:
        await database.dispose()


async def test_a_replaced_chain_is_caught_by_its_first_checkpoint(
    clean_database_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings, _ = await anchored_trail(clean_database_url, sidecar_settings)
    database = create_database(settings)
    try:
        # Trade 0's first version rewritten, every later hash recomputed (its row holds its closed version).
        await rewrite_from(database, clean_database_url, "bot-x", 1, '"direction":"BUY"', '"direction":"SELL"')
        assert (await verify(database)).ok
        broken = (await check(database, tmp_path / "anchors")).broken
        assert broken is not None and broken.seq == 4 and broken.anchor is not None
        assert "bot-x.jsonl:1" in broken.anchor
        # A chain renamed away entirely leaves its checkpoints without a chain.
        await tamper(clean_database_url, "UPDATE audit_log SET instance_id = 'bot-y'")
        broken = (await check(database, tmp_path / "anchors")).broken
        assert broken is not None and "has no entry at all" in broken.problem
    finally:
        await database.dispose()


async def test_a_forged_or_altered_checkpoint_line_is_caught(
    clean_database_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    key = tmp_path / "signing.pem"
    generate_key(key)
    settings, _ = await anchored_trail(clean_database_url, sidecar_settings, audit_signing_key=key)
    path = anchor_path(tmp_path / "anchors", "bot-x")
    public = tmp_path / "signing.pem.pub"
    original = path.read_text()
    database = create_database(settings)
    try:
        assert (await check(database, tmp_path / "anchors", public=public)).ok
        lines = original.splitlines()
        # Altered: the seq of a signed line moved (so it would match a rewritten chain's shorter tail).
        altered = json.loads(lines[1])
        altered["seq"] = 7
        path.write_text("\n".join([lines[0], json.dumps(altered)]) + "\n")
        broken = (await check(database, tmp_path / "anchors", public=public)).broken
        assert broken is not None and broken.anchor is not None and "bot-x.jsonl:2" in broken.anchor
        assert "signature does not verify" in broken.problem
        # Forged: a line added by hand, unsigned.
        forged = {"hash": "0" * 64, "instance_id": "bot-x", "seq": 3, "time": canonical_time(utc_now())}
        path.write_text(original + json.dumps(forged) + "\n")
        broken = (await check(database, tmp_path / "anchors", public=public)).broken
        assert broken is not None and "bot-x.jsonl:3" in (broken.anchor or "") and "not signed" in broken.problem
        # Unsigned trail, a line forged with a wrong hash: it does not match the chain.
        unsigned = tmp_path / "unsigned"
        unsigned.mkdir()
        (unsigned / "bot-x.jsonl").write_text(json.dumps(forged) + "\n")
        broken = (await check(database, unsigned)).broken
        assert broken is not None and broken.seq == 3 and "checkpoint says 0000000000000000" in broken.problem
        (unsigned / "bot-x.jsonl").write_text("{not json\n")
        broken = (await check(database, unsigned)).broken
        assert broken is not None and "cannot be read" in broken.problem
    finally:
        await database.dispose()


async def test_entries_left_unanchored_longer_than_twice_the_interval_are_reported(
    sqlite_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings, _ = await anchored_trail(sqlite_url, sidecar_settings)
    path = anchor_path(tmp_path / "anchors", "bot-x")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    late = (utc_now() + timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
    lines[1]["time"] = late  # the second run's checkpoint came five minutes after its entries
    path.write_text("".join(json.dumps(line) + "\n" for line in lines[:2]))
    database = create_database(settings)
    try:
        report = await check(database, tmp_path / "anchors")
        assert report.ok  # reported, not a break
        assert len(report.gaps) == 1 and "seq 5 to 8 waited" in report.gaps[0], report.gaps
        assert any(line.startswith("GAP: instance 'bot-x': seq 5 to 8") for line in report.lines())
    finally:
        await database.dispose()


async def test_since_last_anchor_checks_only_what_follows_the_newest_matching_checkpoint(
    clean_database_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings, trades = await anchored_trail(clean_database_url, sidecar_settings)
    async with PersistenceSidecar(settings) as sidecar:  # one more run, its checkpoint removed: a tail to check
        sidecar.record_trade(closed_version(trades[0], 120))
    path = anchor_path(tmp_path / "anchors", "bot-x")
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:2]))
    database = create_database(settings)
    try:
        report = await check(database, tmp_path / "anchors", since_last_anchor=True)
        assert report.ok, report.lines()
        assert report.since == {"bot-x": 8} and report.chains == {"bot-x": 1}
        assert report.rows["trades"] == 1
        # What is older than the checkpoint is not read again; what is newer still is.
        await tamper(clean_database_url, f"UPDATE trades SET symbol = 'GBPUSD' WHERE trade_id = '{trades[0].trade_id}'")
        broken = (await check(database, tmp_path / "anchors", since_last_anchor=True)).broken
        assert broken is not None and broken.natural_key == trades[0].trade_id
    finally:
        await database.dispose()


# ---------------------------------------------------------------------------------------------- the command line


def test_audit_verify_with_anchors_on_the_command_line_and_its_refusals(
    sqlite_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    key = tmp_path / "signing.pem"
    made = audit_cli_in_a_subprocess(sqlite_url, "keygen", str(key))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and (tmp_path / "signing.pem.pub").exists()
    asyncio.run(anchored_trail(sqlite_url, sidecar_settings, audit_signing_key=key))
    anchors, public = str(tmp_path / "anchors"), str(tmp_path / "signing.pem.pub")
    checked = audit_cli(sqlite_url, "verify", "--anchors", anchors, "--public-key", public)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "anchors bot-x: 2 checkpoints match" in checked.stdout
    assert checked.stdout.strip().endswith("audit trail verified")
    since = audit_cli(sqlite_url, "verify", "--anchors", anchors, "--public-key", public, "--since-last-anchor")
    assert since.returncode == 0 and "chain bot-x: 0 entries after checkpoint seq 8" in since.stdout, since.stdout
    missing = audit_cli(sqlite_url, "verify", "--anchors", anchors, "--public-key", str(tmp_path / "nope.pub"))
    assert missing.returncode == 2 and "nope.pub: cannot read the public key" in missing.stderr
    assert "Traceback" not in missing.stderr
    unkeyed = audit_cli(sqlite_url, "verify", "--anchors", anchors)
    assert unkeyed.returncode == 2 and "signed: pass --public-key" in unkeyed.stderr
    not_a_key = audit_cli(sqlite_url, "verify", "--anchors", anchors, "--public-key", str(key))
    assert not_a_key.returncode == 2 and "not a PEM public key" in not_a_key.stderr
    generate_key(tmp_path / "other.pem")
    wrong = audit_cli(sqlite_url, "verify", "--anchors", anchors, "--public-key", str(tmp_path / "other.pem.pub"))
    assert wrong.returncode == 1 and "signature does not verify" in wrong.stdout
    again = audit_cli(sqlite_url, "keygen", str(key))
    assert again.returncode == 2 and "never overwritten" in again.stderr


def test_anchor_files_are_named_by_instance_safely(tmp_path: Path) -> None:
    assert anchor_path(tmp_path, "bot-a").name == "bot-a.jsonl"
    assert anchor_path(tmp_path, "../etc/x").parent == tmp_path
    assert isinstance(load_anchors(tmp_path, INTERVAL), Anchors)


# ---------------------------------------------------------------------------------------------- the fast path


async def test_verify_on_sqlite_checks_rows_as_stored_without_decoding_any_and_still_names_a_difference(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every kind of value (negative, tiny and huge decimals, None, odd text, booleans, counts) passes the stored-value
    comparison untouched; a row edited by hand falls back to the decoding path, which names the field."""
    from decimal import Decimal

    from persistence.db.rowcodec import RowReader
    from persistence.migrations import upgrade as migrate
    from persistence.tables.repositories import Repositories
    from tests.support.factories import make_parameter_change, make_signal, make_snapshot

    database = create_database(make_settings(database_url=sqlite_url))
    try:
        await migrate(database)
        repos = Repositories(database)
        for overrides in (
            {"pnl": Decimal("-0.00000001"), "pattern_type": 'quote " backslash \\ tab \t é € 😀'},
            {"pnl": Decimal("9999999999.99999999"), "position_size": Decimal("0.00000001")},
            {"pnl": None, "exit_time": None, "exit_price": None, "session": None, "pattern_type": None},
            {"pnl": Decimal("-12345.5")},
        ):
            await repos.trades.save_trade(make_trade(**overrides))
        await repos.signals.save_signal(make_signal())
        await repos.signals.save_signal(make_signal(executed=True))
        await repos.snapshots.save_snapshot(make_snapshot())
        await repos.parameters.save_change(make_parameter_change())
        decoded: list[Any] = []
        real_init = RowReader.__init__

        def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
            real_init(self, *args, **kwargs)
            decode = self.decode
            self.decode = lambda row: decoded.append(row) or decode(row)

        monkeypatch.setattr(RowReader, "__init__", counting_init)
        report = await verify(database)
        assert report.ok, report.lines()
        assert sum(report.rows.values()) == 8 and decoded == []
        await tamper(sqlite_url, "UPDATE trades SET pnl = -99 WHERE pnl IS NULL")
        broken = (await verify(database)).broken
        assert broken is not None and "pnl is '-0.00000099', audited None" in broken.problem, broken
        assert len(decoded) == 1
    finally:
        await database.dispose()


def test_an_exported_trail_and_its_anchors_verify_offline_with_the_same_command(
    sqlite_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    key = tmp_path / "signing.pem"
    generate_key(key)
    asyncio.run(anchored_trail(sqlite_url, sidecar_settings, audit_signing_key=key))
    exported = tmp_path / "trail.jsonl"
    done = audit_export(sqlite_url, exported)
    assert done.returncode == 0, done.stderr
    anchors, public = str(tmp_path / "anchors"), str(tmp_path / "signing.pem.pub")
    nowhere = "sqlite+aiosqlite:////nonexistent/folder/none.db"  # the auditor's machine has no database
    offline = audit_cli(nowhere, "verify", "--from-export", str(exported), "--anchors", anchors, "--public-key", public)
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert "anchors bot-x: 2 checkpoints match" in offline.stdout
    assert offline.stdout.strip().endswith("audit trail verified")
    # The export rewritten consistently from seq 6 on (hashes recomputed): the checkpoint at seq 8 catches it.
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    previous = lines[4]["hash"]
    renamed: dict[str, str] = {}
    for entry in lines[5:]:
        if entry["seq"] == 6:
            entry["payload"] = entry["payload"].replace('"symbol":"EURUSD"', '"symbol":"GBPUSD"')
        entry["key_prev_hash"] = renamed.get(entry["key_prev_hash"], entry["key_prev_hash"])
        header = header_text(
            "bot-x", entry["seq"], entry["entity"], entry["natural_key"], entry["recorded_at"], entry["key_prev_hash"]
        )
        old_hash = entry["hash"]
        entry["prev_hash"], entry["hash"] = previous, entry_hash(previous, header, entry["payload"])
        renamed[old_hash] = previous = entry["hash"]
    exported.write_text("".join(json.dumps(entry) + "\n" for entry in lines))
    caught = audit_cli(nowhere, "verify", "--from-export", str(exported), "--anchors", anchors, "--public-key", public)
    assert caught.returncode == 1 and "bot-x.jsonl:2" in caught.stdout and "the entry at seq 8" in caught.stdout
    exported.write_text("".join(json.dumps(entry) + "\n" for entry in lines[:6]))  # a deleted tail
    cut = audit_cli(nowhere, "verify", "--from-export", str(exported), "--anchors", anchors, "--public-key", public)
    assert cut.returncode == 1 and "the chain ends at seq 6" in cut.stdout


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param('"pnl":"12.50000000"', '"pnl":"twelve"', id="not-a-decimal"),
        pytest.param('"exit_time":"', '"exit_time":"yesterday', id="not-a-timestamp"),
    ],
)
async def test_a_version_rewritten_with_a_value_of_the_wrong_type_is_named_not_crashed_on(
    clean_database_url: str, sidecar_settings: SettingsFactory, old: str, new: str
) -> None:
    """A consistent rewrite (every hash recomputed) that gives a field a value its column cannot hold: the database
    cannot compare it (PostgreSQL refuses the cast), so the row is compared here, and named, in one process or in
    parts."""
    settings, trades = await anchored_trail(clean_database_url, sidecar_settings)
    database = create_database(settings)
    try:
        await rewrite_from(database, clean_database_url, "bot-x", 6, old, new)
        for jobs in (1, 3):
            broken = (await verify(database, jobs=jobs, parallel_from=0)).broken
            assert broken is not None and broken.natural_key == trades[1].trade_id, (jobs, broken)
            assert "differs from its latest audited version" in broken.problem and broken.seq == 6
    finally:
        await database.dispose()
