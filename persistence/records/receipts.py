"""Receipts: what ``record_*`` returns, awaitable until the record is committed.

A receipt costs almost nothing when nobody awaits it: the future behind it is only created on first
``await``. Its ``status`` moves from ``pending`` to ``persisted`` (committed), ``journaled`` (safe on local
disk, not yet in the database; it moves on to ``persisted`` when the journal is replayed), ``dead_lettered``
(can never be written; awaiting raises :class:`~persistence.errors.DeadLetteredError`), ``dropped`` (lost,
counted and logged; awaiting raises :class:`~persistence.errors.RecordDroppedError`) or ``disabled``
(persistence is switched off). Futures are resolved behind a ``done()`` guard.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any, Literal

from persistence.errors import DeadLetteredError, RecordDroppedError

ReceiptStatus = Literal["pending", "persisted", "journaled", "dead_lettered", "dropped", "disabled"]
FINAL_STATUSES: frozenset[str] = frozenset({"persisted", "dead_lettered", "dropped", "disabled"})


class Receipt:
    """The outcome of one recorded record; ``await receipt`` returns once it is committed (or final)."""

    __slots__ = ("__weakref__", "_error", "_future", "entity", "key", "status")

    def __init__(self, entity: str, key: str, status: ReceiptStatus = "pending") -> None:
        self.entity = entity
        self.key = key
        self.status: ReceiptStatus = status
        self._future: asyncio.Future[ReceiptStatus] | None = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        """Whether the record reached a final status (``journaled`` is not final)."""
        return self.status in FINAL_STATUSES

    def __await__(self) -> Generator[Any, None, ReceiptStatus]:
        if not self.done:
            if self._future is None:
                self._future = asyncio.get_running_loop().create_future()
            yield from self._future.__await__()
        if self._error is not None:
            raise self._error
        return self.status

    def __repr__(self) -> str:
        return f"<Receipt {self.entity} {self.key!r} {self.status}>"

    def _settle(self, status: ReceiptStatus, error: BaseException | None = None) -> None:
        self.status = status
        self._error = error
        future = self._future
        if future is not None and not future.done():
            future.set_result(status)

    def mark_persisted(self) -> None:
        """The record is committed to the database."""
        self._settle("persisted")

    def mark_journaled(self) -> None:
        """The record is safe in the on-disk journal, not yet in the database."""
        if not self.done:
            self.status = "journaled"

    def mark_dead_lettered(self, error: str) -> None:
        """The record can never be written; it is in ``dead_letters``."""
        self._settle("dead_lettered", DeadLetteredError(self.entity, self.key, error))

    def mark_dropped(self, reason: str) -> None:
        """The record was lost (counted and logged)."""
        self._settle("dropped", RecordDroppedError(self.entity, self.key, reason))


def disabled_receipt(entity: str, key: str) -> Receipt:
    """A receipt that is already final with status ``disabled``."""
    return Receipt(entity, key, "disabled")
