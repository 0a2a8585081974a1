"""Child process: export every trade of a SQLite database to Parquet and print ``rows rss_before_kib peak_kib``.

An optional third argument, an ISO date, exports only the trades that entered up to it (``end_date``).

Used by the export memory test and benchmark. The peak (``VmHWM``) is reset after a warm-up export that matches
nothing (imports, pools, pyarrow's allocator), so the figure is what streaming the rows costs.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime

from persistence.config import Settings
from persistence.db.engine import create_database
from persistence.tools.export import export


def kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


async def main(database_url: str, output: str, end_date: str | None = None) -> None:
    database = create_database(Settings(_env_file=None, database_url=database_url))
    await export(database, "trades", output + ".warm", "parquet", end_date=datetime(2000, 1, 1))
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak (VmHWM) starts again from the current RSS
    before = kib("VmRSS:")
    filters = {} if end_date is None else {"end_date": datetime.fromisoformat(end_date)}
    result = await export(database, "trades", output, "parquet", **filters)
    print(result.rows, before, kib("VmHWM:"))
    await database.dispose()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
