"""Audit-trail helpers shared by the audit tests: a trade's closed version, tampering past the triggers, the CLI
(in this process, or in a subprocess for the end-to-end runs), an anchored trail and its anchor files."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from persistence import PersistenceSidecar
from persistence.config import Settings
from persistence.records.models import Trade
from tests.support import REPO_ROOT
from tests.support.cli import run_in_process
from tests.support.factories import make_trade
from tests.support.sidecars import SettingsFactory


def closed_version(trade: Trade, seconds: int = 60, pnl: str = "12.5") -> Trade:
    return trade.model_copy(
        update={
            "exit_time": trade.entry_time + timedelta(seconds=seconds),
            "exit_price": trade.entry_price + Decimal("0.001"),
            "pnl": Decimal(pnl).quantize(Decimal("0.00000001")),
            "updated_at": trade.updated_at + timedelta(seconds=seconds),
        }
    )


async def tamper(database_url: str, *statements: str) -> None:
    """Run ``statements`` on a second connection, past the trail's triggers (as a superuser or the file's owner can)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        with sqlite3.connect(url.database or "") as connection:
            connection.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
            connection.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
            for statement in statements:
                connection.execute(statement)
        return
    connection = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, password=url.password, database=url.database
    )
    try:
        async with connection.transaction():
            await connection.execute("SET LOCAL session_replication_role = replica")
            for statement in statements:
                await connection.execute(statement)
    finally:
        await connection.close()


def audit_cli(database_url: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """``persistence-sidecar audit ARGUMENTS`` on ``database_url``, by its ``main()`` in this process."""
    return run_in_process("audit", *arguments, cwd=REPO_ROOT, env={**os.environ, "DATABASE_URL": database_url})


def audit_cli_in_a_subprocess(database_url: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """The same in a real ``python -m persistence`` process: each audit command runs so at least once."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "persistence", "audit", *arguments],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def anchored_trail(
    database_url: str, sidecar_settings: SettingsFactory, instance: str = "bot-x", **overrides: Any
) -> tuple[Settings, list[Any]]:
    """Two runs of a sidecar: four trades opened, then closed; a checkpoint at each close()."""
    settings = sidecar_settings(database_url, instance_id=instance, **overrides)
    trades = [make_trade(trade_id=f"T-{instance}-{i}") for i in range(4)]
    async with PersistenceSidecar(settings) as sidecar:
        for trade in trades:
            sidecar.record_trade(trade)
    async with PersistenceSidecar(settings) as sidecar:
        for trade in trades:
            sidecar.record_trade(closed_version(trade))
    return settings, trades


def audit_export(database_url: str, output: Path) -> Any:
    """``export audit`` by its ``main()`` in this process; test_audit runs the same command in a real subprocess."""
    env = {**os.environ, "DATABASE_URL": database_url}
    return run_in_process("export", "audit", "--format", "jsonl", "--output", str(output), cwd=output.parent, env=env)
