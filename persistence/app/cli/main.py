"""The ``persistence-sidecar`` command line (also ``python -m persistence``).

``demo`` runs a simulated orchestrator with the sidecar embedded and the API served; ``serve`` serves the history
API and ``/metrics`` over a database; ``migrate``, ``status``, ``backup`` and ``history`` look after and into it;
``export``, ``copy`` and ``restore`` (with ``migrate``'s handler) live in :mod:`persistence.app.cli.portability`.
Each subcommand builds :class:`~persistence.config.Settings` from the environment at the edge and passes it down.
A configuration error is reported in one line naming the variable, with exit status 2; an unreachable database is
one line and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sqlite3
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from persistence.app.cli.audit import add_audit_commands
from persistence.app.cli.existing import require_existing
from persistence.app.cli.portability import add_commands, add_migrate_options, iso8601_argument
from persistence.config import Settings
from persistence.db.backups import online_backup, write_failure_cause
from persistence.db.engine import create_database, sqlite_path
from persistence.errors import ConfigurationError, InvalidQueryError, JournalError, PersistenceError
from persistence.migrations import current_revision, head_revision
from persistence.observe.event_log import mask_secrets
from persistence.records.models import SESSIONS, Trade
from persistence.tables.queries import MAX_PAGE_SIZE, TRADE_SORT_COLUMNS, TradeQuery
from persistence.tables.repositories import Repositories
from persistence.write.journal import Journal

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


def _unreachable(settings: Settings, error: BaseException) -> int:
    detail = mask_secrets(str(error).splitlines()[0] if str(error) else "", settings.secrets)
    print(
        f"persistence-sidecar: the database is unreachable ({settings.safe_database_url}):"
        f" {type(error).__name__}: {detail}",
        file=sys.stderr,
    )
    return 1


# ---------------------------------------------------------------------------------------------- migrate, status


def journal_depth(directory: Path) -> int | None:
    """Records waiting in the journal at ``directory`` (0 when there is none), without creating anything."""
    if not directory.exists():
        return 0
    try:
        journal = Journal(directory, read_only=True)
    except (JournalError, OSError):
        return None
    try:
        return journal.pending
    finally:
        journal.close()


def server_health(settings: Settings, timeout: float = 1.0) -> dict[str, Any] | None:
    """The health a running server reports at ``api_host:api_port``, or ``None`` when none answers."""
    from persistence.app.server import url_host  # not at the top: it loads uvicorn

    url = f"http://{url_host(settings.api_host)}:{settings.api_port}/api/v1/health"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if settings.api_token is not None:
        request.add_header("Authorization", f"Bearer {settings.api_token.get_secret_value()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the URL is http://
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return {"answered": exc.code}
    except (OSError, ValueError):
        return None
    data = body.get("data") if isinstance(body, dict) else None
    return data if isinstance(data, dict) else None


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    from persistence.app.server import url_host

    await require_existing(settings)
    report: dict[str, Any] = {"database": settings.safe_database_url, "head_revision": head_revision()}
    path = sqlite_path(settings.url) if settings.is_sqlite else None
    if path is not None:
        report["path"] = str(path.resolve())
        report["size_bytes"] = path.stat().st_size if path.exists() else None
    database = create_database(settings)
    try:
        report["schema_revision"] = await current_revision(database)
        report["tables"] = await Repositories(database).table_counts() if report["schema_revision"] else {}
    except PersistenceError:
        raise
    except Exception as exc:
        return _unreachable(settings, exc)
    finally:
        await database.dispose()
    report["journal_dir"] = str(settings.journal_dir.resolve())
    report["journal_pending"] = journal_depth(settings.journal_dir)
    health = server_health(settings)
    server_url = f"http://{url_host(settings.api_host)}:{settings.api_port}"
    if health is None:
        report["server"] = {"running": False, "url": server_url}
    elif "answered" in health:
        report["server"] = {"running": True, "url": server_url, "error": f"HTTP {health['answered']}"}
    else:
        report["server"] = {"running": True, "url": server_url, "breaker": health.get("breaker")}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    server = report.pop("server")
    tables: dict[str, int] = report.pop("tables", {})
    width = max(len(name) for name in [*report, *tables, "server"])
    for key, value in report.items():
        print(f"{key:>{width}}: {value}")
        if key == "schema_revision":
            # The table counts, one row each like the rest, right under the revision they were counted at.
            if not tables:
                print(f"{'tables':>{width}}: none (the schema is not migrated yet)")
            for name, count in tables.items():
                print(f"{name:>{width}}: {count} rows")
    if not server["running"]:
        state = f"not running (nothing answers at {server_url})"
    elif "error" in server:
        state = f"running at {server_url}, health refused: {server['error']} (is PERSISTENCE_API_TOKEN set?)"
    else:
        state = f"running at {server_url}, breaker {server['breaker']}"
    print(f"{'server':>{width}}: {state}")
    return 0


# ---------------------------------------------------------------------------------------------- backup


async def _backup(args: argparse.Namespace, settings: Settings) -> int:
    return await asyncio.to_thread(_backup_sync, Path(args.destination), args.force, settings)


def _backup_sync(destination: Path, force: bool, settings: Settings) -> int:
    if not settings.is_sqlite:
        print(
            "persistence-sidecar: backup copies SQLite databases; for PostgreSQL use pg_dump, e.g.\n"
            f"  pg_dump --format=custom --file=backup.dump '{settings.safe_database_url}'",
            file=sys.stderr,
        )
        return 2
    source = sqlite_path(settings.url)
    if source is None or not source.exists():
        print(
            f"persistence-sidecar: there is no database file to back up ({settings.safe_database_url})", file=sys.stderr
        )
        return 1
    if destination.is_dir():
        destination = destination / source.name
    if destination.resolve() == source.resolve():
        print("persistence-sidecar: the destination is the database itself", file=sys.stderr)
        return 1
    if destination.exists() and not force:
        print(f"persistence-sidecar: {destination} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    try:  # written whole beside the destination, then renamed over it: an existing backup stays until then
        pages = online_backup(source.resolve(), destination)
    except (OSError, sqlite3.Error) as exc:
        cause = write_failure_cause(destination, exc)
        print(f"persistence-sidecar: cannot back up to {destination}: {cause}; nothing was written", file=sys.stderr)
        return 1
    size = destination.stat().st_size
    print(f"backed up {source.resolve()} to {destination.resolve()} ({pages} pages, {size} bytes, integrity ok)")
    return 0


def _page_size(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 1 <= number <= MAX_PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_PAGE_SIZE}")
    return number


HISTORY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("trade_id", "TRADE_ID"),
    ("symbol", "SYMBOL"),
    ("direction", "DIR"),
    ("session", "SESSION"),
    ("pattern_type", "PATTERN"),
    ("entry_time", "ENTRY TIME (UTC)"),
    ("entry_price", "ENTRY"),
    ("exit_price", "EXIT"),
    ("position_size", "SIZE"),
    ("pnl", "PNL"),
)
_RIGHT_ALIGNED = frozenset({"entry_price", "exit_price", "position_size", "pnl"})


def _cell(trade: Trade, name: str) -> str:
    value = getattr(trade, name)
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if name in _RIGHT_ALIGNED:
        return format(value.normalize(), "f") if value == value.to_integral() else format(value, "f").rstrip("0")
    return str(value)


def trade_table(trades: Sequence[Trade]) -> str:
    """Trades as a plain text table, one row each."""
    rows = [[_cell(trade, name) for name, _ in HISTORY_COLUMNS] for trade in trades]
    headers = [title for _, title in HISTORY_COLUMNS]
    widths = [max([len(headers[i]), *(len(row[i]) for row in rows)]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if name in _RIGHT_ALIGNED else cell.ljust(width)
            for cell, width, (name, _) in zip(cells, widths, HISTORY_COLUMNS, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), line(["-" * width for width in widths]), *(line(row) for row in rows)])


async def _history(args: argparse.Namespace, settings: Settings) -> int:
    await require_existing(settings)
    database = create_database(settings)
    try:
        try:
            revision = await current_revision(database)
        except PersistenceError:
            raise
        except Exception as exc:
            return _unreachable(settings, exc)
        if revision is None:
            print(
                "persistence-sidecar: the database has no schema yet; run `persistence-sidecar migrate`",
                file=sys.stderr,
            )
            return 1
        try:
            query = TradeQuery(
                start_date=args.start_date,
                end_date=args.end_date,
                symbol=args.symbol,
                session=args.session,
                pattern_type=args.pattern_type,
                trade_id=args.trade_id,
                signal_id=args.signal_id,
                instance_id=args.instance_id,
                limit=args.limit,
                offset=args.offset,
                sort_by=args.sort_by,
                sort_order=args.sort_order,
            )
            page = await Repositories(database).trades.query(query, with_total=True)
        except InvalidQueryError as exc:
            print(f"persistence-sidecar: {exc}", file=sys.stderr)
            return 2
    finally:
        await database.dispose()
    if args.json:
        # The API's shape: the list as data, paging beside it.
        paging = {"limit": page.limit, "offset": page.offset, "total": page.total}
        print(json.dumps({"data": [t.to_json() for t in page.items], "page": paging}, indent=2))
        return 0
    if not page.items:
        print("no trades match")
        return 0
    print(trade_table(page.items))
    shown = f"{args.offset + 1}-{args.offset + len(page.items)}"
    print(f"\n{len(page.items)} trade(s) shown ({shown} of {page.total}), sorted by {args.sort_by} {args.sort_order}")
    return 0


# ---------------------------------------------------------------------------------------------- serve, demo


async def _serve(_args: argparse.Namespace, settings: Settings) -> int:
    from persistence.app.api import create_app
    from persistence.app.cli.console import StatusConsole, configure_console_logging
    from persistence.app.server import ApiServer

    configure_console_logging(settings, StatusConsole(sys.stderr))
    server = ApiServer(create_app(settings), settings.api_host, settings.api_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"serving the history API at {server.base_url}/api/v1 and metrics at {server.base_url}/metrics", flush=True)
    print(f"  database {settings.safe_database_url}; Ctrl-C to stop", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()  # the app's lifespan closes the sidecar
    print("stopped", flush=True)
    return 0


async def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from persistence.app.demo.orchestrator import DemoOptions, demo_overrides, demo_settings, run_demo

    options = DemoOptions(duration=args.duration, rate=args.rate, chaos=args.chaos, seed=args.seed)
    return await run_demo(demo_settings(settings), options, sys.stdout, demo_overrides())


def _positive(kind: type[float] | type[int]) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not number > 0:
            raise argparse.ArgumentTypeError("must be greater than zero")
        return number

    return parse


# ---------------------------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="persistence-sidecar",
        description="Persistence sidecar for trading orchestrators. Configuration comes from the environment "
        "(DATABASE_URL, PERSISTENCE_*; see .env.example).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run a simulated orchestrator with the sidecar, the API and /metrics (the main job)",
        description="A simulated orchestrator: random-walk prices, signals, trades that open and close, persisted "
        "by the embedded sidecar, with the history API and /metrics served and a live status line. "
        "Ctrl-C (or SIGTERM) stops it gracefully, nothing lost, and prints a summary.",
    )
    demo.add_argument("--duration", type=_positive(float), default=None, help="seconds to run (default: until Ctrl-C)")
    demo.add_argument("--rate", type=_positive(float), default=50.0, help="records per second (default: 50)")
    demo.add_argument(
        "--chaos",
        action="store_true",
        help="every few seconds take the database away (another connection holds its write lock) so the "
        "circuit breaker opens, recovers and backfills (SQLite only)",
    )
    demo.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable simulation")
    demo.set_defaults(handler=_demo)

    serve = commands.add_parser(
        "serve",
        help="serve the history API and /metrics over the database",
        description="Serve the history API and /metrics at PERSISTENCE_API_HOST:PERSISTENCE_API_PORT "
        "(127.0.0.1:8089 by default) until Ctrl-C or SIGTERM.",
    )
    serve.set_defaults(handler=_serve)

    migrate = commands.add_parser(
        "migrate", help="apply the schema migrations (safe to run twice)", description="Apply the schema migrations."
    )
    add_migrate_options(migrate)  # --to, --force; the handler lives in cli_portability

    status = commands.add_parser(
        "status",
        help="database path, size, schema revision, table counts, journal depth, server state",
        description="Database path, size, schema revision and table counts, records waiting in the journal, and "
        "the breaker state of a server running at PERSISTENCE_API_HOST:PERSISTENCE_API_PORT.",
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.set_defaults(handler=_status)

    backup = commands.add_parser(
        "backup",
        help="a consistent copy of the SQLite database, while writes go on",
        description="Copy the SQLite database with SQLite's online backup API: a consistent snapshot, taken while "
        "writers go on, checked with PRAGMA integrity_check. On PostgreSQL, use pg_dump.",
    )
    backup.add_argument("destination", metavar="DEST", help="file to write (or a directory to write it into)")
    backup.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    backup.set_defaults(handler=_backup)

    history = commands.add_parser(
        "history",
        help="recent trades as a table, with the API's filters",
        description="Trades from the database as a plain text table, newest entry first unless sorted otherwise.",
    )
    history.add_argument("--symbol", help="e.g. EURUSD")
    history.add_argument("--session", type=str.upper, choices=SESSIONS, help="trading session")
    history.add_argument("--pattern-type", help="e.g. breakout")
    history.add_argument("--trade-id", help="one trade by its id (any characters)")
    history.add_argument("--signal-id", help="the trades of one signal")
    history.add_argument(
        "--instance-id",
        help="only trades this orchestrator (its PERSISTENCE_INSTANCE_ID) wrote last; pre-audit for"
        " trades from before the audit trail",
    )
    history.add_argument("--start-date", type=iso8601_argument, help="earliest entry time, ISO 8601 (inclusive)")
    history.add_argument("--end-date", type=iso8601_argument, help="latest entry time, ISO 8601 (inclusive)")
    history.add_argument("--limit", type=_page_size, default=20, help=f"rows, 1 to {MAX_PAGE_SIZE} (default: 20)")
    history.add_argument("--offset", type=int, default=0, help="rows to skip (default: 0)")
    history.add_argument("--sort-by", choices=TRADE_SORT_COLUMNS, default="entry_time", help="default: entry_time")
    history.add_argument("--sort-order", choices=("asc", "desc"), default="desc", help="default: desc")
    history.add_argument("--json", action="store_true", help="print JSON instead of a table")
    history.set_defaults(handler=_history)

    add_commands(commands)  # export, copy, restore (persistence.app.cli.portability)
    add_audit_commands(commands)  # audit verify, audit versions (persistence.app.cli.audit)
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
        print(f"persistence-sidecar: {mask_secrets(str(exc), settings.secrets)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
