"""persistence-sidecar: the persistence layer a trading orchestrator embeds in its asyncio event loop.

The public surface is what this module exports in ``__all__``; everything else may change between releases.
"""

from persistence.config import Settings
from persistence.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    DeadLetteredError,
    FlushTimeoutError,
    InvalidQueryError,
    InvalidRecordError,
    MigrationError,
    PersistenceError,
    QueryTimeoutError,
    RecordDroppedError,
    SidecarClosedError,
)
from persistence.models import ParameterChange, PerformanceSnapshot, Signal, Trade
from persistence.receipts import Receipt
from persistence.sidecar import PersistenceSidecar

__all__ = [
    "ConfigurationError",
    "DatabaseUnavailableError",
    "DeadLetteredError",
    "FlushTimeoutError",
    "InvalidQueryError",
    "InvalidRecordError",
    "MigrationError",
    "ParameterChange",
    "PerformanceSnapshot",
    "PersistenceError",
    "PersistenceSidecar",
    "QueryTimeoutError",
    "Receipt",
    "RecordDroppedError",
    "Settings",
    "SidecarClosedError",
    "Signal",
    "Trade",
]
