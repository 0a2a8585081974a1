"""The authoritative in-memory ``trade_history``: ordered, updated in place, bounded, never losing what is unsafe.

Trades are kept oldest first in a dict keyed by ``trade_id``: a trade recorded again replaces its entry in place
(keeping its position and its original ``created_at``), and its ``updated_at`` is made strictly newer than the
version it replaces, so the database's "newer wins" rule agrees with the order the orchestrator recorded in.
The window holds ``PERSISTENCE_HISTORY_MAX`` trades; the oldest are evicted first, but a trade with a version not
yet safe (committed or journaled) is never evicted. Recording is O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from typing import overload

from persistence.records.models import Trade

_TICK = timedelta(microseconds=1)
_EVICTION_SCAN_LIMIT = 4
"""The hot path looks at no more than this many of the oldest trades; the writer evicts past longer unsafe runs."""


class TradeHistory(Sequence[Trade]):
    """Trades, oldest first; ``get(trade_id)`` for lookups."""

    def __init__(self, max_size: int) -> None:
        self._max = max_size
        # OrderedDict: removing from the front is O(1); a plain dict leaves holes every scan walks over.
        self._trades: OrderedDict[str, Trade] = OrderedDict()
        self._unsafe: dict[str, int] = {}
        self._snapshot: list[Trade] | None = None

    @property
    def max_size(self) -> int:
        """The window size, ``PERSISTENCE_HISTORY_MAX``."""
        return self._max

    @property
    def unsafe(self) -> int:
        """How many trades have a version that is not yet committed or journaled."""
        return len(self._unsafe)

    def record(self, trade: Trade, *, unsafe: bool = False) -> Trade:
        """Insert or update ``trade``; returns the version stored (and to be persisted).

        ``unsafe`` marks the new version as waiting to be persisted, before any eviction can consider it.
        """
        existing = self._trades.get(trade.trade_id)
        if existing is not None and (
            trade.created_at != existing.created_at or trade.updated_at <= existing.updated_at
        ):
            trade = trade.model_copy(
                update={
                    "created_at": existing.created_at,
                    "updated_at": max(trade.updated_at, existing.updated_at + _TICK),
                }
            )
        self._trades[trade.trade_id] = trade
        self._snapshot = None
        if unsafe:
            self._unsafe[trade.trade_id] = self._unsafe.get(trade.trade_id, 0) + 1
        if len(self._trades) > self._max:
            self.evict(scan_limit=_EVICTION_SCAN_LIMIT)
        return trade

    def mark_safe(self, trade_id: str) -> None:
        """One waiting version of this trade is now committed, journaled, dead-lettered or dropped."""
        count = self._unsafe.get(trade_id, 0)
        if count <= 1:
            self._unsafe.pop(trade_id, None)
        else:
            self._unsafe[trade_id] = count - 1

    def evict(self, scan_limit: int | None = None) -> int:
        """Drop the oldest safe trades until the window fits; returns how many were dropped."""
        excess = len(self._trades) - self._max
        if excess <= 0:
            return 0
        victims: list[str] = []
        for scanned, trade_id in enumerate(self._trades):
            if len(victims) >= excess or (scan_limit is not None and scanned >= scan_limit):
                break
            if trade_id not in self._unsafe:
                victims.append(trade_id)
        for trade_id in victims:
            del self._trades[trade_id]
        if victims:
            self._snapshot = None
        return len(victims)

    def load(self, trades: Iterable[Trade]) -> int:
        """Put trades loaded from the database (oldest first) before those recorded since; returns the count added."""
        loaded = OrderedDict((trade.trade_id, trade) for trade in trades if trade.trade_id not in self._trades)
        added = len(loaded)
        if added:
            loaded.update(self._trades)
            self._trades = loaded
            self._snapshot = None
            self.evict()
        return added

    def get(self, trade_id: str) -> Trade | None:
        """The current version of a trade, or ``None``."""
        return self._trades.get(trade_id)

    def _list(self) -> list[Trade]:
        if self._snapshot is None:
            self._snapshot = list(self._trades.values())
        return self._snapshot

    @overload
    def __getitem__(self, index: int) -> Trade: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Trade]: ...
    def __getitem__(self, index: int | slice) -> Trade | Sequence[Trade]:
        return self._list()[index]

    def __len__(self) -> int:
        return len(self._trades)

    def __iter__(self) -> Iterator[Trade]:
        return iter(self._list())

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return item in self._trades
        return isinstance(item, Trade) and self._trades.get(item.trade_id) == item

    def __repr__(self) -> str:
        return f"<TradeHistory {len(self)} trades, max {self._max}>"
