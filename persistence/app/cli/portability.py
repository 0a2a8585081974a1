"""The command line's portability commands: ``export``, ``copy``, ``restore``, and ``migrate`` (with ``--to``).

Each prints one line saying what it did (stdout); a progress bar goes to stderr, only on a terminal. Refusals (a
corrupt backup, a database in use, a schema newer than this release, a copy that differs) are one line on stderr and a
non-zero exit status. :func:`add_commands` adds the subcommands to the main parser.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from persistence.app.cli.existing import require_existing
from persistence.app.cli.progress import ProgressBar
from persistence.config import Settings, parse_flag
from persistence.db.backups import automatic_backups, backup_dir_for
from persistence.db.engine import create_database, sqlite_path
from persistence.errors import ConfigurationError, CopyMismatchError, InvalidQueryError
from persistence.migrations import current_revision, migrate_to, upgrade
from persistence.records.iso8601 import parse_iso8601
from persistence.records.models import ENTITIES, SESSIONS
from persistence.records.registry import RECORD_KINDS
from persistence.tables.repositories import AMENDMENT_RULES
from persistence.tools.copy import DEFAULT_CHUNK_ROWS, copy_database
from persistence.tools.export import EXPORTABLES, FORMATS, count_rows, export, require_pyarrow, resolve_format
from persistence.tools.restore import restore_sqlite

Handler = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


def _one_line(error: BaseException) -> str:
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _fail(message: str, status: int = 1) -> int:
    print(f"persistence-sidecar: {message}", file=sys.stderr)
    return status


# ---------------------------------------------------------------------------------------------- migrate


async def migrate_command(args: argparse.Namespace, settings: Settings) -> int:
    """``migrate [--to REVISION] [--force]``: upgrade (or downgrade) the schema, backing a SQLite database up first."""
    backup_dir = backup_dir_for(settings)
    path = sqlite_path(settings.url) if settings.is_sqlite else None
    before = set(automatic_backups(backup_dir, path.stem)) if backup_dir and path else set()
    database = create_database(settings)
    try:
        if args.to is None:
            revision = await upgrade(database, backup_dir=backup_dir)
            message = f"schema at revision {revision} ({settings.safe_database_url})"
        else:
            plan = await migrate_to(database, args.to, force=args.force, backup_dir=backup_dir)
            reached = plan.target or "base"
            if plan.direction == "none":
                message = f"schema already at revision {reached} ({settings.safe_database_url})"
            else:
                message = (
                    f"schema {plan.direction}d from revision {plan.current or 'base'} to {reached}"
                    f" ({settings.safe_database_url})"
                )
    finally:
        await database.dispose()
    new_backups = sorted(set(automatic_backups(backup_dir, path.stem)) - before) if backup_dir and path else []
    for backup in new_backups:
        print(f"backed up the database to {backup} before migrating")
    print(message)
    return 0


# ---------------------------------------------------------------------------------------------- export


def _export_filters(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "start_date": args.start_date,
        "end_date": args.end_date,
        "symbol": args.symbol,
        "session": args.session,
        "pattern_type": args.pattern_type,
        "executed": args.executed,
        "instance_id": args.instance_id,
        "record": args.audited_entity,
    }
    return {name: value for name, value in given.items() if value is not None}


async def export_command(args: argparse.Namespace, settings: Settings) -> int:
    """``export ENTITY --format F --output PATH`` with the history filters."""
    require_pyarrow()
    output = Path(args.output)
    try:
        fmt = resolve_format(output, args.format)
    except InvalidQueryError as exc:
        return _fail(str(exc), 2)
    exists, is_dir = await asyncio.to_thread(lambda: (output.exists(), output.is_dir()))
    if is_dir:
        return _fail(f"{output} is a directory; give a file name")
    if exists and not args.force:
        return _fail(f"{output} exists; pass --force to replace it")
    filters = _export_filters(args)
    await require_existing(settings)
    database = create_database(settings)
    try:
        try:
            revision = await current_revision(database)
        except (OSError, SQLAlchemyError) as exc:
            return _fail(f"the database is unreachable ({settings.safe_database_url}): {_one_line(exc)}")
        if revision is None:
            return _fail("the database has no schema yet; run `persistence-sidecar migrate`")
        bar = ProgressBar(f"export {args.entity}")
        try:
            if bar.tty:
                bar.total = await count_rows(database, args.entity, **filters)
            result = await export(database, args.entity, output, fmt, progress=bar.update, **filters)
        except InvalidQueryError as exc:
            return _fail(str(exc), 2)
        finally:
            bar.close()
    finally:
        await database.dispose()
    print(result.summary())
    return 0


# ---------------------------------------------------------------------------------------------- copy


def _settings_for(url: str) -> Settings:
    return Settings(database_url=url)


async def copy_command(args: argparse.Namespace, settings: Settings) -> int:
    """``copy --to URL [--from URL]``: every table, target migrated first, then compared."""
    try:
        source_settings = _settings_for(args.from_url) if args.from_url else settings
        target_settings = _settings_for(args.to)
    except ConfigurationError as exc:
        return _fail(str(exc), 2)
    await require_existing(source_settings)
    if not target_settings.is_sqlite:  # a SQLite target is created; a server's database must be there
        await require_existing(target_settings)
    source = create_database(source_settings)
    target = create_database(target_settings)
    bars: dict[str, ProgressBar] = {}

    def progress(table: str, done: int, total: int) -> None:
        bar = bars.get(table)
        if bar is None:
            for previous in bars.values():
                previous.close()
            bar = bars[table] = ProgressBar(f"copy {table}", total)
        bar.update(done)

    try:
        report = await copy_database(
            source, target, rules=AMENDMENT_RULES, chunk_rows=args.chunk_size, progress=progress
        )
    except CopyMismatchError as exc:
        for bar in bars.values():
            bar.close()
        for line in exc.report.lines():
            print(line)
        return _fail(
            f"the copy differs from the source in {', '.join(exc.tables)} (if the source was being written"
            " meanwhile, stop its writer and run the copy again: it amends what changed)"
        )
    except (OSError, SQLAlchemyError) as exc:
        return _fail(f"the copy stopped: {_one_line(exc)}; run it again to resume")
    finally:
        for bar in bars.values():
            bar.close()
        await source.dispose()
        await target.dispose()
    for line in report.lines():
        print(line)
    rows = sum(entry.source_rows for entry in report.tables)
    added = sum(entry.added for entry in report.tables)
    print(
        f"copied {source_settings.safe_database_url} to {target_settings.safe_database_url}: {rows:,} rows in"
        f" {len(report.tables)} tables ({added:,} added this run); every table's count and checksum match"
    )
    return 0


# ---------------------------------------------------------------------------------------------- restore


async def restore_command(args: argparse.Namespace, settings: Settings) -> int:
    """``restore BACKUP [--force]`` (SQLite)."""
    path = sqlite_path(settings.url) if settings.is_sqlite else None
    if path is None:
        return _fail(
            "restore replaces a SQLite database file; for PostgreSQL use pg_restore"
            f" ({settings.safe_database_url} is not a SQLite file)",
            2,
        )
    result = await asyncio.to_thread(restore_sqlite, Path(args.backup), path, force=args.force)
    print(result.summary())
    return 0


# ---------------------------------------------------------------------------------------------- the parser


def iso8601_argument(value: str) -> datetime:
    """An ISO 8601 command-line argument, or argparse's own error naming what is wrong with it."""
    try:
        return parse_iso8601(value)
    except ValueError as exc:  # also a time past the calendar's ends once in UTC (9999-12-31T23:59:59-05:00)
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _filtered_by(field: str) -> str:
    """The export names whose history filters on ``field`` (``trades, signals``), for a flag's help."""
    return ", ".join(kind.export_name for kind in RECORD_KINDS if field in kind.filters)


