"""Fixtures for the benchmarks: an event loop driven from sync code; the figures written at the end.

``benchmarks/last_run.md`` is the table of the run; ``benchmarks/last_run.json`` has every figure machine-readable
(each figure's ``values``, plus the machine and the time of the run).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sqlite3
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FIGURES: list[dict[str, Any]] = []


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


@pytest.fixture
def figures() -> list[dict[str, Any]]:
    return FIGURES


def median(values: list[float]) -> float:
    return statistics.median(values)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not FIGURES:
        return
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        "# Latest benchmark run",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}",
        "",
        "| figure | target | measured (median of rounds) | baseline(s), same run | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for figure in FIGURES:
        lines.append(
            f"| {figure['figure']} | {figure['target']} | {figure['measured']} | {figure.get('baseline', '')} |"
            f" {figure.get('ratio', '')} |"
        )
    out = Path(__file__).parent / "last_run.md"
    out.write_text("\n".join(lines) + "\n")
    machine = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgres_url_set": bool(os.environ.get("PERSISTENCE_TEST_POSTGRES_URL")),
        "rounds": int(os.environ.get("BENCH_ROUNDS", "5")),
    }
    document = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "figures": FIGURES,
    }
    (Path(__file__).parent / "last_run.json").write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    print("\n" + "\n".join(lines))
