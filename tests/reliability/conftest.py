"""The chaos soak runs beside the rest of the suite, not before it.

Its load is paced in real time: 40 s of it cost about 4 s of CPU, the rest is waiting. So its process starts as
soon as collection ends, the tests that read its figures (those using ``soak_figures``) move to the end of the
run, and by the time they run the soak has long finished. It runs in full, in its own process as before (so RSS is
its own); only the wait is gone. Nothing is deselected: a run without those tests does not start it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SOAK_SECONDS = 40
SOAK_TIMEOUT = SOAK_SECONDS + 180


class BackgroundSoak:
    """``python -m tests.reliability.soak`` started now; :meth:`figures` waits for it and reads its JSON line."""

    def __init__(self) -> None:
        self._scratch = tempfile.TemporaryDirectory(prefix="soak-")
        scratch = self._scratch.name
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.soak", "--seconds", str(SOAK_SECONDS), "--workdir", scratch],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._result: tuple[int, str, str] | None = None

    def figures(self) -> dict[str, Any]:
        if self._result is None:
            stdout, stderr = self.process.communicate(timeout=SOAK_TIMEOUT)
            self._result = (self.process.returncode, stdout, stderr)
        returncode, stdout, stderr = self._result
        assert returncode == 0, stderr[-3000:]
        figures: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
        return figures

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()
        self._scratch.cleanup()


SOAK = pytest.StashKey[BackgroundSoak]()


def _reads_the_soak(item: pytest.Item) -> bool:
    return "soak_figures" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)  # after -k/-m deselected what they deselect
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    readers = [item for item in items if _reads_the_soak(item)]
    if not readers or config.option.collectonly:
        return
    items[:] = [item for item in items if not _reads_the_soak(item)] + readers
    config.stash[SOAK] = BackgroundSoak()


def pytest_unconfigure(config: pytest.Config) -> None:
    soak = config.stash.get(SOAK, None)
    if soak is not None:
        soak.stop()


@pytest.fixture(scope="session")
def soak_figures(pytestconfig: pytest.Config) -> dict[str, Any]:
    """The figures of the one soak of the run: ~500 records/s for 40 s under locks, full disks, poison, a restart."""
    soak = pytestconfig.stash.get(SOAK, None)
    if soak is None:  # not started at collection (a plugin reordered or re-collected): start it now
        soak = pytestconfig.stash[SOAK] = BackgroundSoak()
    return soak.figures()
