"""File systems for fault tests: a small real tmpfs, remounted read-only."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def read_only_file_system(where: Path) -> Iterator[Path]:
    """A small real tmpfs at ``where`` holding an empty ``journal`` folder, remounted read-only; skips the test
    (saying why) where mounting is not possible (not root, no mount privilege)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a read-only file system needs root to mount a tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        (where / "journal").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)
        yield where / "journal"
    finally:
        subprocess.run(["umount", str(where)], check=True, capture_output=True)
