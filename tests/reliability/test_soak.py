"""The chaos soak's short run (in a subprocess, so RSS is its own; it runs beside the rest of the suite, see
``conftest.py``) and the lone record that must not wait for traffic.

The long run is by hand: ``PYTHONPATH=. python -m tests.reliability.soak --minutes 10``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from persistence import PersistenceSidecar
from persistence.config import Settings
from persistence.observe.events import BreakerChanged
from persistence.testing import FaultInjector, wait_for_breaker
from persistence.write.committer import RetryPolicy
from tests.support import Recorder
from tests.support.factories import make_trade

SettingsFactory = Callable[..., Settings]

# ``soak_figures`` (tests/reliability/conftest.py): one soak for the run, started in its own process when
# collection ends, ~500 records/s for 40 s under locks, full disks, poison and a restart; these tests run last.


@pytest.mark.slow
def test_the_soak_really_injected_every_fault_under_a_load_of_about_500_records_per_second(
    soak_figures: dict[str, Any],
) -> None:
    figures = soak_figures
    assert figures["records_per_second"] >= 450, figures
    assert figures["lock_episodes"] >= 5 and figures["disk_full_episodes"] >= 2, figures
    assert figures["poison"] >= 10 and figures["restarts"] == 1, figures
    assert figures["breaker_openings"] >= 1 and figures["write_failures"] >= 1, figures
    assert figures["journal_spills"] >= 1, figures


@pytest.mark.slow
def test_after_the_soak_nothing_is_missing_nothing_is_duplicated_and_the_latest_versions_won(
    soak_figures: dict[str, Any],
) -> None:
    figures = soak_figures
    assert figures["oracle_trades"] > 0 and figures["oracle_signals"] > 0
    assert figures["stored_trades"] == figures["oracle_trades"], figures
    assert figures["stored_signals"] == figures["oracle_signals"], figures
    for name in ("missing_trades", "missing_signals", "duplicated_trades", "duplicated_signals", "unexpected_trades"):
        assert figures[name] == 0, (name, figures)
    assert figures["stale_trades"] == 0 and figures["stale_signals"] == 0, figures
    assert figures["closed_trades_stored"] == figures["trades_closed"], figures


@pytest.mark.slow
def test_after_the_soak_the_dead_letters_are_exactly_the_poison_records(soak_figures: dict[str, Any]) -> None:
    figures = soak_figures
    assert figures["dead_letters"] == figures["poison"], figures
    assert figures["dead_letters_not_poison"] == 0 and figures["poison_not_dead_lettered"] == 0, figures
    assert figures["poison_stored"] == 0, figures


@pytest.mark.slow
def test_memory_stays_bounded_throughout_the_soak(soak_figures: dict[str, Any]) -> None:
    # Bounded structures only (RAM backlog <= 1000 + a tick, history <= 2000 + unsafe, the journal on disk); a
    # leak of one record per record would add ~2 KB x 20,000 = 40 MB in 40 s and more in the long run.
    assert soak_figures["rss_growth_after_warm_up_mib"] < 48, soak_figures
    assert soak_figures["rss_max_mib"] < 250, soak_figures


# ------------------------------------------------------------------------------ a lone record


async def test_a_lone_record_recorded_during_an_outage_is_written_within_the_reset_period_without_more_traffic(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    settings = sidecar_settings(
        sqlite_url, breaker_failure_threshold=1, breaker_reset_seconds=1.0, query_timeout_ms=100
    )
    sidecar = PersistenceSidecar(settings, retry=RetryPolicy(attempts=1, initial_wait=0.0, max_wait=0.0))
    sidecars.append(sidecar)
    events = Recorder(sidecar.events)
    await sidecar.start()
    async with FaultInjector(sidecar).lock():
        first = sidecar.record_trade(make_trade())
        await wait_for_breaker(sidecar, "open", timeout=5)
        await asyncio.sleep(0.6)  # well into the outage
        lone = sidecar.record_trade(make_trade())
        await asyncio.sleep(0.05)
        assert lone.status == "pending"
    released = time.monotonic()
    # Nothing else is recorded and no clock is moved: the writer must come back by itself.
    assert await asyncio.wait_for(lone, settings.breaker_reset_seconds + 2.0) == "persisted"
    waited = time.monotonic() - released
    assert waited <= settings.breaker_reset_seconds + 0.5, f"the lone record waited {waited:.2f} s"
    assert first.status == "persisted"
    assert ("half_open", "closed") in [(event.from_state, event.to_state) for event in events.of(BreakerChanged)]
