"""Log lines for sidecar events: one event name per happening, with counts, latency, error class and correlation id.

:class:`EventLogger` subscribes to the sidecar's :class:`~persistence.events.EventBus`. It never logs per record at
INFO: a committed batch is DEBUG, trouble is WARNING or worse. Error messages are passed through the secret mask
so a database password never reaches a log line.
"""

from __future__ import annotations

import re
from typing import Any

import structlog

from persistence.events import (
    BatchCommitted,
    BreakerChanged,
    DatabaseRecovered,
    DatabaseUnavailable,
    Event,
    JournalCorrupt,
    JournalReplayed,
    JournalSpilled,
    JournalSynced,
    PersistenceToggled,
    RecordDeadLettered,
    RecordsDropped,
    ShutdownComplete,
    SidecarStarted,
    WriteFailed,
    WriteRetried,
)

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<password>[^@\s]+)@")
_BREAKER_EVENTS = {"open": "circuit_opened", "half_open": "circuit_half_open", "closed": "circuit_closed"}


def mask_secrets(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Hide passwords in URLs and any of the given secret strings."""
    masked = _URL_PASSWORD.sub(r"\g<scheme>***@", text)
    for secret in secrets:
        if secret:
            masked = masked.replace(secret, "***")
    return masked


class EventLogger:
    """Turns sidecar events into structlog lines."""

    def __init__(self, logger: Any | None = None, secrets: tuple[str, ...] = ()) -> None:
        self._log = logger if logger is not None else structlog.get_logger("persistence")
        self._secrets = secrets

    def _error(self, text: str) -> str:
        return mask_secrets(text, self._secrets)

    def __call__(self, event: Event) -> None:
        log = self._log
        match event:
            case BatchCommitted():
                latencies = [latency for _, latency in event.latencies]
                log.debug(
                    "batch_committed",
                    records=event.records,
                    by_entity=dict(event.by_entity),
                    duration_ms=round(event.duration * 1000, 3),
                    max_latency_ms=round(max(latencies) * 1000, 3) if latencies else None,
                    from_journal=event.from_journal,
                    correlation_ids=list(event.correlation_ids),
                )
            case WriteFailed():
                log.warning(
                    "write_failed",
                    records=event.records,
                    by_entity=dict(event.by_entity),
                    error_class=event.error_class,
                    error=self._error(event.error),
                    transient=event.transient,
                    attempts=event.attempts,
                    correlation_ids=list(event.correlation_ids),
                )
            case WriteRetried():
                log.info(
                    "write_retried",
                    attempt=event.attempt,
                    delay_ms=round(event.delay * 1000, 1),
                    error_class=event.error_class,
                    error=self._error(event.error),
                )
            case BreakerChanged():
                name = _BREAKER_EVENTS.get(event.to_state, "circuit_changed")
                method = (
                    log.error
                    if event.to_state == "open"
                    else log.warning
                    if event.to_state == "half_open"
                    else log.info
                )
                method(
                    name,
                    from_state=event.from_state,
                    to_state=event.to_state,
                    consecutive_failures=event.consecutive_failures,
                )
            case RecordDeadLettered():
                log.error(
                    "record_dead_lettered",
                    entity=event.entity,
                    key=event.key,
                    error_class=event.error_class,
                    error=self._error(event.error),
                    correlation_id=event.correlation_id,
                )
            case JournalSpilled():
                log.warning(
                    "journal_spilled", records=event.records, journal_pending=event.journal_pending, reason=event.reason
                )
            case JournalSynced():
                log.debug("journal_synced", records=event.records, duration_ms=round(event.duration * 1000, 3))
            case JournalReplayed():
                log.info("journal_replayed", records=event.records, journal_pending=event.journal_pending)
            case JournalCorrupt():
                log.warning("journal_corrupt_lines_skipped", lines=event.lines)
            case RecordsDropped():
                log.error(
                    "records_dropped",
                    entity=event.entity,
                    count=event.count,
                    reason=event.reason,
                    error=self._error(event.error),
                )
            case DatabaseUnavailable():
                method = log.critical if event.at_startup else log.error
                method(
                    "database_unavailable",
                    error_class=event.error_class,
                    error=self._error(event.error),
                    at_startup=event.at_startup,
                    mode="memory_only",
                )
            case DatabaseRecovered():
                log.info("database_recovered", history_loaded=event.history_loaded)
            case SidecarStarted():
                log.info(
                    "sidecar_started",
                    database_ready=event.database_ready,
                    history_loaded=event.history_loaded,
                    journal_pending=event.journal_pending,
                    schema_revision=event.schema_revision,
                    duration_ms=round(event.duration * 1000, 1),
                )
            case PersistenceToggled():
                log.info("persistence_toggled", enabled=event.enabled)
            case ShutdownComplete():
                log.info(
                    "shutdown_complete",
                    persisted=event.persisted,
                    journaled=event.journaled,
                    dead_lettered=event.dead_lettered,
                    dropped=event.dropped,
                    journal_pending=event.journal_pending,
                    duration_ms=round(event.duration * 1000, 1),
                )
            case _:
                log.debug(type(event).__name__)
