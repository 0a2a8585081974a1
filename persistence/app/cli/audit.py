"""The command line's ``audit`` commands: ``audit verify`` and ``audit versions``.

``audit verify [--instance ID]`` walks every chain (or one) and holds every current row against its latest audited
version (:mod:`persistence.audit.verify`). It prints one line per chain (with its head hash, to keep elsewhere) and
per table, then the verdict, and exits 0 when everything holds, 1 naming the first broken entry, 2 when the
database cannot be checked. A progress bar goes to stderr, only on a terminal.

``audit versions ENTITY KEY`` prints every audited version of one record, oldest first, as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from persistence.app.cli.existing import require_existing
from persistence.app.cli.progress import ProgressBar
from persistence.audit.trail import AuditLog
from persistence.audit.verify import count_checks, verify
from persistence.config import Settings
from persistence.db.engine import Database, create_database
from persistence.migrations import current_revision, head_revision
from persistence.records.models import ENTITIES

_BEFORE_THE_TRAIL = ("0001", "0002")


def _fail(message: str, status: int) -> int:
    print(f"persistence-sidecar: {message}", file=sys.stderr)
    return status


async def _checked(settings: Settings) -> str | None:
    """Why the database cannot be audited, or ``None``."""
    database = create_database(settings)
    try:
        revision = await current_revision(database)
    except (OSError, SQLAlchemyError) as exc:
        return f"the database is unreachable ({settings.safe_database_url}): {type(exc).__name__}"
    finally:
        await database.dispose()
    if revision is None:
        return f"the database has no schema ({settings.safe_database_url}); run `persistence-sidecar migrate`"
    if revision in _BEFORE_THE_TRAIL:
        return (
            f"the database is at schema revision {revision}, before the audit trail; run `persistence-sidecar migrate`"
        )
    if revision != head_revision():
        return f"the database is at schema revision {revision}, which this release ({head_revision()}) does not know"
    return None


async def _on_the_trail(settings: Settings, work: Callable[[Database], Awaitable[int]]) -> int:
    """Run ``work`` on the database when it can be audited; else say why (exit status 2)."""
    await require_existing(settings)  # reading never creates
    problem = await _checked(settings)
    if problem is not None:
        return _fail(problem, 2)
    database = create_database(settings)
    try:
        return await work(database)
    finally:
        await database.dispose()


async def verify_command(args: argparse.Namespace, settings: Settings) -> int:
    """``audit verify [--instance ID]``."""

    async def check(database: Database) -> int:
        bar = ProgressBar("audit verify", await count_checks(database, args.instance))
        try:
            report = await verify(database, instance_id=args.instance, progress=bar.update)
        finally:
            bar.close()
        for line in report.lines():
            print(line)
        return 0 if report.ok else 1

    return await _on_the_trail(settings, check)


async def versions_command(args: argparse.Namespace, settings: Settings) -> int:
    """``audit versions ENTITY KEY``."""

    async def listing(database: Database) -> int:
        entries = await AuditLog(database).versions(args.entity, args.key)
        if not entries:
            return _fail(f"no audited version of {args.entity} {args.key!r}", 1)
        for entry in entries:
            print(json.dumps(entry.to_json(), sort_keys=True))
        return 0

    return await _on_the_trail(settings, listing)


def add_audit_commands(commands: Any) -> None:
    """Add ``audit verify`` and ``audit versions`` to the main parser's subcommands."""
    audit = commands.add_parser(
        "audit",
        help="check the audit trail, or list a record's versions",
        description="The audit trail: every version the sidecar wrote, hash-chained per instance.",
    )
    actions = audit.add_subparsers(dest="audit_action", required=True, metavar="ACTION")
    checking = actions.add_parser(
        "verify",
        help="check every chain and every current row against its latest audited version",
        description="Walk every audit chain (no gap, every link, every hash) and check that each row of trades, "
        "signals, performance_snapshots and parameter_history equals its latest audited version and that no "
        "audited row was deleted. Exit 0 when all holds, 1 naming the first broken entry.",
    )
    checking.add_argument("--instance", metavar="ID", help="check one instance's chain and rows only")
    checking.set_defaults(handler=verify_command)
    listing = actions.add_parser(
        "versions",
        help="every audited version of one record, oldest first (JSON lines)",
        description="Print every audited version of one record, oldest first, one JSON object per line.",
    )
    listing.add_argument("entity", choices=ENTITIES, help="the kind of record")
    listing.add_argument("key", help="its natural key (trade_id, signal_id or id)")
    listing.set_defaults(handler=versions_command)
