"""The committer: one batch in, one outcome out.

It groups a batch by entity and writes it in one transaction (upserts keyed by the natural id; an older version
never overwrites a newer one). Transient errors (locked, I/O, lost connection, timeout) are retried with tenacity
(exponential backoff with jitter, bounded attempts and time, the injected ``sleep``); when the retries run out the
outcome carries the failure and the batch stays where it is. A data error (a constraint, a value out of range, a
character the database's encoding refuses) splits the batch until the bad records are isolated; each goes to
``dead_letters``, and if even that insert is refused, to a dead-letter file beside the journal (one checksummed
JSON line per record, fsynced), so a bad record never stops the writer. The committer publishes nothing and knows
nothing of the breaker, the backlog or receipts: the writer turns its :class:`Outcome` into all of those.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from persistence.audit.chain import AuditHead
from persistence.db.engine import Database
from persistence.errors import DataFault, TransientFault
from persistence.tables.repositories import Repositories, batch_parts
from persistence.write.backlog import KINDS, Pending, Sleep
from persistence.write.breaker import Verdict, verdict_of
from persistence.write.faults import classify
from persistence.write.journal import encode_line, write_durably

UNKNOWN_SIGNAL = "no signal with this signal_id was ever recorded"
DEAD_LETTER_FILE = "dead-letters.jsonl"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How transient write errors are retried before they count as one breaker failure."""

    attempts: int = 3
    max_seconds: float = 10.0
    initial_wait: float = 0.05
    max_wait: float = 1.0


@dataclass(frozen=True, slots=True)
class DeadLetteredRecord:
    """A record that can never be written, where it was kept instead (``table`` or ``file``), and why."""

    item: Pending
    error_class: str
    error: str
    kept_in: str = "table"


@dataclass(slots=True)
class Outcome:
    """What became of a batch: a handled prefix (committed, dead-lettered or lost) and maybe a transient failure.

    ``lost`` holds records that could be kept nowhere (refused by ``dead_letters`` and the dead-letter file);
    ``audit_head`` is this process's audit chain head after the last transaction that wrote a version.
    """

    committed: list[Pending] = field(default_factory=list)
    dead: list[DeadLetteredRecord] = field(default_factory=list)
    lost: list[tuple[Pending, str]] = field(default_factory=list)
    failure: BaseException | None = None
    attempts: int = 0
    audit_head: AuditHead | None = None

    @property
    def handled(self) -> int:
        return len(self.committed) + len(self.dead) + len(self.lost)

    @property
    def verdict(self) -> Verdict:
        """What this outcome means to the breaker (:func:`~persistence.write.breaker.verdict_of`)."""
        return verdict_of(failed=self.failure is not None, data_errors=bool(self.dead or self.lost))


