"""The demo orchestrator as a user runs it: a real subprocess, a real SQLite file, the API on a real port."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from persistence.demo import demo_settings
from tests.conftest import make_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def demo_environment(tmp_path: Path, port: int) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "PERSISTENCE_", "ENABLE_"))}
    environment.update(
        PYTHONPATH=str(REPO_ROOT),
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}",
        PERSISTENCE_JOURNAL_DIR=str(tmp_path / "journal"),
        PERSISTENCE_API_PORT=str(port),
    )
    return environment


def start_demo(tmp_path: Path, port: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "persistence", "demo", *args],
        cwd=tmp_path,
        env=demo_environment(tmp_path, port),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


def wait_for_api(port: int, process: subprocess.Popen[str], timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the demo exited before its API answered"
        try:
            health: dict[str, Any] = get_json(f"http://127.0.0.1:{port}/api/v1/health")
            return health
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the demo's API never answered")


def summary_of(stdout: str) -> dict[str, str]:
    """The summary block as {name: value}."""
    assert "\nsummary\n" in stdout, stdout
    block = stdout.split("\nsummary\n", 1)[1]
    rows = {}
    for line in block.splitlines():
        match = re.match(r"  (\S+(?: \S+)*?)\s{2,}(.*)", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def database_trades(tmp_path: Path) -> tuple[int, int, int]:
    with sqlite3.connect(tmp_path / "demo.db") as connection:
        row = connection.execute(
            "SELECT COUNT(*), COUNT(DISTINCT trade_id), SUM(exit_price IS NOT NULL) FROM trades"
        ).fetchone()
    return int(row[0]), int(row[1]), int(row[2] or 0)


def check_nothing_lost(stdout: str, tmp_path: Path) -> dict[str, str]:
    summary = summary_of(stdout)
    recorded = re.match(r"(\d+) records: .* (\d+) trades opened, (\d+) closed", summary["recorded"])
    assert recorded, summary
    records, opened, closed = (int(g) for g in recorded.groups())
    assert int(summary["persisted"]) == records
    assert summary["dropped"] == "0" and summary["dead-lettered"] == "0"
    in_db = re.match(r"(\d+) distinct of (\d+) recorded this run .*; missing 0", summary["trades in db"])
    assert in_db, summary["trades in db"]
    assert int(in_db.group(1)) == int(in_db.group(2)) == opened > 0
    rows, distinct, closed_rows = database_trades(tmp_path)
    assert rows == distinct == opened, "every trade recorded is in the database exactly once"
    assert closed_rows == closed, "every close (a second recording of a trade) reached the database"
    return summary


@pytest.mark.slow
def test_demo_with_chaos_serves_the_api_opens_the_breaker_and_loses_nothing(tmp_path: Path) -> None:
    port = free_port()
    process = start_demo(tmp_path, port, "--duration", "5", "--chaos", "--rate", "80")
    try:
        health = wait_for_api(port, process)
        assert health["data"]["enabled"] is True
        history = get_json(f"http://127.0.0.1:{port}/api/v1/trades/history?limit=5")
        assert history["error"] is None and history["source"] in ("database", "memory")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            assert b"persistence_writes_total" in response.read()
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert str(tmp_path / "demo.db") in stdout
    assert f"http://127.0.0.1:{port}/api/v1/trades/history" in stdout and f"http://127.0.0.1:{port}/metrics" in stdout
    assert "chaos: the database is locked" in stdout
    summary = check_nothing_lost(stdout, tmp_path)
    openings = re.match(r"opened (\d+) time", summary["breaker"])
    assert openings and int(openings.group(1)) >= 1, "the chaos outage should open the breaker"
    assert "circuit_opened" in stderr and "circuit_closed" in stderr
    assert "\r" not in stdout, "without a terminal the status is printed as plain lines"
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_sigterm_stops_a_running_demo_gracefully_with_a_summary_and_nothing_lost(tmp_path: Path) -> None:
    port = free_port()
    process = start_demo(tmp_path, port, "--rate", "200")
    try:
        wait_for_api(port, process)
        deadline = time.monotonic() + 10
        while get_json(f"http://127.0.0.1:{port}/api/v1/trades/history?limit=1")["page"]["total"] < 5:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "stopping (signal received)" in stdout
    check_nothing_lost(stdout, tmp_path)
    assert "shutdown_complete" in stderr


def test_demo_timings_apply_only_where_the_environment_is_silent() -> None:
    settings = make_settings(breaker_reset_seconds=30.0)
    quick = demo_settings(settings, environ={})
    assert quick.breaker_reset_seconds == 3.0 and quick.query_timeout_ms == 150
    kept = demo_settings(settings, environ={"PERSISTENCE_BREAKER_RESET_SECONDS": "30"})
    assert kept.breaker_reset_seconds == 30.0 and kept.query_timeout_ms == 150
