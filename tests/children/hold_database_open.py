"""Child process: a real sidecar with a SQLite database open; prints READY once started, then waits to be killed."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from persistence import PersistenceSidecar, Settings


async def main(database_url: str, journal_dir: str) -> None:
    anchors = Path(journal_dir).parent / "anchors"  # beside the journal, not in the working directory
    settings = Settings(_env_file=None, database_url=database_url, journal_dir=journal_dir, audit_anchor_dir=anchors)
    async with PersistenceSidecar(settings, log_events=False) as sidecar:
        await sidecar.record_trade(
            {
                "trade_id": "HELD-1",
                "symbol": "EURUSD",
                "direction": "BUY",
                "entry_time": "2026-03-02T08:00:00Z",
                "entry_price": "1.08",
                "position_size": "1",
            }
        )
        print("READY", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
