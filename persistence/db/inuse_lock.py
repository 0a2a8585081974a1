"""The "database in use" lock: how a restore knows, reliably, that no sidecar has a SQLite database open.

A sidecar holds a *shared* ``flock`` on ``<database>.lock`` for as long as it has the database open; a restore takes
it *exclusively* and without waiting, so it fails at once while any sidecar runs (and a sidecar cannot start in the
middle of a restore). ``flock`` locks belong to the open file and the kernel drops them when the process ends, however
it ends, so a crashed sidecar never leaves a stale lock behind; the lock file itself is never deleted (deleting it
would let two processes lock two different files). POSIX only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

from persistence.errors import DatabaseInUseError


def lock_file_for(database: Path) -> Path:
    """The lock file beside ``database``: ``<database>.lock`` (given the resolved path, one per file)."""
    return database.with_name(database.name + ".lock")


class DatabaseInUseLock:
    """A non-blocking ``flock`` on ``<database>.lock``: :meth:`acquire` shared (sidecars), exclusive for a restore."""

    def __init__(self, database: Path) -> None:
        self.database = Path(database)
        # The lock belongs to the file, not to a spelling of it: through a symlink or a relative path, one lock file.
        self.lock_file = lock_file_for(self.database.resolve())
        self._descriptor: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._descriptor is not None

    def acquire(self, *, exclusive: bool = False) -> None:
        """Take the lock without waiting: shared by default; :class:`DatabaseInUseError` if it is held the other way."""
        if self._descriptor is not None:
            return
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise DatabaseInUseError(self.database, self.lock_file, exclusive=exclusive) from None
        except BaseException:
            os.close(descriptor)
            raise
        self._descriptor = descriptor

    def release(self) -> None:
        """Let the lock go (idempotent)."""
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(descriptor, fcntl.LOCK_UN)
            os.close(descriptor)

    def __enter__(self) -> DatabaseInUseLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
