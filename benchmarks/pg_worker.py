"""One sidecar process of the three-process PostgreSQL benchmark: records trades, reports its rate as JSON.

Run as ``python -m benchmarks.pg_worker URL PREFIX COUNT JOURNAL_DIR``. The timing runs from the first record to the
flush that commits the last one (start-up excluded); wall-clock times are printed so the parent can compute the
aggregate rate of processes that overlap.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from benchmarks.harness import bench_settings, trade_mapping
from persistence import PersistenceSidecar


async def main(url: str, prefix: str, count: int, journal_dir: Path) -> dict[str, float]:
    # Each process is an orchestrator of its own, with its own audit chain (processes sharing an instance id take
    # turns on theirs).
    settings = bench_settings(url, journal_dir, instance_id=f"bench-{prefix}")
    mappings = [trade_mapping(i, prefix) for i in range(count)]
    async with PersistenceSidecar(settings, log_events=False) as sidecar:
        started_wall, started = time.time(), time.perf_counter()
        for offset in range(0, count, 500):
            for mapping in mappings[offset : offset + 500]:
                sidecar.record_trade(mapping)
            await asyncio.sleep(0)
        await sidecar.flush(timeout=600)
        elapsed = time.perf_counter() - started
        return {"started": started_wall, "finished": started_wall + elapsed, "rate": count / elapsed}


if __name__ == "__main__":
    url, prefix, count, journal = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    sys.stdout.write(json.dumps(asyncio.run(main(url, prefix, count, journal))) + "\n")
