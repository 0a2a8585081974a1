"""What happens inside the sidecar, as small frozen event objects, and the bus that carries them.

The write path publishes an event for everything worth observing (a batch committed, a write failed or was
retried, the breaker changed state, a record was dead-lettered, spilled to or replayed from the journal, or
dropped, the journal refused an operation, start-up and shutdown). Logging and metrics subscribe to the bus; the
core never calls them directly. No event is published per record on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from persistence.observe.logger import get_logger
from persistence.records.models import Entity

log = get_logger("persistence.events")


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every sidecar event."""


@dataclass(frozen=True, slots=True)
class SidecarStarted(Event):
    """Start-up finished (possibly degraded: see ``database_ready``)."""

    database_ready: bool
    history_loaded: int
    journal_pending: int
    schema_revision: str | None
    duration: float


@dataclass(frozen=True, slots=True)
class DatabaseUnavailable(Event):
    """The database could not be reached or migrated; the sidecar runs in memory-only mode."""

    error_class: str
    error: str
    at_startup: bool


@dataclass(frozen=True, slots=True)
class JournalUnwritable(Event):
    """At start the journal directory could not be written; ``PERSISTENCE_JOURNAL_REQUIRED=false`` started anyway,
    degraded: an outage keeps records in RAM only until the directory can be written."""

    directory: str
    error: str


@dataclass(frozen=True, slots=True)
class SchemaNewerThanRelease(Event):
    """The database was migrated by a newer release: it is never written; the sidecar runs memory-only with the
    journal, and the newer release writes the backlog later."""

    database_revision: str
    release_revision: str


@dataclass(frozen=True, slots=True)
class DatabaseRecovered(Event):
    """The database became usable again after being unavailable."""

    history_loaded: int


@dataclass(frozen=True, slots=True)
class BatchCommitted(Event):
    """One transaction committed ``records`` records (``by_entity`` counts them)."""

    records: int
    by_entity: Mapping[Entity, int]
    duration: float
    from_journal: bool
    latencies: tuple[tuple[Entity, float], ...] = ()
    """Seconds from ``record_*`` to this commit, per record recorded in this run."""
    correlation_ids: tuple[str, ...] = ()
    audit_seq: int | None = None
    """The ``seq`` of this process's audit chain after the commit (``None`` when no version was written)."""
    audit_hash: str | None = None
    """That entry's hash: the chain's head, to keep somewhere the database's writers cannot reach."""


@dataclass(frozen=True, slots=True)
class AuditAnchored(Event):
    """A checkpoint of this sidecar's audit chain was appended (and fsynced) to its anchor file at ``path``."""

    instance_id: str
    seq: int
    hash: str
    time: str
    path: str
    signed: bool


@dataclass(frozen=True, slots=True)
class WriteFailed(Event):
    """A write attempt failed after its retries (``transient``) or because of its data."""

    records: int
    by_entity: Mapping[Entity, int]
    error_class: str
    error: str
    transient: bool
    attempts: int
    correlation_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WriteRetried(Event):
    """A transient error; the write will be attempted again after ``delay`` seconds."""

    attempt: int
    delay: float
    error_class: str
    error: str


@dataclass(frozen=True, slots=True)
class BreakerChanged(Event):
    """The circuit breaker moved from one state to another."""

    from_state: str
    to_state: str
    consecutive_failures: int


@dataclass(frozen=True, slots=True)
class RecordDeadLettered(Event):
    """A record can never be written; it was stored in ``dead_letters``."""

    entity: Entity
    key: str
    error_class: str
    error: str
    correlation_id: str | None


@dataclass(frozen=True, slots=True)
class JournalSpilled(Event):
    """Records moved from RAM to the on-disk journal (backlog beyond ``PERSISTENCE_MAX_PENDING`` or at close)."""

    records: int
    journal_pending: int
    reason: str


@dataclass(frozen=True, slots=True)
class JournalSynced(Event):
    """The journal was fsynced; ``records`` became safe on disk."""

    records: int
    duration: float


@dataclass(frozen=True, slots=True)
class JournalReplayed(Event):
    """Records from the journal were committed to the database."""

    records: int
    journal_pending: int


@dataclass(frozen=True, slots=True)
class JournalFailed(Event):
    """The journal refused an operation: ``open``, ``append``, ``sync``, ``read`` (the writer taking records from
    disk; the attempt is not counted against the breaker), ``checkpoint`` (acknowledging committed
    records), or its keeper met a fault (``keeper``). Nothing is lost by this alone: the ``records`` it concerns stay
    where they were (in RAM, or in the journal), and what is ever lost is published as :class:`RecordsDropped`."""

    operation: str
    error_class: str
    error: str
    records: int = 0


@dataclass(frozen=True, slots=True)
class JournalCorrupt(Event):
    """Journal lines were skipped because they were corrupt or truncated."""

    lines: int


@dataclass(frozen=True, slots=True)
class RecordsDropped(Event):
    """Records were lost: neither written nor journaled. Always counted, never silent."""

    entity: Entity | str
    count: int
    reason: str
    error: str = ""


@dataclass(frozen=True, slots=True)
class PersistenceToggled(Event):
    """The run-time feature flag changed."""

    enabled: bool


@dataclass(frozen=True, slots=True)
class ShutdownComplete(Event):
    """``close()`` finished. Counts are for the whole life of this sidecar."""

    persisted: int
    journaled: int
    dead_lettered: int
    dropped: int
    duration: float
    journal_pending: int


Listener = Callable[[Event], None]


@dataclass
class EventBus:
    """Synchronous publish/subscribe. A failing listener is logged and never breaks the write path."""

    _listeners: list[Listener] = field(default_factory=list)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Add a listener; returns a function that removes it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def publish(self, event: Event) -> None:
        """Deliver ``event`` to every listener, in subscription order."""
        for listener in tuple(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event_listener_failed", listener=repr(listener), event=type(event).__name__)
