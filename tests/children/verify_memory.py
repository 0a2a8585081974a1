"""Child process: ``audit verify`` a database and print
``entries rows rss_before_kib peak_kib seconds largest_child_peak_kib``.

Used by the audit benchmark. The peak (``VmHWM``) is reset after a warm-up verify of a chain that does not exist
(imports, pools), so the figure is what streaming the trail costs. The second argument is the number of processes
(``audit verify --jobs``, default the command line's); the largest peak of the processes that checked rows is the
last figure (0 with one process).
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time

from persistence.app.cli.audit import VERIFY_JOBS
from persistence.audit.verify import verify
from persistence.config import Settings
from persistence.db.engine import create_database
from tests.children.export_memory import kib


async def main(database_url: str, jobs: int) -> None:
    database = create_database(Settings(_env_file=None, database_url=database_url))
    await verify(database, instance_id="no-such-instance")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak (VmHWM) starts again from the current RSS
    before = kib("VmRSS:")
    started = time.perf_counter()
    report = await verify(database, jobs=jobs)
    elapsed = time.perf_counter() - started
    if not report.ok:
        raise SystemExit(" ".join(report.lines()))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    print(sum(report.chains.values()), sum(report.rows.values()), before, kib("VmHWM:"), f"{elapsed:.2f}", children)
    await database.dispose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else VERIFY_JOBS))
