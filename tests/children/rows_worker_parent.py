"""Child process: start ``audit verify``'s rows check (a :class:`~persistence.audit.rows_worker.RowsWorker`) on a
database, print the rows child's pid, and wait to be killed. Shows that a rows child does not outlive its parent.

Arguments: the database URL. The query timeout is a minute, so a rows child blocked in a statement would stay that
long if nothing ended it.
"""

from __future__ import annotations

import asyncio
import sys

from persistence.audit.rows_worker import RowsWorker
from persistence.config import Settings


async def main(database_url: str) -> None:
    settings = Settings(_env_file=None, database_url=database_url, query_timeout_ms=60_000)
    worker = await RowsWorker.start(settings, None, 1_000, {}, 0)
    print(worker._process.pid, flush=True)
    await asyncio.sleep(3_600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
