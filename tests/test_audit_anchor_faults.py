"""Anchor files off the main road: a full disk, a crash mid-line, lines made by hand, long instance ids, keys
turned on later or replaced, and exports that cannot be checked. Each ends in a clear verdict, never a traceback."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from persistence import PersistenceSidecar
from persistence.audit.anchors import (
    Checkpoint,
    anchor_path,
    append_checkpoint,
    generate_key,
    load_anchors,
    load_public_key,
    read_anchor_lines,
)
from persistence.audit.verify import verify
from persistence.db.engine import create_database
from tests.support.audit import anchored_trail, audit_cli, audit_export, lines_of
from tests.support.databases import make_settings
from tests.support.factories import make_trade
from tests.support.portability import small_tmpfs
from tests.support.sidecars import SettingsFactory

INTERVAL = 30.0
HASH = "a" * 64


def checkpoint(seq: int, digest: str = HASH, instance: str = "bot") -> Checkpoint:
    return Checkpoint(instance, seq, digest, "2026-12-06T03:00:00.000000Z")


def test_a_full_disk_takes_back_the_part_of_a_checkpoint_it_took_and_the_next_one_lands_whole(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", size="16k") as small:
        path = anchor_path(small, "bot")
        line = len(checkpoint(1).to_line()) + 1
        seq = 0
        while 4096 - (path.stat().st_size if path.exists() else 0) >= line:  # the file's page, nearly full
            seq += 1
            append_checkpoint(path, checkpoint(seq))
        filler = os.open(small / "filler", os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError, match="No space left"):
            while True:
                os.write(filler, b"x" * 4096)
        os.close(filler)
        before = path.read_bytes()
        # The page's last bytes take part of the line, then the disk is full: the part is taken back.
        with pytest.raises(OSError, match="No space left"):
            append_checkpoint(path, checkpoint(seq + 1, "b" * 64))
        assert path.read_bytes() == before
        (small / "filler").unlink()
        append_checkpoint(path, checkpoint(seq + 1, "b" * 64))
        lines = read_anchor_lines(small)
        assert [entry.problem for entry in lines] == [None] * (seq + 1)
        assert lines[-1].checkpoint == checkpoint(seq + 1, "b" * 64)


async def test_a_checkpoint_cut_short_by_a_crash_is_noted_not_a_break_and_the_next_one_starts_its_own_line(
    sqlite_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings, _ = await anchored_trail(sqlite_url, sidecar_settings)
    path = anchor_path(tmp_path / "anchors", "bot-x")
    whole = path.read_text().splitlines()[-1]
    with path.open("a") as file:
        file.write(whole[:70])  # a crash in the middle of an append: no newline
    async with PersistenceSidecar(settings) as sidecar:  # the next run's checkpoint, at its close()
        sidecar.record_trade(make_trade(trade_id="T-after-crash"))
    lines = path.read_text().split("\n")
    assert lines[2] == whole[:70] and json.loads(lines[3])["seq"] == 9  # never glued to the fragment
    database = create_database(settings)
    try:
        report = await verify(database, anchors=load_anchors(tmp_path / "anchors", INTERVAL))
        assert report.ok, report.lines()
        assert report.cut_short == [f"{path}:3"] and report.anchors == {"bot-x": 3}
        assert f"NOTE: checkpoint {path}:3 was cut short" in "\n".join(report.lines())
        since = await verify(database, anchors=load_anchors(tmp_path / "anchors", INTERVAL), since_last_anchor=True)
        assert since.ok and since.since == {"bot-x": 9}
    finally:
        await database.dispose()
    # A line that is wrong, not unfinished, stays a break.
    path.write_text(path.read_text().replace(whole[:70], whole[:70].replace('"hash"', '"hush"'), 1))
    assert audit_cli(sqlite_url, "verify", "--anchors", str(tmp_path / "anchors")).returncode == 1


@pytest.mark.parametrize(
    ("line", "why"),
    [
        pytest.param({"time": "2026-12-06T03:11:12"}, "is not a UTC time as the sidecar", id="time-without-zone"),
        pytest.param({"time": "2026-12-06"}, "is not a UTC time as the sidecar writes it", id="date-only"),
        pytest.param({"time": "2026-12-06T03:11:12.000000+01:00"}, "is not a UTC time", id="another-zone"),
        pytest.param({"seq": 10**20}, "no seq", id="seq-beyond-a-database"),
        pytest.param(None, "nested too deeply", id="deeply-nested"),
    ],
)
async def test_a_checkpoint_line_made_by_hand_is_named_not_crashed_on(
    sqlite_url: str, sidecar_settings: SettingsFactory, tmp_path: Path, line: dict[str, object] | None, why: str
) -> None:
    await anchored_trail(sqlite_url, sidecar_settings)
    path = anchor_path(tmp_path / "anchors", "bot-x")
    good = json.loads(path.read_text().splitlines()[-1])
    text = "[" * 100_000 + "]" * 100_000 if line is None else json.dumps({**good, **line})
    with path.open("a") as file:
        file.write(text + "\n")
    for since in ((), ("--since-last-anchor",)):
        result = audit_cli(sqlite_url, "verify", "--anchors", str(tmp_path / "anchors"), *since)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"BROKEN: checkpoint {path}:3: cannot be read" in result.stdout and why in result.stdout
        assert "Traceback" not in result.stderr


async def test_a_long_instance_id_beyond_ascii_has_an_anchor_file_it_can_write(
    sqlite_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    instance = "東京取引ボット-本番環境-第一号機-ユーロドル戦略-高頻度-予備系統"  # 34 characters: within the 64 allowed
    twin = instance[:-1] + "二"
    names = {anchor_path(tmp_path, name).name for name in (instance, twin)}
    assert len(names) == 2 and all(len(name.encode()) <= 255 for name in names)
    settings = sidecar_settings(sqlite_url, instance_id=instance)
    async with PersistenceSidecar(settings) as sidecar:
        sidecar.record_trade(make_trade())
    assert [entry["instance_id"] for entry in lines_of(anchor_path(tmp_path / "anchors", instance))] == [instance]
    result = audit_cli(sqlite_url, "verify", "--anchors", str(tmp_path / "anchors"))
    assert result.returncode == 0 and f"anchors {instance}: 1 checkpoints match" in result.stdout, result.stdout


async def test_signing_turned_on_later_and_a_key_replaced_verify_with_each_key_named(
    sqlite_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    first, second = tmp_path / "first.pem", tmp_path / "second.pem"
    generate_key(first)
    generate_key(second)
    settings, _ = await anchored_trail(sqlite_url, sidecar_settings)  # two checkpoints, unsigned
    for key in (first, second):
        async with PersistenceSidecar(settings.model_copy(update={"audit_signing_key": key})) as sidecar:
            sidecar.record_trade(make_trade())
    anchors = str(tmp_path / "anchors")
    path = anchor_path(tmp_path / "anchors", "bot-x")
    assert ["signature" in entry for entry in lines_of(path)] == [False, False, True, True]
    both = ("--public-key", str(first) + ".pub", "--public-key", str(second) + ".pub")
    result = audit_cli(sqlite_url, "verify", "--anchors", anchors, *both)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "anchors bot-x: 4 checkpoints match" in result.stdout
    assert "NOTE: 2 checkpoints written before signing was turned on are not signed" in result.stdout
    since = audit_cli(sqlite_url, "verify", "--anchors", anchors, "--since-last-anchor", *both)
    assert since.returncode == 0, since.stdout + since.stderr
    # One key only: the other key's checkpoint does not verify.
    one = audit_cli(sqlite_url, "verify", "--anchors", anchors, "--public-key", str(first) + ".pub")
    assert one.returncode == 1 and f"{path}:4" in one.stdout and "signature does not verify" in one.stdout
    # An unsigned line after signed ones is not taken for one written before signing began.
    keys = [load_public_key(Path(str(key) + ".pub")) for key in (first, second)]
    unsigned = json.loads(path.read_text().splitlines()[0])
    with path.open("a") as file:
        file.write(json.dumps(unsigned) + "\n")
    problem = load_anchors(tmp_path / "anchors", INTERVAL, keys).problem
    assert problem is not None and problem[0].line == 5 and "not signed, after signed checkpoints" in problem[1]


async def test_since_last_anchor_holds_every_checkpoint_of_the_newest_seq(
    clean_database_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    await anchored_trail(clean_database_url, sidecar_settings)
    path = anchor_path(tmp_path / "anchors", "bot-x")
    newest = json.loads(path.read_text().splitlines()[-1])
    with path.open("a") as file:
        file.write(json.dumps({**newest, "hash": "f" * 64}) + "\n")  # the same seq, another hash
    for since in ((), ("--since-last-anchor",)):
        result = audit_cli(clean_database_url, "verify", "--anchors", str(tmp_path / "anchors"), *since)
        assert result.returncode == 1, result.stdout
        assert f"{path}:3" in result.stdout and "checkpoint says ffffffffffffffff" in result.stdout


def test_an_export_in_another_format_or_cut_short_cannot_be_checked_and_a_damaged_line_is_a_break(
    sqlite_url: str, sidecar_settings: SettingsFactory, tmp_path: Path
) -> None:
    asyncio.run(anchored_trail(sqlite_url, sidecar_settings))
    anchors = str(tmp_path / "anchors")
    nowhere = "sqlite+aiosqlite:////nonexistent/folder/none.db"
    exported = tmp_path / "trail.jsonl"
    assert audit_export(sqlite_url, exported).returncode == 0
    parquet = tmp_path / "trail.parquet"
    from tests.support.cli import run_in_process

    env = {**os.environ, "DATABASE_URL": sqlite_url}
    done = run_in_process("export", "audit", "--format", "parquet", "--output", str(parquet), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    other = audit_cli(nowhere, "verify", "--from-export", str(parquet), "--anchors", anchors)
    assert other.returncode == 2 and "is not an audit trail exported as JSON Lines" in other.stderr, other.stderr
    whole = exported.read_text()
    cut = tmp_path / "cut.jsonl"
    cut.write_text(whole[: len(whole) - 40])  # copied while it was written
    short = audit_cli(nowhere, "verify", "--from-export", str(cut), "--anchors", anchors)
    assert short.returncode == 2 and "ends in the middle of its line 8" in short.stderr, short.stderr
    lines = whole.splitlines()
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text("\n".join([*lines[:3], lines[3][:50], *lines[4:]]) + "\n")
    broken = audit_cli(nowhere, "verify", "--from-export", str(damaged), "--anchors", anchors)
    assert broken.returncode == 1 and "line 4 of" in broken.stdout and "is not an exported audit entry" in broken.stdout


@pytest.mark.parametrize("path", ["", "/", "."])
def test_keygen_to_a_path_that_is_no_file_name_is_refused_clearly(path: str, sqlite_url: str) -> None:
    result = audit_cli(sqlite_url, "keygen", path)
    assert result.returncode == 2 and "is not a file name for the key" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


async def test_a_checkpoint_is_appended_only_after_the_sqlite_log_it_names_is_fsynced(
    sidecar_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With synchronous=NORMAL a power cut can take back the newest commits until the log is synced: a checkpoint
    # written before that could name an entry the database no longer has. A power cut cannot be had here; the order
    # of the fsyncs is what shows it. The database is reached through a symlink, as a user may.
    real = tmp_path / "real" / "trading.db"
    real.parent.mkdir()
    link = tmp_path / "trading.db"
    link.symlink_to(real)
    synced: list[str] = []
    fsync = os.fsync

    def recording(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording)
    settings = sidecar_settings(f"sqlite+aiosqlite:///{link}", instance_id="bot-sync")
    async with PersistenceSidecar(settings) as sidecar:
        for _ in range(3):
            sidecar.record_trade(make_trade())
        await sidecar.flush()
        synced.clear()
    anchor = str(anchor_path(tmp_path / "anchors", "bot-sync"))
    assert anchor in synced, synced
    before = synced[: synced.index(anchor)]
    assert f"{real}-wal" in before and str(real) in before, synced


def test_only_a_sqlite_file_has_commits_to_make_durable_before_a_checkpoint() -> None:
    from persistence.write.runtime import _durability_of

    assert _durability_of(make_settings(database_url="sqlite+aiosqlite:///:memory:")) is None
    assert _durability_of(make_settings(database_url="postgresql+asyncpg://bot@db.example/trading")) is None
    assert _durability_of(make_settings(database_url="sqlite+aiosqlite:///x.db")) is not None
