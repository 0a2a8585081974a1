"""The backlog: every record not yet committed, in RAM and in the on-disk journal, as one durable FIFO.

Records enter in :meth:`Backlog.submit` (the hot path: O(1), no I/O) and leave in :meth:`Backlog.settle`, once the
writer has committed, dead-lettered or given up on a prefix of them. In between they are in RAM, in the journal, or
in both:

* the journal holds the oldest part: records of an earlier run (or of an earlier backlog of this process, before a
  ``set_enabled`` flip) and records pushed out of RAM; after them come records that are in RAM *and* journaled, and
  last the newest records, in RAM only. So RAM is a journaled prefix followed by an unjournaled suffix, and the head
  of the FIFO is on disk only while the journal holds records that are not in RAM;
* a keeper task journals (chunked appends, then one fsync) every record in RAM only, the youngest too, once the
  oldest of them is half of ``PERSISTENCE_JOURNAL_SYNC_SECONDS`` old and the writer has made no progress for as long
  (an outage, a retry under way, a database that stopped answering). So during an outage RAM is never the only copy
  of a record for longer than the sync interval, and the journal takes one append and one fsync per half interval,
  not one per record as they come due. It also keeps RAM within ``PERSISTENCE_MAX_PENDING``: past it the oldest
  records are journaled and let go from RAM, also while a commit is in flight;
* each record version is written to the journal at most once; a batch that is committed is acknowledged in the
  journal through its last journaled record (one checkpoint, off the event loop).

Every file operation (open and scan, append, fsync, peek and parse, acknowledge, close) runs on one journal thread,
which serialises them; the event loop only moves references. Receipts of records let go from RAM are held weakly by
the sidecar's :class:`ReceiptBook`, which outlives backlogs, so a receipt answered ``journaled`` turns ``persisted``
when its record is committed by any later backlog of the same process. What is lost to journal damage (a torn tail,
a checksum mismatch, a record that no longer parses) and what fits nowhere is counted and published per record.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import json
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from persistence.config import Settings
from persistence.errors import InvalidRecordError, JournalDirectoryInUseError, JournalError, JournalNotWritableError
from persistence.observe.correlation import correlation_id
from persistence.observe.events import (
    EventBus,
    JournalCorrupt,
    JournalFailed,
    JournalSpilled,
    JournalSynced,
    JournalUnwritable,
    RecordsDropped,
)
from persistence.records.history import TradeHistory
from persistence.records.models import Entity, Record, Trade
from persistence.records.receipts import Receipt
from persistence.records.registry import JOURNAL_KINDS, JOURNAL_MODELS
from persistence.write.journal import Journal, JournalOwnership, Position

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")

JOURNAL_FORMAT = 1
KINDS: Mapping[type[Record], str] = JOURNAL_KINDS
"""The ``kind`` a journal entry of each model is tagged with (the registry's journal kinds)."""
MODELS: Mapping[str, type[Record]] = JOURNAL_MODELS
"""The model each journal kind is parsed as."""
APPEND_CHUNK = 64
"""Records per journal write: when the disk fills, every chunk written before is kept."""
PARSE_SLICE = 32
"""Records validated per turn of the loop during a replay (about half a millisecond)."""


class Pending:
    """One record in the backlog."""

    __slots__ = ("correlation_id", "journal_at", "receipt", "record", "recorded_at", "safe", "seq")

    def __init__(
        self,
        seq: int,
        record: Record,
        receipt: Receipt | None,
        recorded_at: float | None,
        cid: str | None,
        journal_at: Position | None = None,
    ) -> None:
        self.seq = seq
        self.record = record
        self.receipt = receipt
        self.recorded_at = recorded_at
        self.correlation_id = cid
        self.journal_at = journal_at
        self.safe = journal_at is not None  # committed, fsynced to the journal, or final


@dataclass(slots=True)
class Tally:
    """What became of the records of one sidecar, over all its backlogs."""

    persisted: int = 0
    journaled: int = 0
    dead_lettered: int = 0
    dropped: int = 0
    replayed: int = 0


class ReceiptBook:
    """Per sidecar: a run id, sequence numbers, the tally, and the receipts of records held only on disk (weakly)."""

    def __init__(self) -> None:
        self.run_id = uuid.uuid4().hex
        self._seq = itertools.count(1)
        self._receipts: weakref.WeakValueDictionary[int, Receipt] = weakref.WeakValueDictionary()
        self.tally = Tally()

    def next_seq(self) -> int:
        return next(self._seq)

    def keep(self, seq: int, receipt: Receipt) -> None:
        self._receipts[seq] = receipt

    def find(self, run: object, seq: int) -> Receipt | None:
        return self._receipts.get(seq) if run == self.run_id and seq else None

    def forget(self, seq: int) -> None:
        self._receipts.pop(seq, None)


@dataclass(slots=True)
class Batch:
    """The head of the backlog, taken for one commit. ``None`` slots are journal lines that could not be read."""

    slots: list[Pending | None]
    from_journal: bool
    positions: list[Position | None]
    """Where each slot's line ends in the journal, when it was read from there."""

    @property
    def records(self) -> list[Pending]:
        return [slot for slot in self.slots if slot is not None]


class Backlog:
    """RAM and journal as one FIFO; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        bus: EventBus,
        history: TradeHistory,
        clock: Clock,
        sleep: Sleep,
        book: ReceiptBook,
    ) -> None:
        self._settings = settings
        self._bus = bus
        self._history = history
        self._clock = clock
        self._sleep = sleep
        self._book = book
        self._ram: deque[Pending] = deque()
        self._journaled_in_ram = 0  # RAM's journaled prefix
        self._journal: Journal | None = None
        self._ownership = JournalOwnership(settings.journal_dir, settings.instance_id)
        self._opened = False
        self._journal_error: str | None = None  # the start-up probe's failure, while no journal is open
        self._journal_pending = 0  # mirrored from the journal thread, read by metrics
        self._oldest_on_disk_at: float | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._io_lock = asyncio.Lock()
        self._last_seq = 0
        self._watermark = 0
        self._inherited = 0  # records found in the journal at open, left by an earlier run or backlog
        self._progress = asyncio.Event()
        self._work = asyncio.Event()  # wakes the writer
        self._keeper_wake = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._keeper_idle = False
        self._last_progress = clock()
        self._reported_corrupt = 0
        self._unparsable: list[tuple[str, str]] = []  # lines that no longer parse, reported once read
        self._closed = False
        self._grace = max(settings.journal_sync_seconds / 2, 0.0)
        self._poll = max(settings.journal_sync_seconds / 4, 0.01)

    # ------------------------------------------------------------------ state

    @property
    def work(self) -> asyncio.Event:
        """Set whenever a record arrives; the writer waits on it."""
        return self._work

    @property
    def queue_depth(self) -> int:
        """Records in RAM."""
        return len(self._ram)

    @property
    def journal_pending(self) -> int:
        """Records in the journal (some may also be in RAM)."""
        return self._journal_pending

    @property
    def journal_corrupt_lines(self) -> int:
        """Journal lines lost to damage since the journal was opened."""
        return self._journal.corrupt_lines if self._journal is not None else 0

    @property
    def journal_error(self) -> str | None:
        """Why the journal directory could not be written at start (degraded), while no journal is open."""
        return self._journal_error if self._journal is None else None

    @property
    def on_disk_only(self) -> int:
        """Records at the head of the FIFO that are in the journal and not in RAM."""
        return max(self._journal_pending - self._journaled_in_ram, 0)

    def __len__(self) -> int:
        return len(self._ram) + self.on_disk_only

    def outstanding(self) -> int:
        """Records not yet committed or final: submitted to this backlog, or found in the journal at open."""
        return max(self._last_seq - self._watermark, 0) + self._inherited

    def oldest_age(self) -> float:
        """Seconds since the oldest waiting record was recorded (or its journal was found); 0 when none waits."""
        now = self._clock()
        oldest = self._oldest_on_disk_at if self.on_disk_only else None
        try:
            first = self._ram[0].recorded_at  # read from the metrics thread too: the deque may empty meanwhile
        except IndexError:
            first = None
        if first is not None and (oldest is None or first < oldest):
            oldest = first
        return max(now - oldest, 0.0) if oldest is not None else 0.0

    # ------------------------------------------------------------------ the hot path

    def submit(self, record: Record) -> Receipt:
        """Append a validated record; O(1), no I/O. Returns its receipt."""
        receipt = Receipt(record.entity, record.key)
        seq = self._book.next_seq()
        self._last_seq = seq
        now = self._clock()
        ram = self._ram
        if not ram:
            self._last_progress = now  # waiting starts now, not when the writer last had work
        ram.append(Pending(seq, record, receipt, now, correlation_id.get()))
        self._work.set()
        if self._keeper_idle or len(ram) > self._settings.max_pending:
            self._keeper_idle = False
            self._keeper_wake.set()
        return receipt

    async def wait_for(self, timeout: float) -> bool:
        """Wait until every record submitted so far, and every record found in the journal at open, is committed or
        final; ``False`` on timeout."""
        target = self._last_seq
        try:
            async with asyncio.timeout(timeout):
                while self._watermark < target or self._inherited:
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Own the journal directory, prove it writable, open (scan) the journal and start the keeper.

        Runs on the journal thread; publishes damage found. Raises :class:`JournalDirectoryInUseError` when another
        sidecar owns the directory, and :class:`JournalNotWritableError` when it cannot be written (unless
        ``PERSISTENCE_JOURNAL_REQUIRED=false``: then a critical event, and the keeper tries again when it needs the
        journal). After a refusal nothing was started and the records stay in RAM: ``open`` may be called again.
        """
        if self._opened:
            return
        if self._journal is None:
            try:
                journal = await self._io(self._open_journal, True)
            except (JournalDirectoryInUseError, JournalNotWritableError) as error:
                if isinstance(error, JournalDirectoryInUseError) or self._settings.journal_required:
                    await self._io(self._ownership.release)
                    self._stop_thread()
                    raise
                self._journal_error = str(error)
                self._bus.publish(JournalUnwritable(directory=str(error.directory), error=error.reason))
            except (JournalError, OSError) as error:
                # Start all the same: the keeper opens the journal when it first needs it, and reports until then.
                self._bus.publish(JournalFailed("open", type(error).__name__, str(error)))
            else:
                self._journal = journal
                self._journal_pending = self._inherited = journal.pending
                if journal.pending:
                    self._oldest_on_disk_at = self._clock()
                    self._work.set()
                self._report_damage()
        self._opened = True
        if self._keeper is None:
            self._keeper = asyncio.create_task(
                self._keep(), name="persistence-journal-keeper", context=contextvars.Context()
            )

    async def close(self) -> None:
        """Journal every record still only in RAM (what fits nowhere is dropped, counted), then release the files."""
        if self._closed:
            return
        self._closed = True
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            # Let a round under way finish (a cancelled append would leave lines on disk that RAM does not know
            # of, and close() would write them again); the keeper stops at its next look.
            self._keeper_wake.set()
            await keeper
        try:
            async with self._io_lock:
                refusal = "the journal could not be opened"
                if self._ram and self._journal is None:
                    try:
                        self._journal = await self._io(self._open_journal, False)
                    except (JournalError, JournalDirectoryInUseError, JournalNotWritableError, OSError) as error:
                        refusal = str(error)
                    else:
                        self._report_damage()
                unjournaled = list(itertools.islice(self._ram, self._journaled_in_ram, None))
                if unjournaled and self._journal is None:
                    self._drop(unjournaled, "journal_unavailable", f"no journal at close: {refusal}")
                elif unjournaled:
                    written = await self._append(unjournaled, reason="shutdown")
                    await self._sync(written)
                    lost = unjournaled[len(written) :]
                    if lost:
                        self._drop(lost, "journal_unavailable", "the journal could not take the backlog at close")
                for item in self._ram:
                    if item.receipt is not None and item.journal_at is not None:
                        self._book.keep(item.seq, item.receipt)
                self._ram.clear()
                self._journaled_in_ram = 0
                if self._journal is not None:
                    with contextlib.suppress(JournalError, OSError):
                        await self._io(self._journal.close)
                if self._ownership.held:
                    await self._io(self._ownership.release)
        finally:
            self._stop_thread()

    def _stop_thread(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def _open_journal(self, probe: bool) -> Journal:
        """On the journal thread: own the directory (and at start prove it writable), then open the journal."""
        self._ownership.acquire()
        if probe:
            self._ownership.probe()
        return Journal(self._ownership.directory)

    # ------------------------------------------------------------------ the writer's side

    async def take(self, size: int) -> Batch:
        """The head of the FIFO, up to ``size`` records, without taking it out.

        Journal lines are read (and checksummed) on the journal thread and come back as undecoded JSON text (bytes:
        nothing the garbage collector tracks), then are decoded and validated back into records on the loop in
        slices of :data:`PARSE_SLICE`: CPU work on another thread would hold the GIL against the loop for longer,
        and a batch of decoded payloads kept alive across the slices would be promoted to the collector's oldest
        generation, bringing its full passes (tens of milliseconds on a large heap) sooner.
        """
        if self.on_disk_only and self._journal is not None:
            count = min(size, self.on_disk_only)
            journal = self._journal
            async with self._io_lock:
                lines = await self._io(journal.peek_payloads, count)
            slots: list[Pending | None] = []
            positions: list[Position | None] = []
            for start in range(0, len(lines), PARSE_SLICE):
                if start:
                    await asyncio.sleep(0)
                slots += self._parse_entries(lines[start : start + PARSE_SLICE], positions)
            del lines
            self._report_damage()
            return Batch(slots, True, positions)
        slots = list(itertools.islice(self._ram, size))
        return Batch(list(slots), False, [None] * len(slots))

    def upcoming(self, batch: Batch, size: int) -> list[Pending]:
        """The records after ``batch`` that the next :meth:`take` will give, up to ``size``, when they are in RAM
        (nothing when ``batch`` came from the journal: what follows it may be on disk only). No I/O."""
        if batch.from_journal:
            return []
        start = len(batch.slots)
        return list(itertools.islice(self._ram, start, start + size))

    def _parse_entries(
        self, lines: Sequence[tuple[bytes, int, int]], positions: list[Position | None]
    ) -> list[Pending | None]:
        """Journal lines (JSON text, segment, end offset) back into records (``None`` for one that no longer
        parses); each line's position is appended to ``positions``."""
        slots: list[Pending | None] = []
        run_id = self._book.run_id
        for text, segment, end in lines:
            position = (segment, end)
            positions.append(position)
            payload: dict[str, Any] = json.loads(text)  # checked by the journal: a JSON object
            run, seq = payload.get("run"), payload.get("seq")
            seq = seq if type(seq) is int and run == run_id else 0
            try:
                record = MODELS[str(payload["kind"])].parse(payload["data"])
            except (KeyError, TypeError, ValueError, InvalidRecordError) as error:
                slots.append(None)
                self._unparsable.append((_entity_of(payload), str(error)))
                continue
            recorded_at = payload.get("at") if seq else None  # monotonic times mean something only in their run
            cid = payload.get("cid")
            slots.append(
                Pending(
                    seq,
                    record,
                    None,
                    recorded_at if isinstance(recorded_at, float) else None,
                    cid if isinstance(cid, str) else None,
                    journal_at=position,
                )
            )
        return slots

    async def settle(self, batch: Batch, handled: int) -> None:
        """The first ``handled`` slots of ``batch`` are committed or final: take them out of RAM and the journal."""
        if handled <= 0:
            return
        done = batch.slots[:handled]
        last_seq = max((slot.seq for slot in done if slot is not None), default=0)
        async with self._io_lock:
            # Read under the lock: the keeper may have journaled part of a RAM batch while it was being committed,
            # and a spill under way (chunk by chunk, holding the lock) may be journaling more of it right now.
            positions = [
                slot.journal_at if slot is not None else position
                for slot, position in zip(done, batch.positions[:handled], strict=True)
            ]
            last_position = max((position for position in positions if position is not None), default=None)
            # RAM: the batch is the head of the FIFO, but the keeper may have let part of it go from RAM meanwhile.
            if not batch.from_journal:
                handled_seq = max(slot.seq for slot in done if slot is not None)
                while self._ram and self._ram[0].seq <= handled_seq:
                    item = self._ram.popleft()
                    if item.journal_at is not None:
                        self._journaled_in_ram -= 1
            if last_position is not None and self._journal is not None:
                try:
                    await self._io(self._journal.acknowledge_through, last_position)
                except (JournalError, OSError, ValueError) as error:
                    # Committed all the same; a replay after a restart is idempotent, so nothing is lost.
                    self._bus.publish(JournalFailed("checkpoint", type(error).__name__, str(error)))
                self._journal_pending = self._journal.pending
        if last_seq > self._watermark:
            self._watermark = last_seq
        if batch.from_journal:
            self._inherited = max(self._inherited - handled, 0)  # the inherited records come first in the journal
        self._last_progress = self._clock()
        self._progress.set()
        if not self.on_disk_only:
            self._oldest_on_disk_at = None
        self._history.evict(scan_limit=1024)  # trades just made safe may leave the window now

    def resolve(self, item: Pending) -> Receipt | None:
        """The receipt of a record, also of one read back from the journal."""
        receipt = item.receipt if item.receipt is not None else self._book.find(self._book.run_id, item.seq)
        if item.seq:
            self._book.forget(item.seq)
        return receipt

    def mark_safe(self, item: Pending) -> None:
        """A trade version is committed or final: the history may evict it (once per version)."""
        if not item.safe:
            item.safe = True
            if isinstance(item.record, Trade) and item.recorded_at is not None:
                self._history.mark_safe(item.record.trade_id)

    # ------------------------------------------------------------------ the keeper

    async def _keep(self) -> None:
        """Journal what must not wait in RAM only; see the module docstring.

        While RAM holds unjournaled records the keeper looks when the oldest is due, at the latest every quarter of
        the sync interval, both on the injected clock (a test moves time, no test waits for it); otherwise it sleeps
        until the hot path wakes it.
        """
        while not self._closed:
            due = self._next_due()
            if due is not None and due <= 0:
                try:
                    moved = await self.spill_due()
                except Exception as error:  # the keeper must outlive anything: report it, try again later
                    self._bus.publish(JournalFailed("keeper", type(error).__name__, str(error)))
                    moved = False
                if moved:
                    continue
                due = self._poll  # the journal refuses for now: look again later, do not spin
            self._keeper_wake.clear()
            if due is None:
                self._keeper_idle = True
                await self._keeper_wake.wait()
                continue
            await self._nap(min(due, self._poll))

    async def _nap(self, seconds: float) -> None:
        """Wait ``seconds`` on the injected clock, or until the hot path wakes the keeper, whichever comes first.

        The seconds count from now, when the keeper decided them, not from when the sleeping task first runs: time
        that passes in between (a test moving its clock, a busy loop) is not added to the nap.
        """
        deadline = self._clock() + seconds

        async def until_deadline() -> None:
            await self._sleep(max(deadline - self._clock(), 0.0))

        sleeper = asyncio.ensure_future(until_deadline())
        waker = asyncio.ensure_future(self._keeper_wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    def _next_due(self) -> float | None:
        """Seconds until the keeper has work (0: now), or ``None`` while RAM holds nothing unjournaled."""
        ram, start = self._ram, self._journaled_in_ram
        return spill_due_in(
            now=self._clock(),
            oldest_unjournaled=ram[start].recorded_at if len(ram) > start else None,
            unjournaled=len(ram) - start,
            in_ram=len(ram),
            max_pending=self._settings.max_pending,
            last_progress=self._last_progress,
            grace=self._grace,
        )

    async def spill_due(self) -> bool:
        """Journal what is due (see the module docstring) and keep RAM within its bound.

        While the writer makes no progress, every record in RAM only is journaled at once, not just those a grace
        period old: they would each come due within it, and one append and one fsync for all of them cost the loop,
        the disk and the log one spill instead of one per record. Returns whether anything was journaled or let go.
        """
        async with self._io_lock:
            if self._closed:
                return False
            now = self._clock()
            over = len(self._ram) - self._settings.max_pending
            idle = now - self._last_progress >= self._grace
            start = self._journaled_in_ram
            end = max(len(self._ram) if idle else start, spill_over(len(self._ram), self._settings.max_pending))
            written: list[Pending] = []
            refused = False
            if end > start:
                moving = list(itertools.islice(self._ram, start, end))
                if self._journal is None:
                    try:
                        self._journal = await self._io(self._open_journal, False)
                    except (JournalError, JournalDirectoryInUseError, JournalNotWritableError, OSError) as error:
                        self._bus.publish(JournalFailed("open", type(error).__name__, str(error), len(moving)))
                if self._journal is not None:
                    written = await self._append(moving, reason="backlog" if over > 0 else "outage")
                    await self._sync(written)
                refused = len(written) < len(moving)
            let_go = (
                self._let_go(spill_over(len(self._ram), self._settings.max_pending), refused=refused) if over > 0 else 0
            )
            return bool(written) or let_go > 0

    def _let_go(self, count: int, *, refused: bool) -> int:
        """Let journaled records go from RAM, oldest first. Only when the journal refused records (a full disk) and
        RAM holds more than twice its bound is the oldest excess dropped, each record counted: a journal that is
        merely slower than the host's burst holds everything, and RAM catches up at the next round."""
        let_go = 0
        while let_go < count and self._journaled_in_ram > 0:
            item = self._ram.popleft()
            self._journaled_in_ram -= 1
            if item.receipt is not None:
                self._book.keep(item.seq, item.receipt)
            if self._oldest_on_disk_at is None:
                self._oldest_on_disk_at = item.recorded_at if item.recorded_at is not None else self._clock()
            let_go += 1
        hard_cap = self._settings.max_pending * 2
        if refused and len(self._ram) > hard_cap and self._journaled_in_ram == 0:
            victims = [self._ram.popleft() for _ in range(len(self._ram) - hard_cap)]
            self._drop(victims, "journal_unavailable", "RAM over twice PERSISTENCE_MAX_PENDING and the journal refuses")
            let_go += len(victims)
        return let_go

    async def _append(self, items: list[Pending], *, reason: str) -> list[Pending]:
        """Append ``items`` in chunks on the journal thread; returns the prefix that was written."""
        journal = self._journal
        if journal is None:
            return []
        written: list[Pending] = []
        error: BaseException | None = None
        for start in range(0, len(items), APPEND_CHUNK):
            chunk = items[start : start + APPEND_CHUNK]
            try:
                positions = await self._io(_append_chunk, journal, self._book.run_id, chunk)
            except (JournalError, OSError) as failure:
                error = failure
                # The disk may have room for part of the chunk: try record by record until one does not fit.
                for item in chunk:
                    try:
                        [position] = await self._io(_append_chunk, journal, self._book.run_id, [item])
                    except (JournalError, OSError):
                        break
                    item.journal_at = position
                    written.append(item)
                break
            for item, position in zip(chunk, positions, strict=True):
                item.journal_at = position
            written.extend(chunk)
        self._journaled_in_ram += len(written)
        self._journal_pending = journal.pending
        if written:
            self._book.tally.journaled += len(written)
            self._bus.publish(
                JournalSpilled(records=len(written), journal_pending=self._journal_pending, reason=reason)
            )
        if error is not None:
            self._bus.publish(JournalFailed("append", type(error).__name__, str(error), len(items) - len(written)))
        return written

    async def _sync(self, written: list[Pending]) -> None:
        journal = self._journal
        if journal is None or not written:
            return
        started = self._clock()
        try:
            await self._io(journal.sync)
        except (JournalError, OSError) as error:
            self._bus.publish(JournalFailed("sync", type(error).__name__, str(error), len(written)))
            return
        for item in written:
            if item.receipt is not None:
                item.receipt.mark_journaled()
            self.mark_safe(item)
        self._bus.publish(JournalSynced(records=len(written), duration=self._clock() - started))

    # ------------------------------------------------------------------ losses

    def drop(self, items: Sequence[Pending], reason: str, error: str) -> None:
        """Count, publish and settle records that are lost (each receipt ends ``dropped``)."""
        self._drop(items, reason, error)

    def _drop(self, items: Sequence[Pending], reason: str, error: str) -> None:
        by_entity: dict[Entity, int] = {}
        for item in items:
            entity = item.record.entity
            by_entity[entity] = by_entity.get(entity, 0) + 1
            receipt = self.resolve(item)
            if receipt is not None:
                receipt.mark_dropped(reason)
            self.mark_safe(item)
        self._book.tally.dropped += len(items)
        for entity, count in by_entity.items():
            self._bus.publish(RecordsDropped(entity=entity, count=count, reason=reason, error=error))
        if items:
            last = max(item.seq for item in items)
            if last > self._watermark and not self._ram:
                self._watermark = last
            self._progress.set()

    def _report_damage(self) -> None:
        """Publish journal lines lost to damage (torn, checksum) and records that no longer parse, each counted."""
        corrupt = self.journal_corrupt_lines
        if corrupt > self._reported_corrupt:
            lines = corrupt - self._reported_corrupt
            self._reported_corrupt = corrupt
            self._book.tally.dropped += lines
            self._bus.publish(JournalCorrupt(lines=lines))
            self._bus.publish(
                RecordsDropped(
                    entity="unknown", count=lines, reason="corrupt_journal", error="torn or corrupt journal line"
                )
            )
        unparsable, self._unparsable = self._unparsable, []
        for entity, error in unparsable:
            self._book.tally.dropped += 1
            self._bus.publish(RecordsDropped(entity=entity, count=1, reason="corrupt_journal", error=error))

    # ------------------------------------------------------------------ the journal thread

    async def _io(self, function: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="persistence-journal")
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(function, *args))


def spill_due_in(
    *,
    now: float,
    oldest_unjournaled: float | None,
    unjournaled: int,
    in_ram: int,
    max_pending: int,
    last_progress: float,
    grace: float,
) -> float | None:
    """The spill policy: seconds until RAM records are due for the journal (0: now), ``None`` while none is waiting.

    Due at once when RAM holds more than ``max_pending``; otherwise once the oldest unjournaled record
    (``oldest_unjournaled``, recorded at, ``None`` if unknown: now) is ``grace`` old AND the writer has made no
    progress for as long: while commits go through, records in RAM are on their way to the database.
    """
    if unjournaled <= 0:
        return None
    if in_ram > max_pending:
        return 0.0
    due_at = max(oldest_unjournaled if oldest_unjournaled is not None else now, last_progress) + grace
    return max(due_at - now, 0.0)


def spill_over(in_ram: int, max_pending: int) -> int:
    """How many of the oldest RAM records to journal and let go when RAM holds ``in_ram`` records: none within the
    bound, else down to three quarters of it, so spills come in chunks, not one by one."""
    if in_ram <= max_pending:
        return 0
    return min(in_ram - max(max_pending * 3 // 4, 0), in_ram)


def _append_chunk(journal: Journal, run_id: str, items: Sequence[Pending]) -> list[Position]:
    """On the journal thread: serialise and append records (one line each)."""
    return journal.append([_payload(run_id, item) for item in items])


def _payload(run_id: str, item: Pending) -> dict[str, Any]:
    return {
        "v": JOURNAL_FORMAT,
        "run": run_id,
        "seq": item.seq,
        "kind": KINDS[type(item.record)],
        "cid": item.correlation_id,
        "at": item.recorded_at,
        "data": item.record.to_json(),
    }


def _entity_of(payload: dict[str, Any]) -> str:
    model = MODELS.get(str(payload.get("kind")))
    return model.entity if model is not None else "unknown"
