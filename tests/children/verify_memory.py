"""Child process: ``audit verify`` a SQLite database and print ``entries rows rss_before_kib peak_kib seconds``.

Used by the audit benchmark. The peak (``VmHWM``) is reset after a warm-up verify of a chain that does not exist
(imports, pools), so the figure is what streaming the trail costs.
"""

from __future__ import annotations

import asyncio
import sys
import time

from persistence.audit.verify import verify
from persistence.config import Settings
from persistence.db.engine import create_database
from tests.children.export_memory import kib


async def main(database_url: str) -> None:
    database = create_database(Settings(_env_file=None, database_url=database_url))
    await verify(database, instance_id="no-such-instance")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak (VmHWM) starts again from the current RSS
    before = kib("VmRSS:")
    started = time.perf_counter()
    report = await verify(database)
    elapsed = time.perf_counter() - started
    if not report.ok:
        raise SystemExit(" ".join(report.lines()))
    print(sum(report.chains.values()), sum(report.rows.values()), before, kib("VmHWM:"), f"{elapsed:.2f}")
    await database.dispose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
