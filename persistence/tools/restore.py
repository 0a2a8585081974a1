"""Restore a SQLite database from a backup: checked first, refused while in use, the old file kept, swapped atomically.

Before anything changes, the backup must pass ``PRAGMA integrity_check`` and carry a schema revision this release
knows; a corrupt file, a file that is not a database, or one from a newer release is refused and the database is left
untouched. The restore then takes the database's lock exclusively
(:class:`~persistence.db.inuse_lock.DatabaseInUseLock`), so it refuses while a sidecar has the database open. The
backup is copied with SQLite's backup API to a temporary file beside the database; the current database is checkpointed
(its ``-wal`` emptied into the file) and hard-linked to ``<database>.pre-restore``; then the temporary file is renamed
over the database, one atomic step: the database path always names either the old database or the restored one, never a
half-written file. A stale ``-shm`` is removed so the restored file starts clean. Blocking file I/O: async callers run
it in a thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alembic.script import ScriptDirectory

from persistence.db.backups import online_backup
from persistence.db.inuse_lock import DatabaseInUseLock
from persistence.errors import RestoreError
from persistence.migrations import alembic_config
from persistence.migrations.guard import is_known

PRE_RESTORE_SUFFIX = ".pre-restore"


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What a restore did."""

    database: Path
    backup: Path
    revision: str
    bytes: int
    pre_restore: Path | None

    def summary(self) -> str:
        """One line for people."""
        kept = f"; the replaced database is kept as {self.pre_restore}" if self.pre_restore else ""
        return (
            f"restored {self.database} from {self.backup} (schema revision {self.revision}, {self.bytes:,} bytes,"
            f" integrity ok){kept}"
        )


def pre_restore_path(database: Path) -> Path:
    """Where the database replaced by a restore is kept: ``<database>.pre-restore``."""
    return database.with_name(database.name + PRE_RESTORE_SUFFIX)


def check_backup(backup: Path, database: Path, extra_version_locations: Sequence[Path] = ()) -> str:
    """Check ``backup`` (integrity, schema revision known to this release); return its revision or raise."""
    if not backup.is_file():
        raise RestoreError(backup, database, "the backup file does not exist")
    try:
        connection = sqlite3.connect(f"file:{backup}?mode=ro", uri=True, timeout=10.0)
    except sqlite3.Error as exc:
        raise RestoreError(backup, database, f"the backup cannot be opened ({exc})") from exc
    try:
        problems = [row[0] for row in connection.execute("PRAGMA integrity_check(5)")]
        if problems != ["ok"]:
            raise RestoreError(backup, database, f"the backup is corrupt: {'; '.join(problems)}")
        try:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.OperationalError:
            row = None
    except sqlite3.DatabaseError as exc:
        what = "corrupt" if "malformed" in str(exc) else "not a usable SQLite database"
        raise RestoreError(backup, database, f"the backup is {what} ({exc})") from exc
    finally:
        connection.close()
    if row is None:
        raise RestoreError(backup, database, "the backup has no schema revision (not a persistence-sidecar database)")
    revision = str(row[0])
    script = ScriptDirectory.from_config(alembic_config(extra_version_locations))
    if not is_known(script, revision):
        raise RestoreError(
            backup,
            database,
            f"the backup is at schema revision {revision!r}, unknown to this release (newest"
            f" {script.get_current_head()!r}); restore it with the release that wrote it",
        )
    return revision


def restore_sqlite(
    backup: Path,
    database: Path,
    *,
    force: bool = False,
    extra_version_locations: Sequence[Path] = (),
) -> RestoreResult:
    """Replace the SQLite ``database`` with ``backup`` (see the module documentation).

    Without ``force``, an existing ``<database>.pre-restore`` (an earlier restore's kept copy) is not overwritten.
    """
    backup, database = Path(backup).resolve(), Path(database).resolve()
    if backup == database:
        raise RestoreError(backup, database, "the backup is the database itself")
    untouched = {path for path in _companions(backup) if not path.exists()}
    try:
        return _restore(backup, database, force=force, extra_version_locations=extra_version_locations)
    finally:
        _tidy(untouched)


def _companions(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


def _tidy(created: set[Path]) -> None:
    """Remove the empty ``-wal``/``-shm`` files that reading the backup created beside it."""
    wal = next((path for path in created if path.name.endswith("-wal")), None)
    if wal is not None and wal.exists() and wal.stat().st_size > 0:
        return
    for path in created:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _restore(backup: Path, database: Path, *, force: bool, extra_version_locations: Sequence[Path]) -> RestoreResult:
    revision = check_backup(backup, database, extra_version_locations)
    kept = pre_restore_path(database)
    if database.exists() and kept.exists() and not force:
        raise RestoreError(backup, database, f"{kept} exists (an earlier restore's copy); pass --force to replace it")
    lock = DatabaseInUseLock(database)
    lock.acquire(exclusive=True)
    staged = database.with_name(f".{database.name}.restoring")
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        online_backup(backup, staged)
        keep: Path | None = None
        if database.exists():
            _settle(backup, database)
            if kept.exists():
                kept.unlink()
            _keep_copy(database, kept)
            keep = kept
        _remove_sidecar_files(backup, database, keep)
        os.replace(staged, database)
        _fsync_directory(database.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        raise
    finally:
        lock.release()
    return RestoreResult(database, backup, revision, database.stat().st_size, keep)


def _settle(backup: Path, database: Path) -> None:
    """Move everything in the database's ``-wal`` into the file, so the file alone is the whole database."""
    try:
        connection = sqlite3.connect(database, timeout=10.0)
        try:
            busy, _log, _done = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        # A database that cannot even be opened is what restores are for: keep its file as it is.
        if "not a database" in str(exc) or "malformed" in str(exc):
            return
        raise RestoreError(backup, database, f"the current database could not be checkpointed ({exc})") from exc
    if busy:
        raise RestoreError(backup, database, "another connection is using the database (its log is busy)")


def _keep_copy(database: Path, kept: Path) -> None:
    try:
        os.link(database, kept)
    except OSError:
        shutil.copy2(database, kept)


def _remove_sidecar_files(backup: Path, database: Path, kept: Path | None) -> None:
    wal = database.with_name(database.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        # Frames left in the log would be replayed into the restored file; they belong with the kept copy.
        if kept is None:
            raise RestoreError(backup, database, f"{wal} holds changes of no database file")
        os.replace(wal, kept.with_name(kept.name + "-wal"))
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            database.with_name(database.name + suffix).unlink()


def _fsync_directory(path: Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
