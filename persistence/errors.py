"""The one error hierarchy of the sidecar.

Every error the library raises on purpose derives from :class:`PersistenceError` and carries its context as
attributes, so callers can branch on type and read the details without parsing messages. Errors about bad
input are also ``ValueError`` and timeouts are also ``TimeoutError``, so generic handlers keep working.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PersistenceError(Exception):
    """Base class of every error raised by the persistence sidecar."""


class ConfigurationError(PersistenceError, ValueError):
    """A setting is invalid. ``variable`` names the environment variable, ``reason`` says why."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        self.variable = problems[0][0] if problems else ""
        self.reason = problems[0][1] if problems else ""
        super().__init__("invalid configuration: " + "; ".join(f"{var}: {why}" for var, why in problems))


class InvalidRecordError(PersistenceError, ValueError):
    """A record failed validation; nothing was stored.

    ``entity`` is the kind of record (``trade``, ``signal``, …), ``field`` the offending field (``""`` for a
    rule that spans fields) and ``reason`` a human-readable explanation. ``errors`` lists every problem found.
    """

    def __init__(self, entity: str, errors: list[tuple[str, str]]) -> None:
        self.entity = entity
        self.errors = errors
        self.field = errors[0][0] if errors else ""
        self.reason = errors[0][1] if errors else ""
        detail = "; ".join(f"{field or '<record>'}: {why}" for field, why in errors)
        super().__init__(f"invalid {entity}: {detail}")


class SidecarClosedError(PersistenceError):
    """A record was offered to a sidecar that has been closed (or was never started)."""


class FlushTimeoutError(PersistenceError, TimeoutError):
    """``flush()`` did not see every recorded record committed within its timeout."""

    def __init__(self, timeout: float, outstanding: int) -> None:
        self.timeout = timeout
        self.outstanding = outstanding
        super().__init__(f"{outstanding} record(s) not yet committed after {timeout:g} s")


class DeadLetteredError(PersistenceError):
    """The record can never be written; it was put in ``dead_letters``."""

    def __init__(self, entity: str, key: str, error: str) -> None:
        self.entity = entity
        self.key = key
        self.error = error
        super().__init__(f"{entity} {key!r} was dead-lettered: {error}")


class QueryTimeoutError(PersistenceError, TimeoutError):
    """A statement ran longer than ``DATABASE_QUERY_TIMEOUT`` and was interrupted."""

    def __init__(self, timeout_ms: int, statement: str | None = None) -> None:
        self.timeout_ms = timeout_ms
        self.statement = statement
        super().__init__(f"statement exceeded DATABASE_QUERY_TIMEOUT ({timeout_ms} ms)")


class DatabaseUnavailableError(PersistenceError):
    """The database cannot be reached or refused the operation for a reason that is not the data's fault."""

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        self.cause = cause
        super().__init__(message)


class MigrationError(PersistenceError):
    """Applying the schema migrations failed."""

    def __init__(self, message: str, **context: Any) -> None:
        self.context = context
        super().__init__(message)


class InvalidQueryError(PersistenceError, ValueError):
    """A read was asked with a parameter outside what is allowed (for example an unknown sort column)."""

    def __init__(self, parameter: str, reason: str) -> None:
        self.parameter = parameter
        self.reason = reason
        super().__init__(f"{parameter}: {reason}")


class RecordDroppedError(PersistenceError):
    """The record was neither written nor journaled (for example, the journal's disk was full too)."""

    def __init__(self, entity: str, key: str, reason: str) -> None:
        self.entity = entity
        self.key = key
        self.reason = reason
        super().__init__(f"{entity} {key!r} was dropped: {reason}")


class JournalError(PersistenceError):
    """The journal could not read or write its files, or was used after it was closed.

    ``path`` is the file or directory concerned. When the failure came from the operating system the
    original :class:`OSError` is the ``__cause__``.
    """

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(f"{message}: {path}")
        self.path = path


