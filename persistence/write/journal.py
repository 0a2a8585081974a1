"""Append-only spill journal on local disk for records the database could not take yet.

This module is responsible for keeping, durably and in order, the records that the background writer could
neither commit to the database nor keep in RAM, and for handing them back oldest first once the database is
reachable again, including after a clean shutdown or a ``kill -9`` of an earlier run. Records are stored one
per line as ``<crc32 in 8 hex digits> <compact JSON object>\\n`` in numbered segment files
(``segment-00000001.jsonl``, …); a small ``checkpoint.json`` written atomically records how far the records
have been committed to the database, and fully consumed segments are deleted. Corrupt lines (bad checksum,
bad JSON, not an object) are skipped and counted, and a torn last line left by a crash mid-write is treated
as never written. The journal is synchronous and not thread-safe (the caller serialises calls, possibly from
a worker thread), never logs, and reports what it finds through counters; every operating-system failure is
raised as :class:`JournalError` with the original :class:`OSError` as ``__cause__``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import re
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from persistence.errors import (
    ConfigurationError,
    JournalDirectoryInUseError,
    JournalError,
    JournalNotWritableError,
    JournalPositionError,
)

__all__ = ["Journal", "JournalEntry", "JournalOwnership", "Position", "encode_line", "write_durably"]

_SEGMENT_NAME = re.compile(r"segment-(\d{8,})\.jsonl")
_CHECKSUM = re.compile(rb"[0-9a-f]{8}")
_CHECKPOINT = "checkpoint.json"
YIELD_EVERY = 64
"""Lines read between two hand-overs of the GIL (``pause``) in a scan or a peek."""
_CHECKPOINT_TMP = "checkpoint.json.tmp"

# A position in the journal: (segment number, byte offset in that segment). Tuples compare in journal order.
Position = tuple[int, int]


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One pending record as returned by :meth:`Journal.peek`.

    Pass the last entry of a batch to :meth:`Journal.acknowledge` once the batch is committed.
    """

    record: dict[str, Any]
    """The JSON object that was appended."""
    segment: int
    """Number of the segment file holding the record."""
    end_offset: int
    """Byte offset just after this entry's line in that segment."""


class _Line(NamedTuple):
    start: int
    end: int
    record: dict[str, Any] | None  # None: the line is corrupt (or torn)
    torn: bool  # no trailing newline at the end of the newest segment: not written yet
    line: bytes = b""  # the whole line as read (checksum, JSON, newline)


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """Return the record stored in ``line`` (without its newline), or ``None`` if the line is corrupt."""
    if len(line) < 10 or line[8:9] != b" " or not _CHECKSUM.fullmatch(line[:8]):
        return None
    payload = line[9:]
    if zlib.crc32(payload) != int(line[:8], 16):
        return None
    try:
        value = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return value if isinstance(value, dict) else None


def _iter_lines(file: io.BufferedReader, start: int, newest: bool) -> Iterator[_Line]:
    """Yield the lines of an open segment from byte ``start`` on (the file must be positioned there)."""
    position = start
    while True:
        line = file.readline()
        if not line:
            return
        end = position + len(line)
        if not line.endswith(b"\n"):
            # A crash mid-write leaves a line without its newline. At the end of the newest segment it is a
            # write that never completed; anywhere else it can never complete and is corrupt.
            yield _Line(position, end, None, newest)
            return
        yield _Line(position, end, _parse_line(line[:-1]), False, line)
        position = end


def _serialize(record: object) -> bytes:
    if not isinstance(record, Mapping):
        raise TypeError(f"journal records must be mappings, not {type(record).__name__}")
    payload = json.dumps(
        record if isinstance(record, dict) else dict(record),
        separators=(",", ":"),
        ensure_ascii=False,
        sort_keys=False,
    ).encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def write_durably(path: Path, data: bytes, *, append: bool, fsync: Callable[[int], None] = os.fsync) -> None:
    """Write all of ``data`` to ``path`` (appended, or replacing its content) and fsync it before returning."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fsync(fd)
    finally:
        os.close(fd)


def encode_line(record: Mapping[str, Any]) -> bytes:
    """One record in the journal's line format (checksum, compact JSON, newline), for files kept beside it."""
    return _serialize(record)


