"""A host process for the burst figures: bursts of 1000 trades in a fresh process, optionally with a large live heap.

Run as ``python -m benchmarks.burst_child DIRECTORY HEAP_OBJECTS BURSTS [DATABASE_URL]``. The process first builds
``HEAP_OBJECTS`` live objects that the collector tracks (instances of a small class: what a
host's order books and caches look like to the collector), then records ``BURSTS`` bursts of 1000 trades, each on a
new sidecar over a new SQLite file in ``DIRECTORY`` (or, given ``DATABASE_URL``, over that PostgreSQL database, its
tables emptied between bursts by the caller's choice of prefixes). Default GC throughout: no ``gc.collect()``, no
``gc.freeze()``, as a host runs. Each burst's latencies run from each record's ``record_trade`` call to its receipt
resolving, awaited by the host. Prints one JSON line: per burst, the p95 and the collections that ran inside it;
and what a full collection of the host's heap costs at the end.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from benchmarks.harness import bench_settings, migrated, percentile, sqlite_settings, trade_mapping
from persistence import PersistenceSidecar, Settings


class Node:
    """One live object of the host's heap."""

    __slots__ = ("key", "payload")

    def __init__(self, key: int) -> None:
        self.key = key
        self.payload = str(key)


class Collections:
    """The collector's passes (generation, seconds) while it is on."""

    def __init__(self) -> None:
        self.passes: list[tuple[int, float]] = []
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.passes.append((int(info["generation"]), time.perf_counter() - self._started))


async def burst(settings: Settings, prefix: str) -> list[float]:
    async with PersistenceSidecar(settings) as sidecar:
        mappings = [trade_mapping(i, prefix) for i in range(1000)]
        clock = time.perf_counter
        latencies = [math.nan] * 1000

        async def settle(index: int, started: float, receipt: Awaitable[object]) -> None:
            await receipt
            latencies[index] = clock() - started

        waiters = []
        for index, mapping in enumerate(mappings):
            started = clock()
            waiters.append(settle(index, started, sidecar.record_trade(mapping)))
        await asyncio.gather(*waiters)
        return latencies


async def main(directory: Path, heap_objects: int, bursts: int, url: str | None) -> dict[str, Any]:
    heap = [Node(i) for i in range(heap_objects)]
    tracked = len(gc.get_objects())
    results = []
    tag = f"H{heap_objects}-{time.time_ns()}"
    for n in range(bursts):
        if url is None:
            settings = sqlite_settings(directory / f"{tag}-{n}.db")
        else:
            settings = bench_settings(url, directory / f"{tag}-{n}-journal")
        await migrated(settings)
        collections = Collections()
        gc.callbacks.append(collections)
        try:
            latencies = await burst(settings, f"{tag}-{n}")
        finally:
            gc.callbacks.remove(collections)
        results.append(
            {
                "p95_ms": percentile(latencies, 95) * 1000,
                "collections": [generation for generation, _ in collections.passes],
                "gen2_ms": [seconds * 1000 for generation, seconds in collections.passes if generation == 2],
                "collector_ms": sum(seconds for _, seconds in collections.passes) * 1000,
            }
        )
    # What a full collection costs this host now: the pass that falls due every time a quarter of the long-lived
    # heap's size has been promoted since the last one, wherever the host happens to be then.
    started = time.perf_counter()
    gc.collect()
    full = time.perf_counter() - started
    del heap
    return {"tracked_objects": tracked, "bursts": results, "full_collection_ms": full * 1000}


if __name__ == "__main__":
    arguments = sys.argv[1:]
    database_url = arguments[3] if len(arguments) > 3 else None
    document = asyncio.run(main(Path(arguments[0]), int(arguments[1]), int(arguments[2]), database_url))
    sys.stdout.write(json.dumps(document) + "\n")