class ApiPortUnavailableError(PersistenceError):
    """The API's host and port could not be bound (``host``, ``port``, the ``OSError`` as ``__cause__``)."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host = host
        self.port = port
        super().__init__(f"cannot listen on {host}:{port}: {reason} (set PERSISTENCE_API_PORT / PERSISTENCE_API_HOST)")


class DowngradeDataLossError(MigrationError):
    """A downgrade would drop tables or columns that hold data; ``losses`` names them (``table`` or
    ``table.column``)."""

    def __init__(self, target: str, losses: list[str]) -> None:
        self.target = target
        self.losses = losses
        super().__init__(
            f"downgrading to {target!r} would drop {', '.join(losses)}, which hold data; pass --force to drop them"
            " (back the database up first)",
            revision=target,
            losses=losses,
        )


class SchemaNewerError(MigrationError):
    """The database's schema revision is unknown to this release: most likely a newer release migrated it.

    ``database_revision`` is the database's revision, ``release_revision`` the newest one this release knows.
    Nothing was written.
    """

    def __init__(self, database_revision: str, release_revision: str) -> None:
        self.database_revision = database_revision
        self.release_revision = release_revision
        super().__init__(
            f"the database is at schema revision {database_revision!r}, which this release does not know (its newest"
            f" is {release_revision!r}): a newer release migrated it; upgrade persistence-sidecar to write to it",
            database_revision=database_revision,
            release_revision=release_revision,
        )


ANALYSIS_EXTRA = "persistence-sidecar[analysis]"
"""The extra that brings pyarrow, for exports."""


class AnalysisExtraMissingError(PersistenceError, ImportError):
    """pyarrow is not installed; ``extra`` names the extra that brings it."""

    def __init__(self) -> None:
        self.extra = ANALYSIS_EXTRA
        super().__init__(f"export needs pyarrow, which is not installed: pip install '{ANALYSIS_EXTRA}'")


class RestoreError(PersistenceError):
    """A restore was refused or failed; ``backup`` and ``database`` say which files, ``reason`` why."""

    def __init__(self, backup: Path, database: Path, reason: str) -> None:
        self.backup = backup
        self.database = database
        self.reason = reason
        super().__init__(f"cannot restore {database} from {backup}: {reason}; the database was not changed")


class CopyMismatchError(PersistenceError):
    """After a copy, the target differs from the source; ``tables`` names the tables that differ."""

    def __init__(self, report: Any) -> None:  # a persistence.tools.copy.CopyReport
        self.report = report
        self.tables = report.mismatched
        super().__init__(f"the copy differs from the source in table(s): {', '.join(self.tables)}")


class CopyRefusedError(PersistenceError):
    """A copy refused before writing anything: the target is the source itself, or holds data that is not an earlier
    copy of this source, or the source's schema is not this release's."""


class ExportError(PersistenceError):
    """An export could not write its file; ``path`` is the file asked for (never the hidden temporary one)."""

    def __init__(self, message: str, *, path: Path) -> None:
        self.path = path
        super().__init__(message)


class DatabaseMissingError(PersistenceError):
    """A command that only reads was pointed at a database that does not exist; nothing was created."""


class BackupError(PersistenceError):
    """A backup could not be made; ``path`` is the database it was made of."""

    def __init__(self, message: str, *, path: Path) -> None:
        self.path = path
        super().__init__(message)


class DatabaseInUseError(PersistenceError):
    """The database's lock is held the other way: a sidecar has it open (or a restore is replacing it)."""

    def __init__(self, database: Path, lock_file: Path, *, exclusive: bool) -> None:
        self.database = database
        self.lock_file = lock_file
        if exclusive:
            message = f"{database} is in use: a sidecar has it open (it holds {lock_file}); stop it first"
        else:
            message = f"{database} is being restored (another process holds {lock_file} exclusively)"
        super().__init__(message)


class JournalDirectoryInUseError(PersistenceError):
    """Another sidecar owns the journal directory (it holds the lock file inside it); this one refuses to start.

    ``directory`` is the resolved directory, ``holder_pid`` and ``holder_instance`` what the holder wrote into the
    lock file (``None`` when it could not be read).
    """

    def __init__(self, directory: Path, holder_pid: int | None, holder_instance: str | None) -> None:
        self.directory = directory
        self.holder_pid = holder_pid
        self.holder_instance = holder_instance
        holder = f"pid {holder_pid if holder_pid is not None else '?'}, instance {holder_instance or '?'}"
        super().__init__(
            f"the journal directory {directory} belongs to another sidecar ({holder}); "
            "give each sidecar its own PERSISTENCE_JOURNAL_DIR"
        )


class JournalNotWritableError(PersistenceError):
    """``start()`` could not create, fsync and remove a probe file in the journal directory.

    ``directory`` is the directory, ``reason`` the operating system's answer. Raised unless
    ``PERSISTENCE_JOURNAL_REQUIRED=false``, which starts degraded instead.
    """

    def __init__(self, directory: Path, reason: str) -> None:
        self.directory = directory
        self.reason = reason
        super().__init__(
            f"the journal directory {directory} is not writable ({reason}); fix it, or set "
            "PERSISTENCE_JOURNAL_REQUIRED=false to start without a journal"
        )


class BreakerAdmissionError(PersistenceError, ValueError):
    """A result was reported to the circuit breaker for an admission it had refused (a caller's mistake).

    ``state`` is the breaker's state (``closed``, ``open``, ``half_open``) and ``generation`` the admission's.
    """

    def __init__(self, state: str, generation: int) -> None:
        self.state = state
        self.generation = generation
        super().__init__(
            f"cannot record a result for an admission that was refused (breaker {state}, generation {generation})"
        )


class JournalPositionError(JournalError, ValueError):
    """An entry handed to the journal to acknowledge ends at no record of it (``segment``, ``offset``, ``path``)."""

    def __init__(self, path: Path, segment: int, offset: int) -> None:
        self.segment = segment
        self.offset = offset
        super().__init__(f"journal has no entry ending at segment {segment}, offset {offset}", path)


class AuditKeyError(PersistenceError):
    """An audit signing or public key cannot be used (missing, not Ed25519, readable by others); ``path`` is it."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class AuditVerifyError(PersistenceError):
    """``audit verify`` could not finish its check (its rows check's process failed): no verdict on the trail."""


# ---------------------------------------------------------------------------------------------- internal signals
# Raised and caught inside the package; none reaches a caller, so none is exported.


class InternalSignal(Exception):
    """Base of the exceptions the package raises to itself (control flow between two of its own frames)."""


class ApiError(InternalSignal):
    """An error answer of the history API: HTTP status, ``code`` and message, put in the wrapper by the route class."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class DowngradeTrialDone(InternalSignal):
    """Raised inside a trial downgrade to roll it back, carrying the schema before and after."""

    def __init__(self, before: dict[str, set[str]], after: dict[str, set[str]]) -> None:
        super().__init__("trial downgrade rolled back")
        self.before = before
        self.after = after


class DataFault(InternalSignal):
    """A batch's statement failed because of its data (the committer splits the batch to find the record)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class TransientFault(InternalSignal):
    """A batch's statement failed for a reason that may pass (the committer retries, then gives the batch back)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class StatementAbandoned(InternalSignal):
    """Raised on the driver's thread instead of starting a statement of a call its caller gave up on."""


class StoredValueNotAsWritten(InternalSignal):
    """A stored value the sidecar would not have written: verify sends its row down the slow path, which says what
    it is."""
