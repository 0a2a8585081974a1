"""Online backups of a SQLite database file, and the automatic one taken before a migration.

:func:`online_backup` copies a live database with SQLite's backup API from one read transaction (a consistent
snapshot while writers go on), into a temporary file that is checked with ``PRAGMA integrity_check`` and then
renamed into place, so a backup file that exists is always a whole one. :func:`backup_before_migration` names the copy
after the database, the time and the schema revision it had, and keeps the newest ``keep`` of those copies in the
backup folder (older automatic copies of the same database are deleted; nothing else in the folder is touched).
Everything here is blocking file I/O: async callers run it in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from persistence.config import Settings
from persistence.errors import BackupError

BACKUP_PAGES_PER_STEP = 256
"""Pages copied per step of the backup; writers go on between steps."""
KEEP_BACKUPS = 3
"""Automatic backups kept per database."""
_STAMP = "%Y%m%dT%H%M%S%fZ"


def backup_dir_for(settings: Settings) -> Path | None:
    """Where automatic pre-migration backups go for ``settings``, or ``None`` when they are off (or not SQLite)."""
    if not settings.is_sqlite or not settings.backup_before_migrate:
        return None
    return settings.backup_dir


def online_backup(source: Path, destination: Path, pages: int = BACKUP_PAGES_PER_STEP) -> int:
    """Copy the SQLite database ``source`` to ``destination`` (written whole or not at all); returns the page count."""
    partial = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, isolation_level=None, timeout=10.0)
    try:
        dst = sqlite3.connect(partial)
        try:
            src.execute("BEGIN")
            src.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            copied = [0]

            def progress(_status: int, _remaining: int, total: int) -> None:
                copied[0] = total

            src.backup(dst, pages=pages, progress=progress, sleep=0.001)
            src.execute("COMMIT")
            (check,) = dst.execute("PRAGMA integrity_check").fetchone()
            if check != "ok":
                raise BackupError(f"the copy of {source} failed its integrity check: {check}", path=source)
        finally:
            dst.close()
        _fsync(partial)
        os.replace(partial, destination)
        _fsync_directory(destination.parent)
        return copied[0]
    except BaseException:
        for leftover in (partial, *(partial.with_name(partial.name + end) for end in ("-journal", "-wal", "-shm"))):
            with contextlib.suppress(OSError):
                leftover.unlink()
        raise
    finally:
        src.close()


def write_failure_cause(destination: Path, error: BaseException) -> str:
    """Why ``destination`` could not be written, in words naming the user's path (never a temporary file's).

    Reads the ``errno`` of an :class:`OSError`; SQLite's own errors carry none, so the folder is looked at instead.
    """
    code = error.errno if isinstance(error, OSError) else None
    if isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        code = errno.ENOSPC
    folder = destination.parent
    if code is None:
        if not folder.is_dir():
            code = errno.ENOTDIR if _file_ancestor(folder) is not None else errno.ENOENT
        elif os.statvfs(folder).f_flag & os.ST_RDONLY:
            code = errno.EROFS
        elif not os.access(folder, os.W_OK):
            code = errno.EACCES
    if code == errno.ENOENT:
        return f"the folder {folder} does not exist"
    if code == errno.ENOTDIR:
        return f"{_file_ancestor(folder) or folder} is a file, not a folder"
    if code == errno.EROFS:
        return "the file system is read-only"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device (the disk is full)"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _file_ancestor(folder: Path) -> Path | None:
    """The first of ``folder`` and its ancestors that exists and is not a folder."""
    for candidate in [*reversed(folder.parents), folder]:
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


def holds_data(database_file: Path, tables: Iterable[str]) -> bool:
    """Whether any of ``tables`` that exist in the SQLite file has a row (a missing file holds nothing)."""
    if not database_file.exists():
        return False
    connection = sqlite3.connect(f"file:{database_file}?mode=ro", uri=True, timeout=10.0)
    try:
        present = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table in tables:
            if table in present and connection.execute(f'SELECT 1 FROM "{table}" LIMIT 1').fetchone():  # noqa: S608
                return True
        return False
    finally:
        connection.close()


def backup_before_migration(
    database_file: Path,
    backup_dir: Path,
    *,
    revision: str | None,
    keep: int = KEEP_BACKUPS,
    now: datetime | None = None,
) -> Path:
    """Back ``database_file`` up into ``backup_dir`` before a migration and keep the newest ``keep`` such copies."""
    backup_dir.mkdir(parents=True, exist_ok=True)
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    destination = backup_dir / f"{database_file.stem}-{moment.strftime(_STAMP)}-rev{revision or 'none'}.db"
    try:
        online_backup(database_file, destination)
    except sqlite3.Error as exc:
        raise BackupError(f"could not back {database_file} up to {destination}: {exc}", path=database_file) from exc
    prune_backups(backup_dir, database_file.stem, keep)
    return destination


def automatic_backups(backup_dir: Path, stem: str) -> list[Path]:
    """The automatic backups of the database named ``stem`` in ``backup_dir``, oldest first."""
    if not backup_dir.is_dir():
        return []
    found = [path for path in backup_dir.glob(f"{stem}-*Z-rev*.db") if _is_automatic(path.name, stem)]
    return sorted(found, key=lambda path: path.name)


def prune_backups(backup_dir: Path, stem: str, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` automatic backups of ``stem``; returns those deleted."""
    backups = automatic_backups(backup_dir, stem)
    doomed = backups[: max(len(backups) - keep, 0)]
    for path in doomed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return doomed


def _is_automatic(name: str, stem: str) -> bool:
    stamp = name[len(stem) + 1 :].split("-rev", 1)[0]
    try:
        datetime.strptime(stamp, _STAMP)
    except ValueError:
        return False
    return True


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_directory(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened for fsync
        _fsync(path)