def _flag(value: str) -> bool:
    try:
        return parse_flag(value)  # the words PERSISTENCE_ENABLED takes
    except ValueError:
        raise argparse.ArgumentTypeError("must be true or false") from None


def add_migrate_options(migrate: argparse.ArgumentParser) -> None:
    """``--to`` and ``--force`` on the ``migrate`` subcommand, and its handler."""
    migrate.add_argument(
        "--to",
        metavar="REVISION",
        help="upgrade or downgrade to this revision (a revision id, head or base); default: head",
    )
    migrate.add_argument(
        "--force", action="store_true", help="downgrade even when it drops tables or columns that hold data"
    )
    migrate.set_defaults(handler=migrate_command)


def add_commands(commands: Any) -> None:
    """Add ``export``, ``copy`` and ``restore`` to the main parser's subcommands."""
    exporting = commands.add_parser(
        "export",
        help="write history to Parquet, CSV or JSONL for analysis (needs persistence-sidecar[analysis])",
        description="Stream a table to a file: Parquet (decimals as decimal128(18, 8)), CSV or JSONL (decimals as "
        "strings); timestamps in UTC. Written to a temporary file and renamed at the end.",
    )
    exporting.add_argument("entity", choices=tuple(EXPORTABLES), help="what to export")
    exporting.add_argument("--format", choices=FORMATS, help="default: from the file name, else parquet")
    exporting.add_argument("--output", "-o", required=True, metavar="PATH", help="file to write")
    exporting.add_argument("--force", action="store_true", help="replace PATH if it exists")
    exporting.add_argument("--symbol", help=f"{_filtered_by('symbol')}: e.g. EURUSD")
    exporting.add_argument("--session", type=str.upper, choices=SESSIONS, help=_filtered_by("session"))
    exporting.add_argument("--pattern-type", help=f"{_filtered_by('pattern_type')}: e.g. breakout")
    exporting.add_argument("--executed", type=_flag, help=f"{_filtered_by('executed')}: true or false")
    exporting.add_argument("--instance-id", help="only rows (or audit entries) this orchestrator wrote")
    exporting.add_argument(
        "--entity", dest="audited_entity", choices=ENTITIES, help="audit: the entries of one kind of record"
    )
    exporting.add_argument("--start-date", type=iso8601_argument, help="earliest time, ISO 8601 (inclusive)")
    exporting.add_argument("--end-date", type=iso8601_argument, help="latest time, ISO 8601 (inclusive)")
    exporting.set_defaults(handler=export_command)

    copying = commands.add_parser(
        "copy",
        help="copy every table to another database (SQLite <-> PostgreSQL), then compare them",
        description="Copy every table from DATABASE_URL (or --from) to --to, migrating the target first, in "
        "chunks. The target must be empty or an earlier copy of the same source (anything else, or the source "
        "itself under another name, is refused before anything is written). Running it again adds what is new, "
        "amends what changed at the source (the newer version wins, as in the writer) and finishes an interrupted "
        "copy. It ends by comparing each table's row count and checksum and exits non-zero naming any table that "
        "differs.",
    )
    copying.add_argument("--to", required=True, metavar="URL", help="the target database URL")
    copying.add_argument("--from", dest="from_url", metavar="URL", help="the source (default: DATABASE_URL)")
    copying.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=DEFAULT_CHUNK_ROWS,
        help=f"rows per transaction (default: {DEFAULT_CHUNK_ROWS})",
    )
    copying.set_defaults(handler=copy_command)

    restoring = commands.add_parser(
        "restore",
        help="replace the SQLite database with a backup (checked first; refused while a sidecar runs)",
        description="Check BACKUP (integrity, schema revision), then replace the SQLite database at DATABASE_URL "
        "with it in one atomic step, keeping the replaced file as <database>.pre-restore. Refused while a sidecar "
        "has the database open.",
    )
    restoring.add_argument("backup", metavar="BACKUP", help="the backup file (e.g. from `persistence-sidecar backup`)")
    restoring.add_argument("--force", action="store_true", help="replace an existing <database>.pre-restore")
    restoring.set_defaults(handler=restore_command)