class Journal:
    """A directory of append-only segment files plus a checkpoint of what has been committed.

    ``segment_max_bytes`` is the size after which a new segment file is started (one :meth:`append` call is
    never split across segments, so a segment exceeds it only when a single call is larger). ``fsync`` is
    called with a file descriptor for every fsync the journal does (segments, directory, checkpoint); it is
    injectable for tests. ``pause`` is called every :data:`YIELD_EVERY` lines of a scan or a peek (by default
    ``time.sleep(0)``, which hands the GIL to the other threads: the host's event loop runs beside the journal's
    thread). Opening does not create anything on disk; if the directory exists it is scanned to count the pending
    records and the corrupt lines, and a torn last line (a crashed write) is cut off. ``read_only`` opens a journal
    another process may own (``status``, the demo's summary): nothing on disk is changed, not even a torn line,
    which may be the owner's write in progress, and appending or acknowledging raises :class:`JournalError`.
    """

    def __init__(
        self,
        directory: Path,
        *,
        segment_max_bytes: int = 64 * 1024 * 1024,
        fsync: Callable[[int], None] = os.fsync,
        pause: Callable[[], None] = lambda: time.sleep(0),
        read_only: bool = False,
    ) -> None:
        if segment_max_bytes <= 0:
            raise ConfigurationError([("segment_max_bytes", "must be positive")])
        self._dir = Path(directory)
        self._segment_max_bytes = segment_max_bytes
        self._fsync = fsync
        self._pause = pause
        self._read_only = read_only
        self._closed = False
        self._corrupt_total = 0
        self._corrupt_seen: set[Position] = set()
        # Set by _load():
        self._checkpoint: Position = (0, 0)
        self._segments: list[int] = []  # every segment file known to exist, ascending
        self._highest_segment = 0
        self._pending = 0
        self._unsynced = 0
        self._reuse: tuple[int, int | None] | None = None  # newest segment to append to, torn-tail offset
        self._writer: io.FileIO | None = None
        self._write_segment = 0
        self._write_size = 0
        self._retired: list[io.FileIO] = []  # earlier segments written since the last sync, to fsync
        self._roll_required = False  # the current segment ends with a partial line that could not be removed
        self._dir_dirty = False  # a file was created in the directory since the last sync
        self._parent_dirty = False  # the directory itself was created since the last sync
        self._peeked: tuple[Position, dict[Position, int]] | None = None
        self._load()

    # ------------------------------------------------------------------ properties

    @property
    def pending(self) -> int:
        """Records appended (or found at open) and not yet acknowledged."""
        return self._pending

    @property
    def corrupt_lines(self) -> int:
        """Lines lost as corrupt, truncated or torn since open (scan at open, then reads); each counted once.

        A torn last line (a crash mid-write) counts too: the record it held is lost, whether or not anyone was
        told it was safe.
        """
        return self._corrupt_total

    @property
    def unsynced(self) -> int:
        """Records appended since the last successful :meth:`sync` (and not yet acknowledged)."""
        return self._unsynced

    # ------------------------------------------------------------------ public operations

    def append(self, records: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
        """Append ``records`` at the end of the journal, in order, without fsync; return each one's position.

        A position is ``(segment, end_offset)``, as in :class:`JournalEntry`, for :meth:`acknowledge_through`.

        All records are serialised before anything is written, so a record json cannot encode raises its
        ``TypeError``/``ValueError`` with nothing written. On an operating-system failure
        :class:`JournalError` is raised, none of these records count as pending and the partial write is
        removed (if that fails too, the next append starts a new segment so the partial line can never glue
        onto a record).
        """
        self._check_writable()
        lines = [_serialize(record) for record in records]
        blob = b"".join(lines)
        if not blob:
            return []
        writer = self._prepare_writer(len(blob))
        start = self._write_size
        try:
            self._check_linked(writer)
            view = memoryview(blob)
            written = 0
            while written < len(blob):
                count = writer.write(view[written:])
                if not count:
                    raise OSError(errno.EIO, "short write to journal segment")
                written += count
        except FileNotFoundError as exc:
            raise self._vanished(exc) from exc
        except OSError as exc:
            try:
                writer.truncate(start)
            except OSError:
                self._roll_required = True
            raise JournalError("cannot append to journal segment", self._segment_path()) from exc
        self._write_size = start + len(blob)
        self._pending += len(records)
        self._unsynced += len(records)
        positions: list[tuple[int, int]] = []
        end = start
        for line in lines:
            end += len(line)
            positions.append((self._write_segment, end))
        return positions

    def sync(self) -> None:
        """Make every appended record durable: fsync the segments written and, after a file was created, the
        directory.

        Raises :class:`JournalError` on failure; :attr:`unsynced` is then left as it was. After a failed
        fsync the kernel may have dropped the unwritten pages, so a later successful sync does not prove
        that the records appended before the failure reached the disk.
        """
        self._check_open()
        try:
            while self._retired:
                self._fsync(self._retired[0].fileno())
                self._retired.pop(0).close()
            if self._writer is not None:
                self._check_linked(self._writer)
                self._fsync(self._writer.fileno())
            if self._parent_dirty:
                self._fsync_directory(self._dir.parent)
                self._parent_dirty = False
            if self._dir_dirty:
                self._fsync_directory(self._dir)
                self._dir_dirty = False
        except FileNotFoundError as exc:
            raise self._vanished(exc) from exc
        except OSError as exc:
            raise JournalError("cannot sync journal", self._dir) from exc
        self._unsynced = 0

    def peek(self, max_records: int) -> list[JournalEntry]:
        """Return the oldest up to ``max_records`` pending entries in append order without consuming them.

        Only the lines needed are read. Corrupt lines are skipped and counted in :attr:`corrupt_lines`.
        """
        self._check_open()
        entries: list[JournalEntry] = []
        if max_records > 0:
            for line, segment in self._lines_from_checkpoint():
                if line.record is not None:
                    entries.append(JournalEntry(line.record, segment, line.end))
                    if len(entries) >= max_records:
                        break
        self._peeked = (
            self._checkpoint,
            {(entry.segment, entry.end_offset): index for index, entry in enumerate(entries, start=1)},
        )
        return entries

    def peek_payloads(self, max_records: int) -> list[tuple[bytes, int, int]]:
        """:meth:`peek`, each entry as ``(payload, segment, end_offset)``: the record's JSON text, not decoded.

        The lines are checked as for :meth:`peek` (checksum, a JSON object), but what is returned holds no object
        the garbage collector tracks: a reader that decodes the records a few at a time, just before it uses them,
        never keeps a whole batch of decoded records alive (they would be promoted to the collector's oldest
        generation and make its full passes come sooner).
        """
        self._check_open()
        entries: list[tuple[bytes, int, int]] = []
        if max_records > 0:
            for line, segment in self._lines_from_checkpoint():
                if line.record is not None:
                    entries.append((line.line[9:-1], segment, line.end))
                    if len(entries) >= max_records:
                        break
        self._peeked = (
            self._checkpoint,
            {(segment, end): index for index, (_, segment, end) in enumerate(entries, start=1)},
        )
        return entries

    def acknowledge_through(self, position: tuple[int, int]) -> None:
        """:meth:`acknowledge` by position, as returned by :meth:`append`."""
        self.acknowledge(JournalEntry({}, position[0], position[1]))

    def acknowledge(self, entry: JournalEntry) -> None:
        """Record that every entry up to and including ``entry`` is committed to the database.

        The checkpoint is advanced durably (temporary file, fsync, atomic rename) before anything else, then
        fully consumed segment files are deleted (a deletion that fails is retried on the next acknowledge;
        such files are ignored when the journal is opened). If the checkpoint cannot be written (a full disk), the
        journal still moves on in memory and deletes what is consumed, then raises :class:`JournalError`: after a
        restart those records are replayed once more. Acknowledging an entry that is already
        acknowledged does nothing; an entry that is not a position of this journal raises :class:`JournalPositionError`.
        """
        self._check_writable()
        target: Position = (entry.segment, entry.end_offset)
        if target <= self._checkpoint:
            return
        count = self._count_through(target)
        new_checkpoint = target
        if entry.end_offset >= self._segment_size(entry.segment):
            new_checkpoint = (entry.segment + 1, 0)  # the whole segment is consumed
        failure: OSError | None = None
        try:
            self._write_checkpoint(new_checkpoint)
        except FileNotFoundError as exc:
            raise self._vanished(exc) from exc
        except OSError as exc:
            # A full disk, say. The records are committed all the same: move on in memory (a restart replays them
            # again, which is idempotent) and free the consumed segments, which makes room.
            failure = exc
        self._checkpoint = new_checkpoint
        self._pending = max(self._pending - count, 0)
        self._unsynced = min(self._unsynced, self._pending)  # the unsynced records are the newest ones
        self._peeked = None
        self._corrupt_seen = {position for position in self._corrupt_seen if position >= new_checkpoint}
        if self._writer is not None and self._write_segment < new_checkpoint[0]:
            self._writer.close()  # consumed: the next append starts a new segment
            self._writer = None
        if self._reuse is not None and self._reuse[0] < new_checkpoint[0]:
            self._reuse = None
        self._delete_consumed_segments()
        if failure is not None:
            raise JournalError("cannot write journal checkpoint", self._dir / _CHECKPOINT) from failure

    def close(self) -> None:
        """Sync and close the file handles. Idempotent; any later use raises :class:`JournalError`."""
        if self._closed:
            return
        try:
            self.sync()
        finally:
            self._close_files()
            self._closed = True

    # ------------------------------------------------------------------ loading

    def _load(self) -> None:
        """(Re)build the in-memory state from what is on disk."""
        self._close_files()
        self._checkpoint = (0, 0)
        self._segments = []
        self._pending = 0
        self._unsynced = 0
        self._reuse = None
        self._roll_required = False
        self._peeked = None
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            names = []
        except OSError as exc:
            raise JournalError("cannot list journal directory", self._dir) from exc
        self._segments = sorted(
            int(match.group(1)) for match in map(_SEGMENT_NAME.fullmatch, names) if match is not None
        )
        self._highest_segment = max([self._highest_segment, *self._segments])
        self._corrupt_seen = {position for position in self._corrupt_seen if position[0] in self._segments}
        if _CHECKPOINT in names:
            self._checkpoint = self._read_checkpoint()
        torn_at: int | None = None
        try:
            for line, _segment in self._lines_from_checkpoint(scanning=True):
                if line.torn:
                    torn_at = line.start
                    self._note_corrupt((_segment, line.start))
                elif line.record is not None:
                    self._pending += 1
        except FileNotFoundError as exc:
            raise JournalError("journal segment vanished while opening", self._dir) from exc
        newest = self._segments[-1] if self._segments else -1
        if torn_at is not None and not self._read_only:
            # Cut the torn write off now, so that it is counted once, not at every open until the next append.
            with contextlib.suppress(OSError):
                os.truncate(self._segment_path(newest), torn_at)
                torn_at = None
        if newest > self._checkpoint[0] or (
            # A power loss can leave the checkpoint's segment shorter than the (fsynced) checkpoint offset;
            # appending to it would put new records below the checkpoint, where they count as consumed.
            newest == self._checkpoint[0] and self._segment_size(newest) >= self._checkpoint[1]
        ):
            self._reuse = (newest, torn_at)

    def _read_checkpoint(self) -> Position:
        path = self._dir / _CHECKPOINT
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return (0, 0)
        except OSError as exc:
            raise JournalError("cannot read journal checkpoint", path) from exc
        try:
            value = json.loads(raw)
            segment, offset = value["segment"], value["offset"]
        except (ValueError, TypeError, KeyError):
            segment = offset = None
        if type(segment) is int and type(offset) is int and segment >= 0 and offset >= 0:
            return (segment, offset)
        # Never written by us (the checkpoint is replaced atomically). Replaying everything is safe because
        # the database side is idempotent; skipping records would not be.
        return (0, 0)

    # ------------------------------------------------------------------ reading

    def _lines_from_checkpoint(self, *, scanning: bool = False) -> Iterator[tuple[_Line, int]]:
        """Yield ``(line, segment)`` for every line after the checkpoint, counting corrupt ones.

        Files are opened lazily and closed as soon as the consumer stops. A vanished segment raises
        :class:`JournalError` after reloading the state from disk (unless ``scanning``, i.e. loading).
        """
        first_segment, first_offset = self._checkpoint
        newest = self._segments[-1] if self._segments else None
        for segment in [number for number in self._segments if number >= first_segment]:
            start = first_offset if segment == first_segment else 0
            path = self._segment_path(segment)
            try:
                with open(path, "rb") as file:
                    file.seek(start)
                    for count, line in enumerate(_iter_lines(file, start, segment == newest), start=1):
                        if line.record is None and not line.torn:
                            self._note_corrupt((segment, line.start))
                        if count % YIELD_EVERY == 0:
                            # The journal runs on a thread beside the host's event loop: long scans hand the GIL over
                            # now and then, or the loop waits for it for hundreds of milliseconds.
                            self._pause()
                        yield line, segment
            except FileNotFoundError as exc:
                if scanning:
                    raise
                raise self._vanished(exc) from exc
            except OSError as exc:
                raise JournalError("cannot read journal segment", path) from exc

    def _count_through(self, target: Position) -> int:
        """Number of valid records after the checkpoint up to and including the line ending at ``target``."""
        if self._peeked is not None and self._peeked[0] == self._checkpoint and target in self._peeked[1]:
            return self._peeked[1][target]
        count = 0
        for line, segment in self._lines_from_checkpoint():
            position = (segment, line.end)
            if position > target or line.torn:
                break
            if line.record is not None:
                count += 1
            if position == target:
                return count
        raise JournalPositionError(self._dir, target[0], target[1])

    def _note_corrupt(self, position: Position) -> None:
        if position not in self._corrupt_seen:
            self._corrupt_seen.add(position)
            self._corrupt_total += 1

    # ------------------------------------------------------------------ writing

    def _prepare_writer(self, needed: int) -> io.FileIO:
        """Return the segment to append ``needed`` bytes to, reusing, truncating or rolling as required."""
        if self._writer is None and self._reuse is not None and not self._roll_required:
            segment, torn_at = self._reuse
            self._reuse = None
            path = self._segment_path(segment)
            try:
                writer = open(  # noqa: SIM115 - kept open across calls
                    path, "ab", buffering=0, opener=lambda name, flags: os.open(name, flags & ~os.O_CREAT)
                )
            except FileNotFoundError as exc:
                raise self._vanished(exc) from exc
            except OSError as exc:
                raise JournalError("cannot open journal segment", path) from exc
            try:
                if torn_at is not None:
                    writer.truncate(torn_at)  # drop the torn tail of a crashed write
                self._write_size = os.fstat(writer.fileno()).st_size
            except OSError:
                writer.close()  # leave the file alone; a new segment is started below
            else:
                self._writer, self._write_segment = writer, segment
        self._reuse = None
        full = self._write_size > 0 and self._write_size + needed > self._segment_max_bytes
        if self._writer is not None and (self._roll_required or full):
            self._retired.append(self._writer)
            self._writer = None
        self._roll_required = False
        if self._writer is None:
            self._create_segment()
        assert self._writer is not None
        return self._writer

    def _create_segment(self) -> None:
        segment = max(self._highest_segment + 1, self._checkpoint[0], 1)
        path = self._segment_path(segment)
        try:
            if not self._dir.is_dir():
                self._dir.mkdir(parents=True, exist_ok=True)
                self._parent_dirty = True
            writer = open(  # noqa: SIM115 - kept open across calls
                path, "ab", buffering=0, opener=lambda name, flags: os.open(name, flags | os.O_EXCL, 0o644)
            )
        except OSError as exc:
            raise JournalError("cannot create journal segment", path) from exc
        self._highest_segment = segment
        self._segments.append(segment)
        self._dir_dirty = True
        self._writer, self._write_segment, self._write_size = writer, segment, 0

    def _check_linked(self, file: io.FileIO) -> None:
        """Raise ``FileNotFoundError`` if ``file`` was deleted (e.g. the directory was removed)."""
        if os.fstat(file.fileno()).st_nlink == 0:
            raise FileNotFoundError(errno.ENOENT, "journal segment was deleted", str(self._segment_path()))

    def _vanished(self, exc: FileNotFoundError) -> JournalError:
        """Files were removed behind the journal's back: resynchronise with the disk and report it."""
        self._load()
        return JournalError("journal files vanished; pending records were lost", self._dir)

    def _fsync_directory(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    def _write_checkpoint(self, position: Position) -> None:
        data = json.dumps({"segment": position[0], "offset": position[1]}).encode("ascii")
        tmp = self._dir / _CHECKPOINT_TMP
        write_durably(tmp, data, append=False, fsync=self._fsync)
        os.replace(tmp, self._dir / _CHECKPOINT)
        self._fsync_directory(self._dir)

    def _delete_consumed_segments(self) -> None:
        keep: list[int] = []
        for segment in self._segments:
            if segment < self._checkpoint[0]:
                try:
                    self._segment_path(segment).unlink(missing_ok=True)
                    continue
                except OSError:
                    pass  # harmless: ignored at open, retried on the next acknowledge
            keep.append(segment)
        self._segments = keep

    # ------------------------------------------------------------------ helpers

    def _segment_size(self, segment: int) -> int:
        if self._writer is not None and segment == self._write_segment:
            return self._write_size
        try:
            return self._segment_path(segment).stat().st_size
        except OSError as exc:
            raise JournalError("cannot stat journal segment", self._segment_path(segment)) from exc

    def _segment_path(self, segment: int | None = None) -> Path:
        return self._dir / f"segment-{self._write_segment if segment is None else segment:08d}.jsonl"

    def _check_open(self) -> None:
        if self._closed:
            raise JournalError("journal is closed", self._dir)

    def _check_writable(self) -> None:
        self._check_open()
        if self._read_only:
            raise JournalError("journal was opened read-only", self._dir)

    def _close_files(self) -> None:
        for file in [*self._retired, *([self._writer] if self._writer is not None else [])]:
            with contextlib.suppress(OSError):
                file.close()
        self._retired = []
        self._writer = None


LOCK_FILE = "owner.lock"
"""The journal directory's lock file: ``flock``-ed exclusively by its owner, holding the owner's pid and instance."""
PROBE_FILE = ".write-probe"


class JournalOwnership:
    """A journal directory has one owner: an exclusive, non-blocking ``flock`` on :data:`LOCK_FILE` inside it.

    The directory is resolved first, so two spellings of one directory (a symlink, a relative path) are one owner.
    ``flock`` locks belong to the open file, so two owners in one process exclude each other as two processes do,
    and the kernel drops the lock when the process ends however it ends: a ``kill -9`` leaves no stale owner. The
    lock file is never deleted (deleting it would let two processes lock two different files).
    """

    def __init__(self, directory: Path, instance_id: str, *, fsync: Callable[[int], None] = os.fsync) -> None:
        self.directory = Path(directory)
        self.instance_id = instance_id
        self._fsync = fsync
        self._descriptor: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object owns the directory."""
        return self._descriptor is not None

    def acquire(self) -> None:
        """Create the directory if needed and take it without waiting.

        :class:`JournalDirectoryInUseError` (naming the holder) when another owner has it,
        :class:`JournalNotWritableError` when the directory or its lock file cannot be created or written.
        """
        if self._descriptor is not None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.directory = self.directory.resolve(strict=True)
            descriptor = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise JournalNotWritableError(self.directory, _reason(exc)) from exc
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise JournalDirectoryInUseError(self.directory, *holder) from None
        except BaseException:
            os.close(descriptor)
            raise
        try:
            data = json.dumps({"pid": os.getpid(), "instance_id": self.instance_id}).encode() + b"\n"
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, data, 0)
        except OSError as exc:
            os.close(descriptor)  # closing the file lets the lock go
            raise JournalNotWritableError(self.directory, _reason(exc)) from exc
        self._descriptor = descriptor

    def probe(self) -> None:
        """Prove the directory writable: create, fsync and remove a probe file; :class:`JournalNotWritableError`."""
        path = self.directory / PROBE_FILE
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(descriptor, b"probe\n")
                self._fsync(descriptor)
            finally:
                os.close(descriptor)
            os.unlink(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            raise JournalNotWritableError(self.directory, _reason(exc)) from exc

    def release(self) -> None:
        """Give the directory up (idempotent)."""
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(descriptor, fcntl.LOCK_UN)
            os.close(descriptor)


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _read_holder(descriptor: int) -> tuple[int | None, str | None]:
    """The pid and instance id the owner wrote into the lock file (``None`` each when unreadable)."""
    try:
        value = json.loads(os.pread(descriptor, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(value, dict):
        return None, None
    pid, instance = value.get("pid"), value.get("instance_id")
    return (pid if isinstance(pid, int) else None), (instance if isinstance(instance, str) else None)
