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

from persistence.app.demo.orchestrator import DEMO_OVERRIDES, demo_overrides, demo_settings, describe_overrides
from persistence.app.demo.outages import OutageSummary
from persistence.observe.events import (
    BatchCommitted,
    BreakerChanged,
    Event,
    JournalReplayed,
    JournalSpilled,
    RecordDeadLettered,
    WriteFailed,
    WriteRetried,
)
from tests.support.databases import make_settings

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
    assert "chaos on" in stdout
    assert "PERSISTENCE_MAX_PENDING=200" in stdout and "PERSISTENCE_BREAKER_RESET_SECONDS=3" in stdout
    summary = check_nothing_lost(stdout, tmp_path)
    openings = re.match(r"opened (\d+) time\(s\); chaos outages (\d+)", summary["breaker"])
    assert openings and int(openings.group(1)) >= 1, "the chaos outage should open the breaker"
    assert "Traceback" not in stderr
    # Off a terminal: stderr is log lines only (JSON), the status among them as an event; stdout has no status.
    events = [json.loads(line) for line in stderr.splitlines()]
    names = [event["event"] for event in events]
    assert "demo_status" in names and "\r" not in stdout and "rec/s" not in stdout
    status = next(event for event in events if event["event"] == "demo_status")
    assert {"rate_per_s", "persisted", "queue", "journal", "breaker", "p95_ms"} <= set(status)
    # At INFO, one warning when an outage starts and one line when it ends; none of the per-attempt lines.
    outages = [event for event in events if event["event"] == "database_outage"]
    recoveries = [event for event in events if event["event"] == "database_recovered"]
    assert 1 <= len(outages) <= int(openings.group(2)) and len(recoveries) == len(outages)
    assert {event["level"] for event in outages} == {"warning"} and {e["level"] for e in recoveries} == {"info"}
    assert not {"write_failed", "write_retried", "circuit_opened", "circuit_half_open", "journal_spilled"} & set(names)
    assert not [event for event in events if event["level"] == "warning" and event["event"] != "database_outage"]


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


def test_the_demo_defaults_line_names_each_changed_default_unless_the_environment_sets_it() -> None:
    everything = describe_overrides(demo_overrides({}))
    for variable, value in DEMO_OVERRIDES.values():
        assert f"{variable}={value:g}" in everything
    assert "PERSISTENCE_MAX_PENDING=200" in everything and "PERSISTENCE_BREAKER_RESET_SECONDS=3" in everything
    kept = describe_overrides(demo_overrides({"PERSISTENCE_MAX_PENDING": "5000"}))
    assert "PERSISTENCE_MAX_PENDING" not in kept and "PERSISTENCE_BREAKER_RESET_SECONDS=3" in kept


class _Lines:
    """A logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.lines.append((level, event, fields))


def _failed() -> WriteFailed:
    return WriteFailed(
        records=3, by_entity={"trade": 3}, error_class="OperationalError", error="locked", transient=True, attempts=2
    )


def _committed() -> BatchCommitted:
    return BatchCommitted(records=3, by_entity={"trade": 3}, duration=0.001, from_journal=False)


def test_an_outage_is_one_warning_and_one_recovery_line_and_other_events_pass_through() -> None:
    passed: list[Event] = []
    lines = _Lines()
    now = [0.0]
    summary = OutageSummary(passed.append, lines, clock=lambda: now[0])
    retried = WriteRetried(attempt=1, delay=0.01, error_class="OperationalError", error="locked")
    dead = RecordDeadLettered(entity="trade", key="T-1", error_class="IntegrityError", error="bad", correlation_id=None)
    for event in (
        retried,
        _committed(),  # a retry that got through: no outage
        retried,
        _failed(),
        BreakerChanged(from_state="closed", to_state="open", consecutive_failures=5),
        JournalSpilled(records=200, journal_pending=200, reason="max_pending"),
        dead,
        BreakerChanged(from_state="open", to_state="half_open", consecutive_failures=5),
        _failed(),
        BreakerChanged(from_state="half_open", to_state="open", consecutive_failures=6),
        JournalReplayed(records=200, journal_pending=0),
    ):
        summary(event)
    now[0] = 4.0
    summary(BreakerChanged(from_state="half_open", to_state="closed", consecutive_failures=0))
    summary(_committed())
    assert [(level, event) for level, event, _ in lines.lines] == [
        ("warning", "database_outage"),
        ("info", "database_recovered"),
    ]
    recovered = lines.lines[1][2]
    assert recovered == {
        "outage_seconds": 4.0,
        "failed_writes": 2,
        "retries": 1,
        "breaker_openings": 2,
        "journaled": 200,
        "replayed_from_journal": 200,
    }
    assert passed == [_committed(), dead, _committed()] and summary.outages == 1


def test_failures_that_end_before_the_breaker_opens_are_one_outage_ending_at_the_next_commit() -> None:
    passed: list[Event] = []
    lines = _Lines()
    summary = OutageSummary(passed.append, lines, clock=lambda: 0.0)
    for event in (_failed(), _failed(), _committed(), _failed(), _committed()):
        summary(event)
    assert [event for _, event, _ in lines.lines] == ["database_outage", "database_recovered"] * 2
    assert summary.outages == 2


def test_the_readme_names_the_demos_changed_defaults() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    for variable, value in DEMO_OVERRIDES.values():
        assert f"`{variable}={value:g}`" in readme, variable
