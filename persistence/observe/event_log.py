"""Log lines for sidecar events, and the process-wide structlog set-up the command line and the demo use.

:class:`EventLogger` subscribes to the sidecar's :class:`~persistence.observe.events.EventBus`: one event name per
happening, with counts, latency, error class and the records' correlation ids. It never logs per record at INFO: a
committed batch is DEBUG, trouble is WARNING or worse. Error messages are passed through the secret mask so a
database password or the API token never reaches a log line.

:func:`configure_logging` is for the edge (the CLI, the demo, a host that wants our format): JSON lines in
production, a console renderer on a TTY, and the standard library's loggers (SQLAlchemy, Alembic, uvicorn) rendered
through the same processors. Importing this package never configures logging: the library logs through the
standard-library logger ``persistence`` (see :mod:`persistence.observe.logger`), so an embedding application's own
logging configuration decides what is shown and where, and with none nothing below WARNING appears and nothing goes to
stdout.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from persistence.config import Settings
from persistence.observe.correlation import current_correlation_id
from persistence.observe.events import (
    AuditAnchored,
    BatchCommitted,
    BreakerChanged,
    DatabaseRecovered,
    DatabaseUnavailable,
    Event,
    JournalCorrupt,
    JournalFailed,
    JournalReplayed,
    JournalSpilled,
    JournalSynced,
    JournalUnwritable,
    PersistenceToggled,
    RecordDeadLettered,
    RecordsDropped,
    SchemaNewerThanRelease,
    ShutdownComplete,
    SidecarStarted,
    WriteFailed,
    WriteRetried,
)
from persistence.observe.logger import get_logger

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<password>[^@\s]+)@")
_BREAKER_EVENTS = {"open": "circuit_opened", "half_open": "circuit_half_open", "closed": "circuit_closed"}


def mask_secrets(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Hide passwords in URLs and any of the given secret strings."""
    masked = _URL_PASSWORD.sub(r"\g<scheme>***@", text)
    for secret in secrets:
        if secret:
            masked = masked.replace(secret, "***")
    return masked


_LIBRARY_LOGGER = logging.getLogger("persistence")


def _never() -> bool:
    return False


def _debug_dropped() -> bool:
    """Whether a DEBUG line of the library's logger would be dropped: structlog unconfigured, stdlib level above."""
    return not structlog.is_configured() and not _LIBRARY_LOGGER.isEnabledFor(logging.DEBUG)


