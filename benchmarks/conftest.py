"""Fixtures for the benchmarks: an event loop driven from sync code, and a figure table written at the end."""

from __future__ import annotations

import asyncio
import os
import platform
import sqlite3
import statistics
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
    print("\n" + "\n".join(lines))
