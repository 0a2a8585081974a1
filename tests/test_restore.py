"""Restore: a checked backup replaces the database atomically, the old file kept; refused while in use or corrupt."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from persistence.db.backups import online_backup
from persistence.db.engine import create_database
from persistence.db.inuse_lock import DatabaseInUseLock
from persistence.errors import DatabaseInUseError, RestoreError
from persistence.migrations import head_revision, upgrade
from persistence.tables.repositories import Repositories
from persistence.tools.restore import pre_restore_path, restore_sqlite
from tests.support.cli import run_in_process
from tests.support.databases import make_settings
from tests.support.portability import as_rows, record_everything, varied_trades

REPO_ROOT = Path(__file__).resolve().parent.parent
TRADE_COUNT = 20_200


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


async def _all_trades(path: Path) -> dict[str, dict[str, object]]:
    database = create_database(make_settings(database_url=_url(path)))
    try:
        repos = Repositories(database)
        trades = await repos.trades.get_latest_trades(1_000_000)
        return as_rows(trades)
    finally:
        await database.dispose()


@pytest.fixture(scope="module")
def live_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[object]]:
    """A database with 20,200 trades, its backup, then more changes in the database after the backup; built once."""
    directory = tmp_path_factory.mktemp("restore-live")
    database_path, backup_path = directory / "bot.db", directory / "nightly.db"
    trades = varied_trades(TRADE_COUNT)

    async def prepare() -> None:
        database = create_database(make_settings(database_url=_url(database_path)))
        try:
            await upgrade(database)
            repos = await record_everything(database, trades)
            await asyncio.to_thread(online_backup, database_path, backup_path)
            await repos.trades.save_trade(trades[5].model_copy(update={"pnl": Decimal("-999.99999999")}))
            await repos.trades.save_trade(varied_trades(1, prefix="AFTER")[0])
        finally:
            await database.dispose()

    asyncio.run(prepare())
    return database_path, backup_path, list(trades)


@pytest.fixture
def live(live_template: tuple[Path, Path, list[object]], tmp_path: Path) -> tuple[Path, Path, list[object]]:
    """The template's database and backup copied for this test alone (a restore replaces one, some tests damage
    the other): every test starts from the same bytes without recording 20,200 trades again."""
    template_database, template_backup, trades = live_template
    database_path, backup_path = tmp_path / "bot.db", tmp_path / "nightly.db"
    copied = [path.name for path in template_database.parent.iterdir()]
    assert sorted(copied) == ["bot.db", "nightly.db"], copied  # closed cleanly: no -wal or -shm beside them
    shutil.copyfile(template_database, database_path)
    shutil.copyfile(template_backup, backup_path)
    return database_path, backup_path, list(trades)


async def test_restore_brings_back_every_trade_value_for_value_and_keeps_the_replaced_file(
    live: tuple[Path, Path, list[object]],
) -> None:
    database_path, backup_path, trades = live
    before = await _all_trades(database_path)
    assert len(before) == TRADE_COUNT + 1

    result = await asyncio.to_thread(restore_sqlite, backup_path, database_path)
    assert result.database == database_path.resolve() and result.revision == head_revision()
    assert result.pre_restore == pre_restore_path(database_path.resolve())
    assert "kept as" in result.summary() and "integrity ok" in result.summary()
    assert sorted(path.name for path in backup_path.parent.glob("nightly.db*")) == ["nightly.db"]

    restored = await _all_trades(database_path)
    assert restored == as_rows(trades)  # type: ignore[arg-type]
    assert await _all_trades(pre_restore_path(database_path)) == before
    with sqlite3.connect(database_path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert connection.execute("SELECT count(*) FROM dead_letters").fetchone() == (1,)


@pytest.mark.parametrize("damage", ["corrupt pages", "not a database", "missing", "no schema", "newer schema"])
def test_a_bad_backup_is_refused_with_a_clear_error_and_the_database_left_untouched(
    live: tuple[Path, Path, list[object]], damage: str, tmp_path: Path
) -> None:
    database_path, backup_path, _ = live
    if damage == "corrupt pages":
        data = bytearray(backup_path.read_bytes())
        page = 4096
        for offset in range(3 * page, min(len(data), 40 * page), page):
            data[offset + 8 : offset + 200] = os.urandom(192)
        backup_path.write_bytes(bytes(data))
        expected = "the backup is corrupt"
    elif damage == "not a database":
        backup_path.write_bytes(b"these are not the pages you are looking for" * 200)
        expected = "not a usable SQLite database"
    elif damage == "missing":
        backup_path.unlink()
        expected = "does not exist"
    elif damage == "no schema":
        backup_path.unlink()
        with sqlite3.connect(backup_path) as connection:
            connection.execute("CREATE TABLE notes (body TEXT)")
        expected = "has no schema revision"
    else:
        with sqlite3.connect(backup_path) as connection:
            connection.execute("UPDATE alembic_version SET version_num = 'f00dfeed9999'")
        expected = "'f00dfeed9999', unknown to this release"
    before = _digest(database_path)
    with pytest.raises(RestoreError) as refused:
        restore_sqlite(backup_path, database_path)
    assert expected in str(refused.value) and "the database was not changed" in str(refused.value)
    assert _digest(database_path) == before
    assert not pre_restore_path(database_path).exists()
    assert sorted(p.name for p in tmp_path.iterdir() if "restoring" in p.name) == []


LOCK_HOLDER = """
import sys
from pathlib import Path
from persistence.db.inuse_lock import DatabaseInUseLock

