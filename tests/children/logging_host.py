"""Child process for the logging-etiquette tests: a host that embeds the sidecar and prints its own data on stdout.

``python -m tests.children.logging_host DATABASE_URL JOURNAL_DIR MODE``. With ``MODE`` ``none`` the host configures
no logging at all; with ``debug`` it attaches its own handler to the ``persistence`` logger at DEBUG and, at the
end, prints the event names that handler saw. Either way the host's own lines on stdout start with ``HOST``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from persistence import PersistenceSidecar, Settings


class Collect(logging.Handler):
    """The host's own handler: keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def main(database_url: str, journal_dir: str, mode: str) -> None:
    collect = Collect()
    if mode == "debug":
        logger = logging.getLogger("persistence")
        logger.setLevel(logging.DEBUG)
        logger.addHandler(collect)
    anchors = Path(journal_dir).parent / "anchors"  # beside the journal, not in the working directory
    settings = Settings(_env_file=None, database_url=database_url, journal_dir=journal_dir, audit_anchor_dir=anchors)
    print("HOST starting")
    async with PersistenceSidecar(settings) as sidecar:
        for i in range(20):
            sidecar.record_trade(
                {
                    "trade_id": f"HOST-{i:03d}",
                    "symbol": "EURUSD",
                    "direction": "BUY",
                    "entry_time": datetime.now(UTC),
                    "entry_price": Decimal("1.08"),
                    "position_size": Decimal("1000"),
                }
            )
            print(f"HOST recorded HOST-{i:03d}")
        await sidecar.flush(timeout=30)
    print("HOST done")
    for record in collect.records:
        fields = getattr(record, "persistence_fields", {})
        print(f"SEEN {record.levelname} {record.name} {getattr(record, 'persistence_event', '')} {sorted(fields)}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
