"""The command line: `python -m persistence migrate` and `status` from a clean working directory."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "PERSISTENCE_", "ENABLE_"))}
    environment.update(env, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "persistence", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_migrate_creates_the_default_database_with_the_five_tables(tmp_path: Path) -> None:
    result = run_cli("migrate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    database = tmp_path / "data" / "trading_system.db"
    assert database.exists()
    with sqlite3.connect(database) as connection:
        names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"trades", "signals", "performance_snapshots", "parameter_history", "dead_letters"} <= names


def test_status_reports_revision_and_counts(tmp_path: Path) -> None:
    assert run_cli("migrate", cwd=tmp_path).returncode == 0
    result = run_cli("status", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["schema_revision"] == report["head_revision"]
    assert report["tables"]["trades"] == 0
    assert report["path"].endswith("trading_system.db") and report["size_bytes"] > 0


def test_a_configuration_error_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli("migrate", cwd=tmp_path, ENABLE_DATABASE_PERSISTENCE="maybe")
    assert result.returncode == 2
    assert "ENABLE_DATABASE_PERSISTENCE" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_status_never_prints_the_database_password(tmp_path: Path) -> None:
    result = run_cli(
        "status",
        cwd=tmp_path,
        DATABASE_URL="postgresql+asyncpg://trader:hunter2@127.0.0.1:1/nowhere",
        DATABASE_QUERY_TIMEOUT="500",
    )
    assert "hunter2" not in result.stdout + result.stderr
