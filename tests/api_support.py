"""A SQLite database that cannot even be read: another connection in exclusive locking mode holding a write."""

from __future__ import annotations

import sqlite3
from pathlib import Path


class ReadLock:
    """Holds a SQLite file so that no other connection can read it (``locking_mode=EXCLUSIVE`` plus a write).

    In WAL mode ``BEGIN EXCLUSIVE`` alone still lets readers in; exclusive locking mode does not. Released by
    closing the connection.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._connection: sqlite3.Connection | None = None

    def __enter__(self) -> ReadLock:
        connection = sqlite3.connect(self._path, isolation_level=None, timeout=10)
        connection.execute("PRAGMA locking_mode=EXCLUSIVE")
        connection.execute("BEGIN EXCLUSIVE")
        connection.execute("CREATE TABLE IF NOT EXISTS read_lock_probe (x INTEGER)")
        self._connection = connection
        return self

    def __exit__(self, *_: object) -> None:
        if self._connection is not None:
            self._connection.rollback()
            self._connection.close()
            self._connection = None
