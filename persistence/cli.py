"""The ``persistence-sidecar`` command line (also ``python -m persistence``).

Each subcommand builds :class:`~persistence.config.Settings` from the environment at the edge and passes it
down. A configuration error is reported in one line naming the variable, with exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from persistence.config import Settings
from persistence.db import create_database, sqlite_path
from persistence.errors import ConfigurationError, PersistenceError
from persistence.migrations import current_revision, head_revision, upgrade
from persistence.repositories import Repositories

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


async def _migrate(_args: argparse.Namespace, settings: Settings) -> int:
    database = create_database(settings)
    try:
        revision = await upgrade(database)
    finally:
        await database.dispose()
    print(f"schema at revision {revision} ({settings.safe_database_url})")
    return 0


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    database = create_database(settings)
    report: dict[str, Any] = {"database": settings.safe_database_url, "head_revision": head_revision()}
    path = sqlite_path(settings.url) if settings.is_sqlite else None
    if path is not None:
        report["path"] = str(path.resolve())
        report["size_bytes"] = path.stat().st_size if path.exists() else None
    try:
        report["schema_revision"] = await current_revision(database)
        report["tables"] = await Repositories(database).table_counts() if report["schema_revision"] else {}
    finally:
        await database.dispose()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for key, value in report.items():
            print(f"{key:>16}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="persistence-sidecar",
        description="Persistence sidecar for trading orchestrators. Configuration comes from the environment.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    migrate = commands.add_parser("migrate", help="apply the schema migrations (safe to run twice)")
    migrate.set_defaults(handler=_migrate)
    status = commands.add_parser("status", help="database path, size, schema revision and table counts")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.set_defaults(handler=_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ConfigurationError as exc:
        print(f"persistence-sidecar: {exc}", file=sys.stderr)
        return 2
    handler: Command = args.handler
    try:
        return asyncio.run(handler(args, settings))
    except PersistenceError as exc:
        print(f"persistence-sidecar: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