class Committer:
    """Writes batches to one database; see the module docstring.

    ``check`` runs before each transaction and may raise a transient error (the SQLite file was replaced);
    ``on_retry`` is told of each retry, for the writer to publish.
    """

    def __init__(
        self,
        database: Database,
        repositories: Repositories,
        *,
        retry: RetryPolicy,
        sleep: Sleep,
        dead_letter_dir: Path,
        on_retry: Callable[[RetryCallState], None] = lambda state: None,
        check: Callable[[], None] = lambda: None,
    ) -> None:
        self._database = database
        self._repos = repositories
        self._retry = retry
        self._sleep = sleep
        self._dead_letter_path = Path(dead_letter_dir) / DEAD_LETTER_FILE
        self._on_retry = on_retry
        self._check = check

    async def commit(self, batch: Sequence[Pending]) -> Outcome:
        """Commit ``batch``; on a data error split it until the bad records are isolated and dead-lettered.

        The handled records always form a prefix of ``batch`` in order: on a transient failure the rest waits. A
        transaction begun ahead of it (:meth:`prepare_ahead`) is rolled back unless all of ``batch`` is handled.
        """
        outcome = await self._split_and_commit(batch)
        if outcome.handled < len(batch):
            await self._repos.discard_ahead()
        return outcome

    async def _split_and_commit(self, batch: Sequence[Pending]) -> Outcome:
        outcome = Outcome()
        segments: deque[list[Pending]] = deque([list(batch)] if batch else [])
        while segments:
            segment = segments.popleft()
            try:
                transaction = partial(self._transaction, segment, outcome)
                unknown: list[Pending] = await self._with_retries(transaction, outcome)
            except DataFault as fault:
                if len(segment) > 1:
                    middle = len(segment) // 2
                    segments.appendleft(segment[middle:])
                    segments.appendleft(segment[:middle])
                    continue
                [item] = segment
                if not await self._dead_letter(item, fault.cause, outcome):
                    return outcome
                continue
            except TransientFault as failure:
                outcome.failure = failure.cause
                return outcome
            unknown_ids = {id(item) for item in unknown}
            for item in segment:
                if id(item) in unknown_ids:
                    outcome.dead.append(DeadLetteredRecord(item, "UnknownSignal", UNKNOWN_SIGNAL))
                else:
                    outcome.committed.append(item)
        return outcome

    async def prepare_ahead(self, batch: Sequence[Pending], committing: Sequence[Pending]) -> None:
        """Begin the transaction of ``batch`` (the next one) while ``committing`` commits
        (:meth:`Repositories.begin_ahead <persistence.tables.repositories.Repositories.begin_ahead>`); its
        :meth:`commit` continues it. Nothing that fails here matters: that transaction meets the error again. The
        beginning is not stopped by this call's cancellation (the writer's, once the commit is done)."""
        begun = self._repos.begin_ahead([item.record for item in batch], [item.record for item in committing])
        if begun is not None:
            try:
                await asyncio.shield(begun)
            except asyncio.CancelledError:
                if not begun.cancelled():
                    raise  # this call is cancelled; the beginning goes on
            except Exception:
                return

    async def close(self) -> None:
        """Roll back a transaction begun ahead and not committed (at stop)."""
        await self._repos.discard_ahead()

    async def _dead_letter(self, item: Pending, cause: BaseException, outcome: Outcome) -> bool:
        """Keep one bad record in ``dead_letters``, else in the file; ``False`` if the database failed meanwhile."""
        error_class, message = type(cause).__name__, short_error(cause)
        try:
            await self._with_retries(partial(self._dead_letter_row, item, cause), outcome)
        except TransientFault as failure:
            outcome.failure = failure.cause
            return False
        except DataFault as refusal:
            # dead_letters refuses it too (say, a byte its encoding cannot hold): the file beside the journal keeps it.
            try:
                await asyncio.to_thread(self._dead_letter_line, item, cause, refusal.cause)
            except OSError as error:
                outcome.lost.append((item, f"{message}; dead_letters: {short_error(refusal.cause)}; file: {error}"))
                return True
            outcome.dead.append(DeadLetteredRecord(item, error_class, message, kept_in="file"))
            return True
        outcome.dead.append(DeadLetteredRecord(item, error_class, message))
        return True

    async def _with_retries(self, operation: Callable[[], Awaitable[Any]], outcome: Outcome) -> Any:
        policy = self._retry
        attempts = 0
        try:
            async for attempt in AsyncRetrying(
                # Only real errors are retried: a cancellation (shutdown) must go through at once.
                retry=retry_if_exception(lambda error: isinstance(error, Exception) and classify(error) == "transient"),
                stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.max_seconds),
                wait=wait_random_exponential(multiplier=policy.initial_wait, max=policy.max_wait),
                sleep=self._sleep,
                before_sleep=self._on_retry,
                reraise=True,
            ):
                with attempt:
                    attempts += 1
                    return await operation()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            outcome.attempts = max(outcome.attempts, attempts)
            if classify(error) == "data":
                raise DataFault(error) from error
            raise TransientFault(error) from error
        raise AssertionError("unreachable")  # pragma: no cover

    async def _transaction(self, segment: Sequence[Pending], outcome: Outcome) -> list[Pending]:
        """One transaction for a segment; returns execution updates whose signal does not exist.

        Every version of a record in the segment is applied in order, and each one written is audited.
        """
        self._check()
        written = await self._repos.write_batch(
            *batch_parts([item.record for item in segment]), unknown_signal=UNKNOWN_SIGNAL
        )
        if written.audit_head is not None:
            outcome.audit_head = written.audit_head
        missing_ids = {id(change) for change in written.unknown}
        return [item for item in segment if id(item.record) in missing_ids]

    async def _dead_letter_row(self, item: Pending, error: BaseException) -> None:
        self._check()
        async with self._database.write() as connection:
            await self._repos.dead_letters.insert(connection, [(item.record, error)])

    def _dead_letter_line(self, item: Pending, error: BaseException, refusal: BaseException) -> None:
        """Append one record to the dead-letter file and fsync it (on a worker thread)."""
        line = encode_line(
            {
                "entity": item.record.entity,
                "kind": KINDS[type(item.record)],
                "key": item.record.key,
                "error_class": type(error).__name__,
                "error": short_error(error),
                "dead_letters_refused": short_error(refusal),
                "at": time.time(),
                "data": item.record.to_json(),
            }
        )
        self._dead_letter_path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(self._dead_letter_path, line, append=True)


def short_error(error: BaseException | None, limit: int = 500) -> str:
    """The driver's own message, without SQLAlchemy's statement echo and documentation link."""
    if error is None:
        return ""
    original = getattr(error, "orig", None)
    text = str(original) if isinstance(error, DBAPIError) and original is not None else str(error)
    text = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
