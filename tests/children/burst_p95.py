"""Child process for the p95 requirement test: five bursts of 1000 trades on one backend, each p95 printed as JSON.

A process of its own, as a host's is: the test suite's own heap (hundreds of tests' objects) is not the host's, and
the collector's passes over it would be measured as the sidecar's.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from benchmarks.harness import migrated, percentile, sqlite_settings, user_burst
from persistence.config import Settings

BURSTS = 5


async def main(backend: str, directory: Path, url: str | None) -> list[float]:
    p95s: list[float] = []
    for attempt in range(BURSTS):
        if backend == "sqlite":
            settings = sqlite_settings(directory / f"burst-{attempt}.db")
        else:
            settings = Settings(_env_file=None, database_url=url or "", journal_dir=directory / f"journal-{attempt}")
        await migrated(settings)
        latencies, _ = await user_burst(settings, 1000, f"REQ{attempt}")
        if len(latencies) != 1000:
            raise SystemExit(f"{len(latencies)} latencies, not 1000")
        p95s.append(percentile(latencies, 95))
    return p95s


if __name__ == "__main__":
    url = sys.argv[3] if len(sys.argv) > 3 else None
    print(json.dumps(asyncio.run(main(sys.argv[1], Path(sys.argv[2]), url))))
