"""The command line's ``audit`` commands: ``audit verify`` and ``audit versions``.

``audit verify [--instance ID]`` walks every chain (or one) and holds every current row against its latest audited
version (:mod:`persistence.audit.verify`). It prints one line per chain (with its head hash, to keep elsewhere) and
per table, then the verdict, and exits 0 when everything holds, 1 naming the first broken entry, 2 when the
database cannot be checked. A progress bar goes to stderr, only on a terminal.

With ``--anchors DIR [--public-key PATH.pub]`` it also holds every checkpoint in ``DIR`` against its chain and
checks their signatures (:mod:`persistence.audit.anchors`); ``--since-last-anchor`` checks only what follows each
chain's newest checkpoint that still matches. A key that cannot be used is refused (exit 2). ``--from-export FILE``
checks an exported trail (``export audit --format jsonl``) and the anchors with no database at all.

``audit keygen PATH`` writes an Ed25519 private key (mode 0600) and ``PATH.pub``, for
``PERSISTENCE_AUDIT_SIGNING_KEY``.

``audit versions ENTITY KEY`` prints every audited version of one record, oldest first, as JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic.script import ScriptDirectory
from sqlalchemy.exc import SQLAlchemyError

from persistence.app.cli.existing import require_existing
from persistence.app.cli.progress import ProgressBar
from persistence.config import Settings
from persistence.db.engine import Database, create_database
from persistence.errors import AuditKeyError, AuditVerifyError
from persistence.migrations import alembic_config, current_revision, head_revision
from persistence.migrations.guard import is_known
from persistence.observe.event_log import mask_secrets
from persistence.records.models import ENTITIES

if TYPE_CHECKING:  # the trail, its checker and the signing keys (cryptography) load only when a command runs
    from persistence.audit.anchors import Anchors

_BEFORE_THE_TRAIL = ("0001", "0002")
VERIFY_JOBS = 3
"""``audit verify``'s processes by default: the chain walk here, the rows in two parts elsewhere (on two cores, about
half the time of one process: the walk is about 40 % of the work, and the parts fill the other core and the rest)."""
MAX_VERIFY_JOBS = 32
"""The most ``--jobs`` takes: each job is a process (about 70 MB) and a database connection of its own."""


def _jobs(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_VERIFY_JOBS:
        raise argparse.ArgumentTypeError(
            f"must be 1 to {MAX_VERIFY_JOBS} (each job is a process and a database connection), not {value}"
        )
    return value


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
    if not is_known(ScriptDirectory.from_config(alembic_config()), revision):
        return (
            f"the database is at schema revision {revision}, which this release ({head_revision()}) does not know:"
            " a newer release migrated it; audit it with that release"
        )
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


def _read_anchors(args: argparse.Namespace, settings: Settings) -> Anchors | None:
    """The checkpoints of ``--anchors``, checked on their own; :class:`AuditKeyError` or ``OSError`` if unusable."""
    if args.anchors is None:
        if args.public_key is not None or args.since_last_anchor:
            raise AuditKeyError(Path("--anchors"), "needed by --public-key and --since-last-anchor")
        return None
    from persistence.audit.anchors import load_anchors, load_public_key

    keys = [load_public_key(path) for path in args.public_key or ()]
    return load_anchors(args.anchors, settings.audit_anchor_seconds, keys)


async def verify_command(args: argparse.Namespace, settings: Settings) -> int:
    """``audit verify [--instance ID] [--anchors DIR [--public-key PATH.pub] [--since-last-anchor]]``."""
    from persistence.audit.verify import count_checks, verify

    try:
        anchors = await asyncio.to_thread(_read_anchors, args, settings)
    except AuditKeyError as error:
        return _fail(str(error), 2)
    except OSError as error:
        return _fail(f"cannot read the anchors {args.anchors}: {error.strerror or error}", 2)
    if args.from_export is not None:
        return await _verify_export(args, anchors)

    async def check(database: Database) -> int:
        bar = ProgressBar("audit verify", await count_checks(database, args.instance))
        try:
            report = await verify(
                database,
                instance_id=args.instance,
                progress=bar.update,
                anchors=anchors,
                since_last_anchor=args.since_last_anchor,
                jobs=args.jobs,
            )
        except AuditVerifyError as error:
            return _fail(mask_secrets(str(error), settings.secrets), 2)
        finally:
            bar.close()
        for line in report.lines():
            print(line)
        return 0 if report.ok else 1

    return await _on_the_trail(settings, check)


async def _verify_export(args: argparse.Namespace, anchors: Anchors | None) -> int:
    """``audit verify --from-export FILE``: the exported trail's chains and the checkpoints, no database."""
    if args.since_last_anchor or args.instance is not None:
        return _fail("--from-export checks the whole file: drop --since-last-anchor and --instance", 2)
    from persistence.audit.verify import verify_export

    try:
        report = await asyncio.to_thread(verify_export, args.from_export, anchors)
    except OSError as error:
        return _fail(f"cannot read the export {args.from_export}: {error.strerror or error}", 2)
    except AuditVerifyError as error:
        return _fail(str(error), 2)
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


