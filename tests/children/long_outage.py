"""Child process for the long-outage test: many trades while the database is locked, then recovery.

Prints one JSON line with the peak RAM queue, the journal depth, the peak RSS growth (from the outage's start, and
from a quarter of the way through: flat when the backlog is bounded, growing with the count when it is not) and the
final row count.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from persistence import PersistenceSidecar, Settings
from persistence.testing import FakeClock
from persistence.write.committer import RetryPolicy


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


async def main(db_path: str, journal_dir: str, total: int, max_pending: int) -> None:
    clock = FakeClock()
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{db_path}",
        journal_dir=journal_dir,
        audit_anchor_dir=Path(journal_dir).parent / "anchors",  # beside the journal, not in the cwd
        max_pending=max_pending,
        history_max=1000,
        breaker_failure_threshold=1,
        query_timeout_ms=100,
    )
    retry = RetryPolicy(attempts=1, initial_wait=0.0, max_wait=0.0)
    sidecar = PersistenceSidecar(settings, clock=clock, sleep=clock.sleep, retry=retry, log_events=False)
    await sidecar.start()
    backlog = sidecar.backlog
    assert backlog is not None
    lock = sqlite3.connect(db_path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    now = datetime.now(UTC)

    def trade(i: int) -> dict[str, object]:
        return {
            "trade_id": f"L-{i:07d}",
            "symbol": "BTCUSD",
            "direction": "SELL",
            "entry_time": now,
            "entry_price": Decimal("98765.12345678"),
            "position_size": Decimal("0.5"),
            "pnl": Decimal(-i) / 1000,
            "pattern_type": "long-outage-soak",
        }

    sidecar.record_trade(trade(0))
    while sidecar.breaker_state != "open":
        await asyncio.sleep(0.01)
    baseline = rss_bytes()
    peak_rss = baseline
    peak_queue = 0
    peak_history = 0
    peak_at_quarter = 0
    chunk = 1000
    for start in range(1, total + 1, chunk):
        if not peak_at_quarter and start > total // 4:
            peak_at_quarter = peak_rss
        for i in range(start, min(start + chunk, total + 1)):
            sidecar.record_trade(trade(i))
        peak_queue = max(peak_queue, backlog.queue_depth)
        clock.advance(0.5)  # the journal is synced every second of (fake) time: every other chunk
        while backlog.queue_depth > max_pending:
            await asyncio.sleep(0.001)
        peak_rss = max(peak_rss, rss_bytes())
        peak_history = max(peak_history, len(sidecar.trade_history))
    clock.advance(1.0)
    for _ in range(200):
        await asyncio.sleep(0.005)
        if not backlog.journal_pending or backlog.queue_depth <= max_pending:
            break
    journal_during_outage = backlog.journal_pending
    lock.rollback()
    lock.close()
    clock.advance(settings.breaker_reset_seconds)
    await sidecar.flush(timeout=600)
    rows = sqlite3.connect(db_path).execute("SELECT count(*), count(DISTINCT trade_id) FROM trades").fetchone()
    await sidecar.close()
    print(
        json.dumps(
            {
                "peak_queue": peak_queue,
                "journal_during_outage": journal_during_outage,
                "peak_rss_growth": peak_rss - baseline,
                "peak_rss_growth_after_first_quarter": peak_rss - peak_at_quarter,
                "peak_history": peak_history,
                "rows": rows[0],
                "distinct": rows[1],
                "journal_after": backlog.journal_pending,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
