"""The product requirement, checked on every `make test`: p95 write latency under 100 ms across 1000 trades.

A record's latency runs from its ``record_trade`` call to the commit of its batch. The full figures, with the
naive way and the raw-SQLite ceiling beside them, are in ``make bench`` and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.harness import migrated, percentile, sidecar_burst, sqlite_settings


async def test_p95_from_record_to_commit_is_under_100_ms_for_a_burst_of_1000_trades(tmp_path: Path) -> None:
    p95s = []
    for attempt in range(3):
        settings = sqlite_settings(tmp_path / f"burst-{attempt}.db")
        await migrated(settings)
        latencies, _ = await sidecar_burst(settings, 1000, f"REQ{attempt}")
        assert len(latencies) == 1000
        p95s.append(percentile(latencies, 95))
    assert statistics.median(p95s) < 0.100, f"p95 per burst: {[round(p * 1000, 1) for p in p95s]} ms"
