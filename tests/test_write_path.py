"""The walk of one trade from ``record_trade`` to COMMIT and its receipt, measured so it cannot silently grow back.

Every Python call made between ``record_trade`` and the receipt answering ``persisted``, on the event loop's thread
and on SQLite's driver thread, is profiled; the calls into the library's own modules are the walk. The library's
dependencies (SQLAlchemy, the driver, structlog, prometheus_client) are not counted, nor the host's log processors,
nor the journal thread (not on a clean commit's way). The bounds are the figures measured when the writer was given
the committer directly: 22 modules and 143 calls (before, with the runtime as the writer's target: 23 modules, 139
to 143 calls, the runtime entered six times), a few calls of slack; the background WAL checkpoint, which could run
inside the walk on a busy machine, is kept out of it. The flat layout before the re-housing (``d29ed36``) measures
19 modules and 129 calls by this same profiler; from the writer's turn to the settled receipt, 14 modules then and 15
now (the hash apart from the trail, the driver's thread apart from the engine, the database's preparation apart
from the writer).
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from dataclasses import dataclass
from types import FrameType
from typing import Any

import pytest

from persistence import PersistenceSidecar
from persistence.db.wal_checkpoint import WalCheckpointer
from tests.support.factories import make_trade
from tests.support.sidecars import SettingsFactory, build

MAX_MODULES = 22
UNCOUNTED = frozenset({"persistence.testing", "persistence.observe.logger"})
"""The fake clock, and the log processors, which run only when the host (or an earlier test) configured structlog."""
MAX_CALLS = 150


@dataclass(frozen=True)
class Walk:
    """The library calls on one trade's way, in order, as (module, function)."""

    calls: tuple[tuple[str, str], ...]
    callers: dict[tuple[str, str], tuple[str, str]]
    """Who called each function, the first time it was called."""

    @property
    def modules(self) -> Counter[str]:
        return Counter(module for module, _ in self.calls)

    def entries(self) -> Counter[str]:
        """How many times the walk enters each module from another one."""
        counts: Counter[str] = Counter()
        previous = None
        for module, _ in self.calls:
            if module != previous:
                counts[module] += 1
            previous = module
        return counts


class Profiler:
    """Records the library's calls on every thread (the loop's, and SQLite's driver thread) while ``active``.

    Installed before the sidecar is built, so the threads it starts are profiled too (``threading.setprofile``).
    """

    def __init__(self) -> None:
        self.active = False
        self.calls: list[tuple[str, str]] = []
        self.callers: dict[tuple[str, str], tuple[str, str]] = {}
        self._seen: set[FrameType] = set()  # a coroutine resumed is the same call, not a new one

    def __call__(self, frame: FrameType, event: str, _arg: Any) -> None:
        if not self.active or event != "call" or frame in self._seen:
            return
        module = frame.f_globals.get("__name__", "")
        name = frame.f_code.co_name
        if module.partition(".")[0] == "persistence" and module not in UNCOUNTED and name[0] != "<":
            self._seen.add(frame)
            self.calls.append((module, name))
            caller = frame.f_back
            if caller is not None:
                self.callers.setdefault((module, name), (caller.f_globals.get("__name__", ""), caller.f_code.co_name))

    def __enter__(self) -> Profiler:
        threading.setprofile(self)
        sys.setprofile(self)
        return self

    def __exit__(self, *_: object) -> None:
        sys.setprofile(None)
        threading.setprofile(None)

    async def walk_of_one_trade(self, sidecar: PersistenceSidecar) -> Walk:
        """Record one trade and keep the library's calls until its receipt says ``persisted``."""
        trade = make_trade()
        self.calls, self.callers, self._seen = [], {}, set()
        self.active = True
        try:
            status = await sidecar.record_trade(trade)
        finally:
            self.active = False
        assert status == "persisted"
        return Walk(tuple(self.calls), self.callers)


async def test_one_trades_walk_to_commit_and_receipt_stays_short(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_checkpoint(self: WalCheckpointer, delay: float) -> None:
        return None

    # The background WAL checkpoint is not on a trade's way, but on a busy machine it ran, whole or in part, inside
    # the walk (160 calls once, against 143): its task does nothing here, so the walk counts only the trade's calls
    # (``after_commit``, which starts it, still counts).
    monkeypatch.setattr(WalCheckpointer, "_run", no_checkpoint)
    with Profiler() as profiler:
        sidecar = build(sidecar_settings(sqlite_url), sidecars)
        await sidecar.start()
        for _ in range(2):  # warm: first-use imports and caches, and the first commit's background checkpoint
            assert await sidecar.record_trade(make_trade()) == "persisted"
        walk = await profiler.walk_of_one_trade(sidecar)
    assert len(walk.modules) <= MAX_MODULES, sorted(walk.modules)
    assert len(walk.calls) <= MAX_CALLS, (len(walk.calls), walk.modules)
    # The composition root takes no part in a write; the committer is called by the writer itself, and the receipt
    # is settled in one named place.
    assert "persistence.write.runtime" not in walk.modules
    assert walk.callers[("persistence.write.committer", "commit")] == ("persistence.write.writer", "_write_next_batch")
    assert walk.callers[("persistence.records.receipts", "mark_persisted")] == (
        "persistence.write.writer",
        "_settle_receipts",
    )