lock = DatabaseInUseLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin (or kills us)
lock.release()
"""


def _lock_holder(database: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(database)],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "locked"
    return child


def test_restore_is_refused_while_another_process_holds_the_database_lock(
    live: tuple[Path, Path, list[object]], tmp_path: Path
) -> None:
    database_path, backup_path, _ = live
    before = _digest(database_path)
    holder = _lock_holder(database_path)
    try:
        with pytest.raises(DatabaseInUseError, match="a sidecar has it open"):
            restore_sqlite(backup_path, database_path)
        assert _digest(database_path) == before and not pre_restore_path(database_path).exists()
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DATABASE_URL": _url(database_path)}
        done = subprocess.run(
            [sys.executable, "-m", "persistence", "restore", str(backup_path)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 1 and "is in use: a sidecar has it open" in done.stderr and "stop it" in done.stderr
        assert _digest(database_path) == before
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    result = restore_sqlite(backup_path, database_path)
    assert result.pre_restore is not None and result.pre_restore.exists()


def test_the_lock_is_shared_between_sidecars_and_exclusive_for_a_restore(tmp_path: Path) -> None:
    database = tmp_path / "bot.db"
    first, second, restore = DatabaseInUseLock(database), DatabaseInUseLock(database), DatabaseInUseLock(database)
    with first, second:
        assert first.held and second.held
        with pytest.raises(DatabaseInUseError):
            restore.acquire(exclusive=True)
    restore.acquire(exclusive=True)
    try:
        with pytest.raises(DatabaseInUseError, match="being restored"):
            first.acquire()
    finally:
        restore.release()
    first.acquire()
    first.release()
    assert not first.held and (tmp_path / "bot.db.lock").exists()


def test_a_lock_holder_killed_with_sigkill_leaves_no_stale_lock(tmp_path: Path) -> None:
    database = tmp_path / "bot.db"
    holder = _lock_holder(database)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = DatabaseInUseLock(database)
    lock.acquire(exclusive=True)
    lock.release()


def test_an_earlier_pre_restore_copy_is_replaced_only_with_force(
    live: tuple[Path, Path, list[object]], tmp_path: Path
) -> None:
    database_path, backup_path, _ = live
    restore_sqlite(backup_path, database_path)
    kept = pre_restore_path(database_path)
    first_copy = _digest(kept)
    with pytest.raises(RestoreError, match="pass --force"):
        restore_sqlite(backup_path, database_path)
    assert _digest(kept) == first_copy
    env = {**os.environ, "DATABASE_URL": _url(database_path)}
    # By its main() in this process (tests.support.cli); the lock test above runs restore in a real process.
    done = run_in_process("restore", str(backup_path), "--force", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"restored {database_path.resolve()} from {backup_path.resolve()}")
    assert len(done.stdout.splitlines()) == 1


def test_restore_into_a_missing_database_just_places_the_backup(
    live: tuple[Path, Path, list[object]], tmp_path: Path
) -> None:
    _, backup_path, trades = live
    target = tmp_path / "new" / "bot.db"
    result = restore_sqlite(backup_path, target)
    assert result.pre_restore is None and target.exists()
    assert asyncio.run(_all_trades(target)) == as_rows(trades)  # type: ignore[arg-type]


def test_the_restore_command_refuses_a_postgresql_database(tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": "postgresql+asyncpg://u@127.0.0.1:1/db"}
    done = run_in_process("restore", "x.db", cwd=tmp_path, env=env)
    assert done.returncode == 2 and "pg_restore" in done.stderr


@pytest.mark.parametrize("sidecar_spelling", ["symlink", "real"])
async def test_a_sidecar_holds_the_in_use_lock_of_the_resolved_file_whatever_the_spelling(
    tmp_path: Path, sidecar_spelling: str
) -> None:
    from persistence import PersistenceSidecar

    real = tmp_path / "data" / "trading_system.db"
    real.parent.mkdir()
    link = tmp_path / "current.db"
    link.symlink_to(real)
    backup = tmp_path / "nightly.db"
    opened, restored = (link, real) if sidecar_spelling == "symlink" else (real, link)
    settings = make_settings(database_url=_url(opened), journal_dir=tmp_path / "journal")
    async with PersistenceSidecar(settings, log_events=False) as sidecar:
        await sidecar.record_trade(varied_trades(1)[0])
        await asyncio.to_thread(online_backup, real, backup)
        before = _digest(real)
        with pytest.raises(DatabaseInUseError, match="in use"):
            await asyncio.to_thread(restore_sqlite, backup, restored)
        with pytest.raises(DatabaseInUseError):  # every spelling of the file is one lock
            DatabaseInUseLock(tmp_path / "data" / ".." / "current.db").acquire(exclusive=True)
        assert _digest(real) == before and not pre_restore_path(real).exists()
    await asyncio.to_thread(restore_sqlite, backup, restored)  # closed: the lock is free under every spelling
