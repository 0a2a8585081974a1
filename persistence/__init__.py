"""persistence-sidecar: the persistence layer a trading orchestrator embeds in its asyncio event loop.

The public surface is what this module exports in ``__all__``; everything else may change between releases.
``__version__`` is the installed distribution's version. The fault kit for users' own tests is
:mod:`persistence.testing`; everything else lives in layer folders (``records``, ``observe``, ``db``, ``audit``,
``tables``, ``write``, ``tools``, ``app``) whose modules may move between releases. The event classes and
:class:`EventBus` are here because ``bus=`` is a constructor parameter of :class:`PersistenceSidecar` (subscribe a
listener to see every batch committed, breaker change, dead letter, …), and :class:`RetryPolicy` because ``retry=`` is
one too.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from persistence.config import Settings
from persistence.db.engine import Database, create_database
from persistence.errors import (
    AnalysisExtraMissingError,
    ApiPortUnavailableError,
    AuditKeyError,
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
from persistence.write.runtime import HealthReport

if TYPE_CHECKING:
    from persistence.app.api import create_router
from persistence.write.committer import RetryPolicy


def __getattr__(name: str) -> Any:
    """``create_router`` is imported on first use: FastAPI is loaded only by hosts that serve the API."""
    if name == "create_router":
        from persistence.app.api import create_router

        return create_router
    raise AttributeError(f"module 'persistence' has no attribute {name!r}")


try:
    __version__ = version("persistence-sidecar")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AnalysisExtraMissingError",
    "ApiPortUnavailableError",
    "AuditAnchored",
    "AuditKeyError",
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
