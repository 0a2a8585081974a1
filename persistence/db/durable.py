"""Making what SQLite has committed durable now, for the audit checkpoints.

With ``synchronous=NORMAL`` (the sidecar's setting, WAL mode) a commit is safe from a crash of the process at once,
but reaches the disk itself only at the log's next sync: a power cut before it can take back the newest commits.
An audit checkpoint must never name an entry that a power cut could take back (verify would then report the
honest trail's tail as deleted), so before a checkpoint is appended the database's write-ahead log and file are
fsynced: :func:`sync_committed`, blocking, run in a thread. PostgreSQL's commits are durable when they return.
"""

from __future__ import annotations

import os
from pathlib import Path


def sync_committed(database_file: Path) -> None:
    """fsync the SQLite file's write-ahead log and the file itself (a symlink followed), so that every transaction
    committed so far survives a power cut. A file or log that does not exist is skipped; ``OSError`` otherwise."""
    target = database_file.resolve()
    for path in (target.with_name(f"{target.name}-wal"), target):
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