class EventLogger:
    """Turns sidecar events into structlog lines."""

    def __init__(self, logger: Any | None = None, secrets: tuple[str, ...] = ()) -> None:
        self._log = logger if logger is not None else get_logger("persistence")
        # With the library's own logger, a DEBUG line the host's logging would drop is not even built: a committed
        # batch is a DEBUG line, and at a steady 1000 records/s there is one every millisecond or so.
        self._quiet_debug: Callable[[], bool] = _never if logger is not None else _debug_dropped
        self._secrets = secrets

    def _error(self, text: str) -> str:
        return mask_secrets(text, self._secrets)

    def __call__(self, event: Event) -> None:
        log = self._log
        match event:
            case BatchCommitted() | JournalSynced() if self._quiet_debug():
                return
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
                    audit_seq=event.audit_seq,
                    audit_hash=event.audit_hash,
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
            case JournalFailed():
                log.warning(
                    "journal_failed",
                    operation=event.operation,
                    records=event.records,
                    error_class=event.error_class,
                    error=self._error(event.error),
                )
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
            case JournalUnwritable():
                log.critical(
                    "journal_unwritable", directory=event.directory, error=self._error(event.error), mode="degraded"
                )
            case SchemaNewerThanRelease():
                log.critical(
                    "schema_newer_than_release",
                    database_revision=event.database_revision,
                    release_revision=event.release_revision,
                    mode="memory_only",
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
            case AuditAnchored():
                log.info(
                    "audit_anchored",
                    instance_id=event.instance_id,
                    seq=event.seq,
                    hash=event.hash,
                    time=event.time,
                    path=event.path,
                    signed=event.signed,
                )
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


# ---------------------------------------------------------------------------------------------- process set-up

_NOISY_LOGGERS = ("sqlalchemy", "aiosqlite", "asyncio", "alembic")
"""Standard-library loggers kept at WARNING or above: at INFO SQLAlchemy would log every statement."""

_HANDLER_NAME = "persistence-structlog"


class SecretMasker:
    """A processor that masks URL passwords and the given secrets in every string value of a log line."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        self.secrets = secrets

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        """Mask ``event_dict`` in place (strings only, one level of lists and dicts)."""
        for key, value in event_dict.items():
            event_dict[key] = self._mask(value)
        return event_dict

    def _mask(self, value: Any) -> Any:
        if isinstance(value, str):
            return mask_secrets(value, self.secrets)
        if type(value) in (list, tuple):  # exactly: a namedtuple cannot be rebuilt from a generator
            return type(value)(mask_secrets(item, self.secrets) if isinstance(item, str) else item for item in value)
        if type(value) is dict:
            return {k: mask_secrets(v, self.secrets) if isinstance(v, str) else v for k, v in value.items()}
        return value


def add_correlation_id(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Add the current context's correlation id, unless the line already names its records' ids."""
    if "correlation_id" not in event_dict and "correlation_ids" not in event_dict:
        cid = current_correlation_id()
        if cid is not None:
            event_dict["correlation_id"] = cid
    return event_dict


def wants_console(log_format: str, stream: TextIO) -> bool:
    """``console`` or ``json`` as asked; ``auto`` means console on a TTY and JSON otherwise."""
    if log_format == "auto":
        isatty: Callable[[], bool] | None = getattr(stream, "isatty", None)
        return bool(isatty and isatty())
    return log_format == "console"


def configure_logging(settings: Settings, *, stream: TextIO | None = None) -> logging.Handler:
    """Set up structlog and the standard library for a process: call once at the edge (CLI, demo), never on import.

    ``PERSISTENCE_LOG_FORMAT`` chooses JSON lines or the console renderer (``auto``: console when ``stream``, by
    default standard error, is a TTY); ``PERSISTENCE_LOG_LEVEL`` the level. One handler on the root logger renders
    structlog's lines and every standard-library logger's (SQLAlchemy, Alembic, uvicorn: run uvicorn with
    ``log_config=None`` so its records reach the root logger) through the same processors: ISO timestamps in UTC,
    level, logger name, the current correlation id and the secret mask. Calling it again replaces the previous
    set-up. Loggers are not cached, so ``structlog.testing.capture_logs`` and later reconfiguration keep working;
    the sidecar logs per batch, never per record, so this costs nothing measurable. Returns the root handler.
    """
    out = stream if stream is not None else sys.stderr
    level = logging.getLevelNamesMapping()[settings.log_level]
    secrets = settings.secrets
    console = wants_console(settings.log_format, out)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        add_correlation_id,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        SecretMasker(secrets),
    ]
    renderer: Processor
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if console:
        renderer = structlog.dev.ConsoleRenderer(colors=_colors(out))
    else:
        final += [structlog.processors.dict_tracebacks]
        renderer = structlog.processors.JSONRenderer(sort_keys=False, default=str)
    final.append(_masked(renderer, secrets))
    formatter = structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final)

    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=False,
    )
    return handler


def _colors(stream: TextIO) -> bool:
    isatty: Callable[[], bool] | None = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _masked(renderer: Processor, secrets: tuple[str, ...]) -> Processor:
    """Mask the rendered line too: a traceback or a nested value may carry a URL the per-value mask did not see."""

    def render(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> Any:
        rendered = renderer(logger, method_name, event_dict)
        return mask_secrets(rendered, secrets) if isinstance(rendered, str) else rendered

    return render
