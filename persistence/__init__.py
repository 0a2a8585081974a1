"""persistence-sidecar: the persistence layer a trading orchestrator embeds in its asyncio event loop.

The public surface is what this module exports in ``__all__``; everything else may change between releases.
``__version__`` is the installed distribution's version. The event classes and :class:`EventBus` are here
because ``bus=`` is a constructor parameter of :class:`PersistenceSidecar` (subscribe a listener to see every
batch committed, breaker change, dead letter, …), and :class:`RetryPolicy` because ``retry=`` is one too.
"""

from importlib.metadata import PackageNotFoundError, version

from persistence.committer import RetryPolicy
from persistence.config import Settings
from persistence.errors import (
    ApiPortUnavailableError,
    ConfigurationError,
    DatabaseUnavailableError,
    DeadLetteredError,
    FlushTimeoutError,
    InvalidQueryError,
    InvalidRecordError,
    JournalError,
    MigrationError,
    PersistenceError,
    QueryTimeoutError,
    RecordDroppedError,
    SidecarClosedError,
)
from persistence.events import (
    BatchCommitted,
    BreakerChanged,
    DatabaseRecovered,
    DatabaseUnavailable,
    Event,
    EventBus,
    JournalCorrupt,
    JournalReplayed,
    JournalSpilled,
    JournalSynced,
    PersistenceToggled,
    RecordDeadLettered,
    RecordsDropped,
    SchemaNewerThanRelease,
    ShutdownComplete,
    SidecarStarted,
    WriteFailed,
    WriteRetried,
)
from persistence.models import ParameterChange, PerformanceSnapshot, Signal, Trade
from persistence.receipts import Receipt
from persistence.sidecar import PersistenceSidecar

try:
    __version__ = version("persistence-sidecar")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "ApiPortUnavailableError",
    "BatchCommitted",
    "BreakerChanged",
    "ConfigurationError",
    "DatabaseRecovered",
    "DatabaseUnavailable",
    "DatabaseUnavailableError",
    "DeadLetteredError",
    "Event",
    "EventBus",
    "FlushTimeoutError",
    "InvalidQueryError",
    "InvalidRecordError",
    "JournalCorrupt",
    "JournalError",
    "JournalReplayed",
    "JournalSpilled",
    "JournalSynced",
    "MigrationError",
    "ParameterChange",
    "PerformanceSnapshot",
    "PersistenceError",
    "PersistenceSidecar",
    "PersistenceToggled",
    "QueryTimeoutError",
    "Receipt",
    "RecordDeadLettered",
    "RecordDroppedError",
    "RecordsDropped",
    "RetryPolicy",
    "SchemaNewerThanRelease",
    "Settings",
    "ShutdownComplete",
    "SidecarClosedError",
    "SidecarStarted",
    "Signal",
    "Trade",
    "WriteFailed",
    "WriteRetried",
    "__version__",
]
