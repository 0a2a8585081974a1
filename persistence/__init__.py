"""persistence-sidecar: the persistence layer a trading orchestrator embeds in its asyncio event loop.

The public surface is what this module exports in ``__all__``; everything else may change between releases.
``__version__`` is the installed distribution's version. The fault kit for users' own tests is
:mod:`persistence.testing`; everything else lives in layer folders (``records``, ``observe``, ``db``, ``audit``,
``tables``, ``write``, ``tools``, ``app``) whose modules may move between releases. The event classes and
:class:`EventBus` are here because ``bus=`` is a constructor parameter of :class:`PersistenceSidecar` (subscribe a
listener to see every batch committed, breaker change, dead letter, …), and :class:`RetryPolicy` because ``retry=`` is
one too.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from persistence.errors import (
    AnalysisExtraMissingError,
    ApiPortUnavailableError,
    AuditKeyError,
    AuditVerifyError,
    BackupError,
    BreakerAdmissionError,
    ConfigurationError,
    CopyMismatchError,
    CopyRefusedError,
    DatabaseInUseError,
    DatabaseMissingError,
    DatabaseUnavailableError,
    DeadLetteredError,
    DowngradeDataLossError,
    ExportError,
    FlushTimeoutError,
    InvalidQueryError,
    InvalidRecordError,
    JournalDirectoryInUseError,
    JournalError,
    JournalNotWritableError,
    JournalPositionError,
    MigrationError,
    PersistenceError,
    QueryTimeoutError,
    RecordDroppedError,
    RestoreError,
    SchemaNewerError,
    SidecarClosedError,
)

if TYPE_CHECKING:
    __version__: str
    from persistence.app.api import create_router
    from persistence.config import Settings
    from persistence.db.engine import Database, create_database
    from persistence.migrations import upgrade
    from persistence.observe.correlation import correlation_scope
    from persistence.observe.event_log import configure_logging
    from persistence.observe.events import (
        AuditAnchored,
        BatchCommitted,
        BreakerChanged,
        DatabaseRecovered,
        DatabaseUnavailable,
        Event,
        EventBus,
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
    from persistence.records.models import ParameterChange, PerformanceSnapshot, Signal, Trade
    from persistence.records.receipts import Receipt
    from persistence.sidecar import PersistenceSidecar
    from persistence.tables.queries import SignalQuery, TradeQuery
    from persistence.tables.repositories import (
        DeadLetterRepository,
        ParameterHistoryRepository,
        PerformanceSnapshotRepository,
        Repositories,
        SignalRepository,
        TradeRepository,
    )
    from persistence.write.breaker import BreakerState
    from persistence.write.committer import RetryPolicy
    from persistence.write.runtime import HealthReport

# Everything but the errors is imported on first use: ``import persistence`` stays cheap (the command line's every run
# pays it, and a host that only needs a record model does not load SQLAlchemy, the writer or FastAPI), while
# ``from persistence import PersistenceSidecar`` works as ever. The name maps to the module that defines it.
_LAZY: dict[str, str] = {
    "AuditAnchored": "persistence.observe.events",
    "BatchCommitted": "persistence.observe.events",
    "BreakerChanged": "persistence.observe.events",
    "BreakerState": "persistence.write.breaker",
    "Database": "persistence.db.engine",
    "DatabaseRecovered": "persistence.observe.events",
    "DatabaseUnavailable": "persistence.observe.events",
    "DeadLetterRepository": "persistence.tables.repositories",
    "Event": "persistence.observe.events",
    "EventBus": "persistence.observe.events",
    "HealthReport": "persistence.write.runtime",
    "JournalCorrupt": "persistence.observe.events",
    "JournalFailed": "persistence.observe.events",
    "JournalReplayed": "persistence.observe.events",
    "JournalSpilled": "persistence.observe.events",
    "JournalSynced": "persistence.observe.events",
    "JournalUnwritable": "persistence.observe.events",
    "ParameterChange": "persistence.records.models",
    "ParameterHistoryRepository": "persistence.tables.repositories",
    "PerformanceSnapshot": "persistence.records.models",
    "PerformanceSnapshotRepository": "persistence.tables.repositories",
    "PersistenceSidecar": "persistence.sidecar",
    "PersistenceToggled": "persistence.observe.events",
    "Receipt": "persistence.records.receipts",
    "RecordDeadLettered": "persistence.observe.events",
    "RecordsDropped": "persistence.observe.events",
    "Repositories": "persistence.tables.repositories",
    "RetryPolicy": "persistence.write.committer",
    "SchemaNewerThanRelease": "persistence.observe.events",
    "Settings": "persistence.config",
    "ShutdownComplete": "persistence.observe.events",
    "SidecarStarted": "persistence.observe.events",
    "Signal": "persistence.records.models",
    "SignalQuery": "persistence.tables.queries",
    "SignalRepository": "persistence.tables.repositories",
    "Trade": "persistence.records.models",
    "TradeQuery": "persistence.tables.queries",
    "TradeRepository": "persistence.tables.repositories",
    "WriteFailed": "persistence.observe.events",
    "WriteRetried": "persistence.observe.events",
    "configure_logging": "persistence.observe.event_log",
    "correlation_scope": "persistence.observe.correlation",
    "create_database": "persistence.db.engine",
    "create_router": "persistence.app.api",
    "upgrade": "persistence.migrations",
}


def __getattr__(name: str) -> Any:
    """Each public name outside :mod:`persistence.errors` (and ``__version__``), imported on first use."""
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value: Any = version("persistence-sidecar")
        except PackageNotFoundError:  # a source tree that was never installed
            value = "0+unknown"
    elif name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'persistence' has no attribute {name!r}")
    globals()[name] = value  # looked up once; later accesses are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "AnalysisExtraMissingError",
    "ApiPortUnavailableError",
    "AuditAnchored",
    "AuditKeyError",
    "AuditVerifyError",
    "BackupError",
    "BatchCommitted",
    "BreakerAdmissionError",
    "BreakerChanged",
    "BreakerState",
    "ConfigurationError",
    "CopyMismatchError",
    "CopyRefusedError",
    "Database",
    "DatabaseInUseError",
    "DatabaseMissingError",
    "DatabaseRecovered",
    "DatabaseUnavailable",
    "DatabaseUnavailableError",
    "DeadLetterRepository",
    "DeadLetteredError",
    "DowngradeDataLossError",
    "Event",
    "EventBus",
    "ExportError",
    "FlushTimeoutError",
    "HealthReport",
    "InvalidQueryError",
    "InvalidRecordError",
    "JournalCorrupt",
    "JournalDirectoryInUseError",
    "JournalError",
    "JournalFailed",
    "JournalNotWritableError",
    "JournalPositionError",
    "JournalReplayed",
    "JournalSpilled",
    "JournalSynced",
    "JournalUnwritable",
    "MigrationError",
    "ParameterChange",
    "ParameterHistoryRepository",
    "PerformanceSnapshot",
    "PerformanceSnapshotRepository",
    "PersistenceError",
    "PersistenceSidecar",
    "PersistenceToggled",
    "QueryTimeoutError",
    "Receipt",
    "RecordDeadLettered",
    "RecordDroppedError",
    "RecordsDropped",
    "Repositories",
    "RestoreError",
    "RetryPolicy",
    "SchemaNewerError",
    "SchemaNewerThanRelease",
    "Settings",
    "ShutdownComplete",
    "SidecarClosedError",
    "SidecarStarted",
    "Signal",
    "SignalQuery",
    "SignalRepository",
    "Trade",
    "TradeQuery",
    "TradeRepository",
    "WriteFailed",
    "WriteRetried",
    "__version__",
    "configure_logging",
    "correlation_scope",
    "create_database",
    "create_router",
    "upgrade",
]
