"""Child process for the kill -9 tests: records trades continuously and prints each key once it is persisted.

With a third argument ``versions``, every third trade is recorded again, closed, a few trades later: a second
version of the same key, for the audit trail's kill -9 test."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from persistence import PersistenceSidecar, Settings
from persistence.records.receipts import Receipt


async def main(database_url: str, journal_dir: str, versions: bool) -> None:
    anchors = Path(journal_dir).parent / "anchors"  # beside the journal, not in the working directory
    settings = Settings(_env_file=None, database_url=database_url, journal_dir=journal_dir, audit_anchor_dir=anchors)
    sidecar = PersistenceSidecar(settings, log_events=False)
    await sidecar.start()
    queue: asyncio.Queue[Receipt] = asyncio.Queue()

    async def produce() -> None:
        for i in range(1_000_000):
            receipt = sidecar.record_trade(
                {
                    "trade_id": f"K-{i:07d}",
                    "symbol": "EURUSD",
                    "direction": "BUY",
                    "entry_time": datetime.now(UTC),
                    "entry_price": Decimal("1.08"),
                    "position_size": Decimal("1000"),
                    "pnl": Decimal(i) / 100,
                }
            )
            queue.put_nowait(receipt)
            if versions and i % 3 == 0 and i >= 9:
                closed = sidecar.record_trade(
                    {
                        "trade_id": f"K-{i - 9:07d}",
                        "symbol": "EURUSD",
                        "direction": "BUY",
                        "entry_time": datetime.now(UTC),
                        "entry_price": Decimal("1.08"),
                        "exit_time": datetime.now(UTC),
                        "exit_price": Decimal("1.09"),
                        "position_size": Decimal("1000"),
                        "pnl": Decimal(i),
                    }
                )
                queue.put_nowait(closed)
            if i % 5 == 0:
                await asyncio.sleep(0.001)

    async def report() -> None:
        while True:
            receipt = await queue.get()
            if await receipt == "persisted":
                sys.stdout.write(f"{receipt.key}\n")
                sys.stdout.flush()

    print("READY", flush=True)
    await asyncio.gather(produce(), report())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:] == ["versions"]))
