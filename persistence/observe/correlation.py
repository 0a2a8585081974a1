"""The correlation id of the current context, which travels with every record to the writer's log lines.

Set it around the code that records (``with correlation_scope(request_id): sidecar.record_trade(...)``); the
history API sets it from the ``X-Correlation-ID`` header. Reading it on the hot path is one ContextVar lookup.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from contextvars import ContextVar

correlation_id: ContextVar[str | None] = ContextVar("persistence_correlation_id", default=None)


def current_correlation_id() -> str | None:
    """The correlation id of the running context, if any."""
    return correlation_id.get()


def new_correlation_id() -> str:
    """A fresh random correlation id."""
    return uuid.uuid4().hex


@contextlib.contextmanager
def correlation_scope(value: str | None = None) -> Iterator[str]:
    """Run a block with ``value`` (or a fresh id) as the current correlation id."""
    cid = value or new_correlation_id()
    token = correlation_id.set(cid)
    try:
        yield cid
    finally:
        correlation_id.reset(token)
