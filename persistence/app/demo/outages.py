"""The demo's condensed log of database outages: one warning when an outage starts, one line when it ends.

During an outage the sidecar's event logger writes a line per failed attempt, retry, breaker transition and
journal spill: right for production (each is a distinct happening a dashboard or a person may need), ten lines or
more per outage in a demo whose chaos mode makes one every few seconds. :class:`OutageSummary` sits in front of
:class:`~persistence.observe.event_log.EventLogger`: it swallows those events while an outage lasts, logs
``database_outage`` (WARNING) at its first sign and ``database_recovered`` (INFO) with what happened meanwhile once the
database takes writes again. Every other event (dead letters, drops, start-up, shutdown, committed batches at DEBUG)
passes through unchanged. Only the demo uses it, and only when the log level is INFO or above.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from persistence.observe.events import (
    BatchCommitted,
    BreakerChanged,
    DatabaseUnavailable,
    Event,
    JournalReplayed,
    JournalSpilled,
    JournalSynced,
    WriteFailed,
    WriteRetried,
)

_OUTAGE_EVENTS = (WriteFailed, WriteRetried, BreakerChanged, JournalSpilled, JournalSynced)


@dataclass(slots=True)
class _Outage:
    started: float
    failed_writes: int = 0
    retries: int = 0
    breaker_openings: int = 0
    journaled: int = 0
    replayed: int = 0


class OutageSummary:
    """An event listener: passes events to ``downstream``, condensing each outage to two log lines."""

    def __init__(self, downstream: Callable[[Event], None], logger: Any, clock: Callable[[], float] = time.monotonic):
        self._downstream = downstream
        self._log = logger
        self._clock = clock
        self._outage: _Outage | None = None
        self._retries_before = 0
        self.outages = 0

    def __call__(self, event: Event) -> None:
        """Handle one sidecar event."""
        outage = self._outage
        if outage is None and isinstance(event, WriteRetried):
            self._retries_before += 1  # a retry that gets through is no outage; counted if one follows
            return
        if outage is None and isinstance(event, BatchCommitted):
            self._retries_before = 0
        if isinstance(event, WriteFailed | DatabaseUnavailable) and not getattr(event, "at_startup", False):
            if outage is None:
                outage = self._start(event)
            if isinstance(event, WriteFailed):
                outage.failed_writes += 1
            return
        if outage is None:
            if isinstance(event, BreakerChanged) and event.to_state == "open":
                outage = self._start(event)
                outage.breaker_openings += 1
                return
            self._downstream(event)
            return
        if isinstance(event, BreakerChanged):
            if event.to_state == "open":
                outage.breaker_openings += 1
            elif event.to_state == "closed":
                self._end()
            return
        if isinstance(event, BatchCommitted) and outage.breaker_openings == 0:
            self._end()  # retries got through before the breaker had to open
        if isinstance(event, WriteRetried):
            outage.retries += 1
            return
        if isinstance(event, JournalSpilled):
            outage.journaled += event.records
            return
        if isinstance(event, JournalReplayed):
            outage.replayed += event.records
            return
        if isinstance(event, _OUTAGE_EVENTS):
            return
        self._downstream(event)

    def _start(self, event: Event) -> _Outage:
        self.outages += 1
        self._outage = _Outage(started=self._clock(), retries=self._retries_before)
        self._retries_before = 0
        self._log.warning(
            "database_outage",
            first_sign=type(event).__name__,
            error_class=getattr(event, "error_class", None),
            note="trading goes on; records wait in RAM and the journal until the database is back",
        )
        return self._outage

    def _end(self) -> None:
        outage, self._outage = self._outage, None
        if outage is None:
            return
        self._log.info(
            "database_recovered",
            outage_seconds=round(self._clock() - outage.started, 1),
            failed_writes=outage.failed_writes,
            retries=outage.retries,
            breaker_openings=outage.breaker_openings,
            journaled=outage.journaled,
            replayed_from_journal=outage.replayed,
        )