async def keygen_command(args: argparse.Namespace, settings: Settings) -> int:
    """``audit keygen PATH``."""
    from persistence.audit.anchors import generate_key

    try:
        public = await asyncio.to_thread(generate_key, args.path)
    except AuditKeyError as error:
        return _fail(str(error), 2)
    print(f"private key {args.path} (mode 0600): set PERSISTENCE_AUDIT_SIGNING_KEY={args.path}")
    print(f"public key {public}: give it to whoever verifies (`audit verify --anchors DIR --public-key {public}`)")
    return 0


async def versions_command(args: argparse.Namespace, settings: Settings) -> int:
    """``audit versions ENTITY KEY``."""
    from persistence.audit.trail import AuditLog

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
    checking.add_argument(
        "--anchors",
        metavar="DIR",
        type=Path,
        help="also hold every checkpoint in DIR (PERSISTENCE_AUDIT_ANCHOR_DIR) against its chain",
    )
    checking.add_argument(
        "--public-key",
        metavar="PATH.pub",
        type=Path,
        action="append",
        help="check the checkpoints' signatures with this key; repeat it for the keys of a key replaced by another",
    )
    checking.add_argument(
        "--from-export",
        metavar="FILE",
        type=Path,
        help="check an exported trail (`export audit --format jsonl`) instead of the database: no database needed",
    )
    checking.add_argument(
        "--since-last-anchor",
        action="store_true",
        help="check only what follows each chain's newest checkpoint that still matches (needs --anchors)",
    )
    checking.add_argument(
        "--jobs",
        type=_jobs,
        default=VERIFY_JOBS,
        metavar="N",
        help=f"processes that check (default {VERIFY_JOBS}): this one walks the chains while N - 1 others check the "
        "rows, each its part of every table's keys; 1 checks everything here, one pass after the other",
    )
    checking.set_defaults(handler=verify_command)
    keygen = actions.add_parser(
        "keygen",
        help="write an Ed25519 key pair that signs the checkpoints",
        description="Write an Ed25519 private key (PEM, mode 0600) at PATH and its public key at PATH.pub. Set "
        "PERSISTENCE_AUDIT_SIGNING_KEY=PATH for the sidecar; give PATH.pub to whoever verifies. Never overwrites.",
    )
    keygen.add_argument("path", type=Path, metavar="PATH", help="where the private key goes")
    keygen.set_defaults(handler=keygen_command)
    listing = actions.add_parser(
        "versions",
        help="every audited version of one record, oldest first (JSON lines)",
        description="Print every audited version of one record, oldest first, one JSON object per line.",
    )
    listing.add_argument("entity", choices=ENTITIES, help="the kind of record")
    listing.add_argument("key", help="its natural key (trade_id, signal_id or id)")
    listing.set_defaults(handler=versions_command)
