"""Sidecars for tests: built on a fake clock with retries that do not wait, closed by the ``sidecars`` fixture."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import text

from persistence import PersistenceSidecar
from persistence.config import Settings
from persistence.testing import FakeClock
from persistence.write.committer import RetryPolicy

SettingsFactory = Callable[..., Settings]
NO_WAIT_RETRIES = RetryPolicy(attempts=2, initial_wait=0.0, max_wait=0.0)


def build(settings: Settings, sidecars: list[Any], clock: FakeClock | None = None, **kwargs: Any) -> PersistenceSidecar:
    clock = clock or FakeClock()
    sidecar = PersistenceSidecar(settings, clock=clock, sleep=clock.sleep, retry=NO_WAIT_RETRIES, **kwargs)
    sidecars.append(sidecar)
    return sidecar


async def stored_trade_ids(sidecar: PersistenceSidecar) -> list[str]:
    database = sidecar.database
    assert database is not None
    async with database.read() as connection:
        return list((await connection.execute(text("SELECT trade_id FROM trades ORDER BY id"))).scalars())
