"""Child process for the kill -9-during-an-outage test: default settings, records 500 trades a second and writes
each key with the (system-wide monotonic) time it was recorded to a log file, until it is killed."""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from persistence import PersistenceSidecar, Settings


async def main(database_url: str, journal_dir: str, log_path: str) -> None:
    anchors = Path(journal_dir).parent / "anchors"  # beside the journal, not in the working directory
    settings = Settings(_env_file=None, database_url=database_url, journal_dir=journal_dir, audit_anchor_dir=anchors)
    sidecar = PersistenceSidecar(settings, log_events=False)
    await sidecar.start()
    print("READY", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # the parent locks the database, then says GO
    with open(log_path, "a", buffering=1) as log:
        i = 0
        started = time.monotonic()
        while True:
            key = f"O-{i:07d}"
            sidecar.record_trade(
                {
                    "trade_id": key,
                    "symbol": "EURUSD",
                    "direction": "BUY",
                    "entry_time": datetime.now(UTC),
                    "entry_price": Decimal("1.08"),
                    "position_size": Decimal("1000"),
                    "pnl": Decimal(i) / 100,
                }
            )
            log.write(f"{key}\t{time.monotonic()}\n")  # written after record_trade returned: the record exists
            i += 1
            await asyncio.sleep(max(started + i / 500 - time.monotonic(), 0))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
