"""Tests of the on-disk spill journal, on real files (the only test double is an fsync recorder)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from persistence.app.cli.main import journal_depth
from persistence.errors import JournalDirectoryInUseError, JournalError, JournalNotWritableError
from persistence.write.journal import LOCK_FILE, Journal, JournalEntry, JournalOwnership
from tests.support.databases import examples
from tests.support.filesystems import read_only_file_system

REPO_ROOT = Path(__file__).resolve().parents[1]


def rec(i: int) -> dict[str, Any]:
    return {"seq": i, "text": f"record {i} é €", "price": "101.25"}


def read_all(journal: Journal) -> list[dict[str, Any]]:
    return [entry.record for entry in journal.peek(journal.pending + 1000)]


def segment_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("segment-"))


def line_bytes(payload: str, checksum: int | None = None) -> bytes:
    raw = payload.encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(raw) if checksum is None else checksum, raw)


def drain(journal: Journal, batch: int) -> list[dict[str, Any]]:
    """Peek and acknowledge batch by batch until nothing is pending; return what was read."""
    seen: list[dict[str, Any]] = []
    while entries := journal.peek(batch):
        seen.extend(entry.record for entry in entries)
        journal.acknowledge(entries[-1])
    return seen


class FsyncRecorder:
    """Injected fsync: records what kind of file each descriptor is, then really fsyncs it."""

    def __init__(self, fail_with: OSError | None = None) -> None:
        self.calls: list[os.stat_result] = []
        self.fail_with = fail_with

    def __call__(self, fd: int) -> None:
        self.calls.append(os.fstat(fd))
        if self.fail_with is not None:
            raise self.fail_with
        os.fsync(fd)

    def synced_inodes(self) -> set[int]:
        return {result.st_ino for result in self.calls}

    def synced_directory(self) -> bool:
        return any(stat.S_ISDIR(result.st_mode) for result in self.calls)


# --------------------------------------------------------------------------- opening and format


def test_opening_a_missing_directory_creates_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "spool" / "journal"
    journal = Journal(directory)
    assert (journal.pending, journal.corrupt_lines, journal.unsynced) == (0, 0, 0)
    assert journal.peek(10) == []
    journal.sync()
    journal.close()
    assert not (tmp_path / "spool").exists()


def test_empty_append_creates_nothing(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.append([])
    assert not (tmp_path / "j").exists()
    assert journal.pending == 0


def test_first_append_creates_directory_and_writes_one_checksummed_compact_json_line_per_record(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "spool" / "journal"
    journal = Journal(directory)
    journal.append([{"z": 1, "a": "é\n\u2028", "n": None}, {"k": [1, 2.5]}])
    assert os.listdir(directory) == ["segment-00000001.jsonl"]
    content = (directory / "segment-00000001.jsonl").read_bytes()
    assert content == line_bytes('{"z":1,"a":"é\\n\u2028","n":null}') + line_bytes('{"k":[1,2.5]}')
    journal.close()


def test_records_that_are_mappings_but_not_dicts_are_accepted(tmp_path: Path) -> None:
    from types import MappingProxyType

    journal = Journal(tmp_path / "j")
    journal.append([MappingProxyType({"seq": 1})])
    assert read_all(journal) == [{"seq": 1}]


# --------------------------------------------------------------------------- append / peek / acknowledge


def test_round_trip_in_order_across_several_segments(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory, segment_max_bytes=300)
    expected = [rec(i) for i in range(60)]
    for start in range(0, 60, 3):
        journal.append(expected[start : start + 3])
    files = segment_files(directory)
    assert len(files) >= 5
    # No segment is started past the limit: each holds only what fitted (a batch is never split).
    assert all((directory / name).stat().st_size <= 300 for name in files)
    assert journal.pending == 60

    assert drain(journal, batch=7) == expected
    assert journal.pending == 0
    assert journal.peek(10) == []


def test_entries_name_their_segment_and_the_offset_after_their_line(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory, segment_max_bytes=100)
    journal.append([rec(0), rec(1)])
    journal.append([rec(2)])  # does not fit in segment 1 any more
    entries = journal.peek(10)
    first_line = line_bytes(json.dumps(rec(0), separators=(",", ":"), ensure_ascii=False))
    assert [(entry.segment, entry.end_offset) for entry in entries] == [
        (1, len(first_line)),
        (1, (directory / "segment-00000001.jsonl").stat().st_size),
        (2, (directory / "segment-00000002.jsonl").stat().st_size),
    ]


def test_peek_payloads_are_the_checked_lines_undecoded_and_hold_nothing_the_collector_tracks(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory, segment_max_bytes=200)
    journal.append([rec(0), rec(1)])
    with open(directory / "segment-00000001.jsonl", "ab") as file:
        file.write(line_bytes('{"seq": 99}', checksum=0))  # a corrupt line: skipped and counted, as by peek
        file.write(line_bytes("[1, 2]"))  # a checksummed line that is not an object: skipped too
    journal = Journal(directory, segment_max_bytes=200)
    journal.append([rec(i) for i in range(2, 8)])
    payloads = journal.peek_payloads(5)
    entries = journal.peek(5)
    assert [json.loads(text) for text, _, _ in payloads] == [entry.record for entry in entries]
    assert [(segment, end) for _, segment, end in payloads] == [(e.segment, e.end_offset) for e in entries]
    assert journal.corrupt_lines == 2
    # Bytes and integers only: a batch waiting for its commit adds nothing to the collector's generations.
    assert all(type(text) is bytes and type(segment) is int and type(end) is int for text, segment, end in payloads)
    journal.peek_payloads(3)
    journal.acknowledge_through(payloads[2][1:])
    assert journal.pending == 5
    assert [json.loads(text) for text, _, _ in journal.peek_payloads(10)] == [rec(i) for i in range(3, 8)]


def test_peek_is_non_consuming(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", segment_max_bytes=200)
    journal.append([rec(i) for i in range(20)])
    first = journal.peek(5)
    second = journal.peek(5)
    assert first == second
    assert [entry.record for entry in first] == [rec(i) for i in range(5)]
    assert journal.pending == 20
    journal.close()
    assert read_all(Journal(tmp_path / "j")) == [rec(i) for i in range(20)]


def test_peek_sees_records_appended_before_any_sync(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.append([rec(0)])
    assert journal.unsynced == 1
    assert read_all(journal) == [rec(0)]
    journal.append([rec(1)])
    assert read_all(journal) == [rec(0), rec(1)]


def test_acknowledge_deletes_consumed_segments_and_persists_across_reopen(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory, segment_max_bytes=250)
    for start in range(0, 40, 2):
        journal.append([rec(start), rec(start + 1)])
    before = segment_files(directory)
    assert len(before) >= 4

    entries = journal.peek(17)
    target = entries[-1]
    journal.acknowledge(target)
    assert journal.pending == 40 - 17
    remaining_files = segment_files(directory)
    assert remaining_files == [name for name in before if int(name[8:16]) >= target.segment]
    checkpoint = json.loads((directory / "checkpoint.json").read_text())
    assert checkpoint == {"segment": target.segment, "offset": target.end_offset}
    assert not (directory / "checkpoint.json.tmp").exists()
    journal.close()

    reopened = Journal(directory, segment_max_bytes=250)
    assert reopened.pending == 23
    assert read_all(reopened) == [rec(i) for i in range(17, 40)]


def test_acknowledging_a_segment_to_its_end_deletes_it(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory, segment_max_bytes=100)
    journal.append([rec(0), rec(1)])
    journal.append([rec(2), rec(3)])
    assert segment_files(directory) == ["segment-00000001.jsonl", "segment-00000002.jsonl"]
    journal.acknowledge(journal.peek(2)[-1])
    assert segment_files(directory) == ["segment-00000002.jsonl"]
    assert read_all(journal) == [rec(2), rec(3)]


def test_acknowledging_everything_leaves_only_the_checkpoint_and_appending_continues(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory, segment_max_bytes=200)
    journal.append([rec(i) for i in range(10)])
    journal.append([rec(i) for i in range(10, 12)])
    assert drain(journal, batch=4) == [rec(i) for i in range(12)]
    assert os.listdir(directory) == ["checkpoint.json"]
    assert journal.pending == 0

    journal.append([rec(100)])
    journal.close()
    reopened = Journal(directory)
    assert reopened.pending == 1
    assert read_all(reopened) == [rec(100)]


def test_acknowledging_an_already_acknowledged_entry_is_a_no_op(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.append([rec(i) for i in range(6)])
    first = journal.peek(3)
    journal.acknowledge(first[-1])
    second = journal.peek(2)
    journal.acknowledge(second[-1])
    journal.acknowledge(first[-1])
    journal.acknowledge(first[0])
    assert journal.pending == 1
    assert read_all(journal) == [rec(5)]


def test_acknowledge_accepts_an_entry_from_an_older_peek(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", segment_max_bytes=120)
    journal.append([rec(i) for i in range(9)])
    entries = journal.peek(9)
    journal.acknowledge(entries[2])
    journal.acknowledge(entries[6])  # not from the latest peek: counted by re-reading
    assert journal.pending == 2
    assert read_all(journal) == [rec(7), rec(8)]


def test_acknowledge_of_a_position_that_is_not_an_entry_raises_value_error(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.append([rec(0), rec(1)])
    entry = journal.peek(1)[0]
    with pytest.raises(ValueError, match="no entry"):
        journal.acknowledge(JournalEntry(entry.record, entry.segment, entry.end_offset - 3))
    with pytest.raises(ValueError, match="no entry"):
        journal.acknowledge(JournalEntry(entry.record, 7, 10))
    assert journal.pending == 2
    assert not (tmp_path / "j" / "checkpoint.json").exists()


# --------------------------------------------------------------------------- crash recovery


def test_reopen_after_crash_without_close_returns_everything(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory, segment_max_bytes=200)
    journal.append([rec(i) for i in range(5)])
    journal.sync()
    journal.append([rec(i) for i in range(5, 8)])  # never synced: still visible to an in-process re-open
    journal.acknowledge(journal.peek(2)[-1])
    del journal  # dropped without close()

    reopened = Journal(directory, segment_max_bytes=200)
    assert reopened.pending == 6
    assert reopened.corrupt_lines == 0
    assert read_all(reopened) == [rec(i) for i in range(2, 8)]
    reopened.append([rec(8)])
    assert read_all(reopened) == [rec(i) for i in range(2, 9)]


def test_status_reads_a_journal_another_process_is_writing_without_cutting_its_line_in_progress(tmp_path: Path) -> None:
    """The owner's write in progress looks like a torn last line to a reader. ``status`` (and the demo's summary)
    open the journal read-only: they count, change nothing on disk, and cannot append or acknowledge."""
    directory = tmp_path / "j"
    owner = Journal(directory)
    owner.append([rec(i) for i in range(3)])
    owner.sync()
    segment = directory / "segment-00000001.jsonl"
    whole = line_bytes(json.dumps(rec(3)))
    with segment.open("ab") as file:
        file.write(whole[:20])  # the owner is halfway through writing its fourth record
    size = segment.stat().st_size
    assert journal_depth(directory) == 3
    reader = Journal(directory, read_only=True)
    assert reader.pending == 3 and segment.stat().st_size == size
    with pytest.raises(JournalError, match="read-only"):
        reader.append([rec(9)])
    with pytest.raises(JournalError, match="read-only"):
        reader.acknowledge(reader.peek(1)[0])
    reader.close()
    assert segment.stat().st_size == size  # the reader left the owner's line alone
    with segment.open("ab") as file:
        file.write(whole[20:])  # the owner finishes its write
    owner.close()
    assert read_all(Journal(directory)) == [rec(i) for i in range(4)]


@pytest.mark.parametrize("how", ["cut-last-line", "partial-extra-line"])
def test_torn_final_line_is_counted_at_open_and_appends_after_it_read_back(tmp_path: Path, how: str) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory)
    journal.append([rec(i) for i in range(4)])
    journal.close()
    segment = directory / "segment-00000001.jsonl"
    if how == "cut-last-line":
        os.truncate(segment, segment.stat().st_size - 7)  # kill -9 halfway through writing record 3
        survivors = [rec(i) for i in range(3)]
    else:
        with segment.open("ab") as file:  # kill -9 halfway through writing a fifth record
            file.write(line_bytes(json.dumps(rec(99)))[:20])
        survivors = [rec(i) for i in range(4)]

    reopened = Journal(directory)
    assert reopened.pending == len(survivors)
    assert reopened.corrupt_lines == 1  # the torn record is lost: counted, so the sidecar can report it
    assert read_all(reopened) == survivors

    reopened.append([rec(10), rec(11)])
    reopened.append([rec(12)])
    assert read_all(reopened) == [*survivors, rec(10), rec(11), rec(12)]
    assert reopened.corrupt_lines == 1
    reopened.close()

    again = Journal(directory)
    assert read_all(again) == [*survivors, rec(10), rec(11), rec(12)]
    assert again.corrupt_lines == 0
    # Every line on disk is whole: the torn bytes did not glue onto the next record.
    for name in segment_files(directory):
        assert all(line.endswith(b"\n") for line in (directory / name).read_bytes().splitlines(keepends=True))


def test_truncated_line_at_the_end_of_an_older_segment_is_corrupt(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory, segment_max_bytes=100)
    journal.append([rec(0), rec(1)])
    journal.append([rec(2)])
    journal.close()
    first = directory / "segment-00000001.jsonl"
    os.truncate(first, first.stat().st_size - 1)  # record 1 lost its newline

    reopened = Journal(directory, segment_max_bytes=100)
    assert reopened.corrupt_lines == 1
    assert reopened.pending == 2
    assert read_all(reopened) == [rec(0), rec(2)]


def test_kill_9_of_a_writing_process_keeps_every_synced_record_in_order(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    child = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        from pathlib import Path
        from persistence.write.journal import Journal

        journal = Journal(Path(sys.argv[2]), segment_max_bytes=4096)
        seq = 0
        for _ in range(40):
            journal.append([{"seq": seq + k, "pad": "x" * 30} for k in range(10)])
            seq += 10
            journal.sync()
        print(seq, flush=True)
        while True:  # keep appending (unsynced) until killed
            journal.append([{"seq": seq, "pad": "y" * 30}])
            seq += 1
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", child, str(REPO_ROOT), str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else b""
        synced = int(line)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()

    journal = Journal(directory, segment_max_bytes=4096)
    seqs = [record["seq"] for record in read_all(journal)]
    assert synced == 400
    assert len(seqs) >= synced
    assert seqs == list(range(len(seqs)))
    assert journal.pending == len(seqs)
    assert journal.corrupt_lines == 0


# --------------------------------------------------------------------------- corruption


def _rewrite_line(segment: Path, index: int, transform: Callable[[bytes], bytes]) -> None:
    lines = segment.read_bytes().splitlines(keepends=True)
    lines[index] = transform(lines[index])
    segment.write_bytes(b"".join(lines))


def test_corrupt_line_in_the_middle_is_skipped_and_counted_and_neighbours_survive(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory)
    journal.append([rec(i) for i in range(5)])
    journal.close()

    def flip(line: bytes) -> bytes:
        position = line.index(b'"seq"') + 2
        return line[:position] + bytes([line[position] ^ 0x01]) + line[position + 1 :]

    _rewrite_line(directory / "segment-00000001.jsonl", 2, flip)

    reopened = Journal(directory)
    assert reopened.corrupt_lines == 1
    assert reopened.pending == 4
    assert read_all(reopened) == [rec(0), rec(1), rec(3), rec(4)]
    assert read_all(reopened) == [rec(0), rec(1), rec(3), rec(4)]
    assert reopened.corrupt_lines == 1  # the same line read again is not counted twice
    assert drain(reopened, batch=2) == [rec(0), rec(1), rec(3), rec(4)]
    assert reopened.pending == 0


def test_garbage_bytes_in_the_middle_are_skipped(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory)
    journal.append([rec(0), rec(1)])
    journal.close()
    _rewrite_line(directory / "segment-00000001.jsonl", 1, lambda line: b"\x00\xff garbage\n" + line)
    reopened = Journal(directory)
    assert reopened.corrupt_lines == 1
    assert read_all(reopened) == [rec(0), rec(1)]


def test_line_with_valid_json_but_wrong_checksum_is_rejected(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory)
    journal.append([rec(0), rec(1)])
    journal.close()
    payload = json.dumps(rec(50), separators=(",", ":"), ensure_ascii=False)
    wrong = zlib.crc32(payload.encode()) ^ 0x5A5A
    _rewrite_line(directory / "segment-00000001.jsonl", 1, lambda line: line_bytes(payload, wrong) + line)

    reopened = Journal(directory)
    assert reopened.corrupt_lines == 1
    assert reopened.pending == 2
    assert read_all(reopened) == [rec(0), rec(1)]


@pytest.mark.parametrize("payload", ["[1,2,3]", '"text"', "not json", '{"unterminated":'])
def test_checksummed_line_that_is_not_a_json_object_is_rejected(tmp_path: Path, payload: str) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory)
    journal.append([rec(0), rec(1)])
    journal.close()
    _rewrite_line(directory / "segment-00000001.jsonl", 1, lambda line: line_bytes(payload) + line)

    reopened = Journal(directory)
    assert reopened.corrupt_lines == 1
    assert read_all(reopened) == [rec(0), rec(1)]


def test_unreadable_checkpoint_replays_everything_rather_than_skipping(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory)
    journal.append([rec(0), rec(1), rec(2)])
    journal.acknowledge(journal.peek(2)[-1])
    journal.close()
    (directory / "checkpoint.json").write_text("{garbage")
    assert read_all(Journal(directory)) == [rec(0), rec(1), rec(2)]


# --------------------------------------------------------------------------- sync and durability


def test_sync_calls_the_injected_fsync_on_the_segment_and_the_new_directory_entry(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    fsync = FsyncRecorder()
    journal = Journal(directory, fsync=fsync)
    journal.append([rec(0), rec(1), rec(2)])
    assert fsync.calls == []  # append never fsyncs
    assert journal.unsynced == 3

    journal.sync()
    synced = fsync.synced_inodes()
    assert (directory / "segment-00000001.jsonl").stat().st_ino in synced
    assert directory.stat().st_ino in synced  # the new segment's directory entry
    assert tmp_path.stat().st_ino in synced  # the new directory's own entry
    assert journal.unsynced == 0

    fsync.calls.clear()
    journal.append([rec(3)])
    journal.sync()
    assert not fsync.synced_directory()  # no new file: only the segment needs syncing


def test_sync_covers_segments_rolled_over_since_the_last_sync(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    fsync = FsyncRecorder()
    journal = Journal(directory, segment_max_bytes=100, fsync=fsync)
    for i in range(6):
        journal.append([rec(i)])
    journal.sync()
    synced = fsync.synced_inodes()
    assert len(segment_files(directory)) >= 3
    assert all((directory / name).stat().st_ino in synced for name in segment_files(directory))


def test_acknowledge_fsyncs_the_checkpoint_before_replacing_it(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    fsync = FsyncRecorder()
    journal = Journal(directory, fsync=fsync)
    journal.append([rec(0), rec(1)])
    journal.sync()
    fsync.calls.clear()
    journal.acknowledge(journal.peek(1)[0])
    checkpoint_inode = (directory / "checkpoint.json").stat().st_ino  # the renamed temporary file
    assert checkpoint_inode in fsync.synced_inodes()
    assert fsync.synced_directory()


def test_failing_fsync_raises_journal_error_and_keeps_records_unsynced(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    fsync = FsyncRecorder(fail_with=OSError(errno.EIO, "I/O error"))
    journal = Journal(directory, fsync=fsync)
    journal.append([rec(0)])
    with pytest.raises(JournalError) as caught:
        journal.sync()
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.EIO
    assert caught.value.path == directory
    assert journal.unsynced == 1
    assert journal.pending == 1

    fsync.fail_with = None
    journal.sync()
    assert journal.unsynced == 0


def test_unsynced_counts_records_since_the_last_sync_and_drops_acknowledged_ones(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.append([rec(0), rec(1)])
    journal.sync()
    journal.append([rec(2), rec(3), rec(4)])
    assert journal.unsynced == 3
    journal.acknowledge(journal.peek(4)[-1])
    assert journal.unsynced == 1


def test_close_is_idempotent_and_any_use_afterwards_raises(tmp_path: Path) -> None:
    fsync = FsyncRecorder()
    journal = Journal(tmp_path / "j", fsync=fsync)
    journal.append([rec(0)])
    journal.close()
    assert journal.unsynced == 0
    assert fsync.calls  # close synced
    journal.close()
    entry = JournalEntry(rec(0), 1, 10)
    for use in (
        lambda: journal.append([rec(1)]),
        journal.sync,
        lambda: journal.peek(1),
        lambda: journal.acknowledge(entry),
    ):
        with pytest.raises(JournalError, match="closed"):
            use()


# --------------------------------------------------------------------------- failures while appending


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"when": object()}, TypeError),
        ({"text": "lone surrogate \ud800"}, ValueError),
        ("not a mapping", TypeError),
    ],
)
def test_unserializable_record_raises_and_nothing_of_the_batch_is_written(
    tmp_path: Path, bad: Any, error: type[Exception]
) -> None:
    directory = tmp_path / "j"
    fresh = Journal(directory)
    with pytest.raises(error):
        fresh.append([rec(0), bad])
    assert not directory.exists()

    fresh.append([rec(1)])
    size = (directory / "segment-00000001.jsonl").stat().st_size
    with pytest.raises(error):
        fresh.append([rec(2), bad, rec(3)])
    assert (directory / "segment-00000001.jsonl").stat().st_size == size
    assert fresh.pending == 1
    assert read_all(fresh) == [rec(1)]


def test_circular_record_raises_value_error(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    circular: dict[str, Any] = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match=r"[Cc]ircular"):
        journal.append([circular])
    assert journal.pending == 0


def test_disk_full_mid_write_raises_leaves_no_partial_line_and_journal_keeps_working(tmp_path: Path) -> None:
    """A real short write: RLIMIT_FSIZE makes the kernel write part of the batch, then fail with EFBIG."""
    directory = tmp_path / "j"
    child = textwrap.dedent(
        """
        import json, resource, signal, sys
        sys.path.insert(0, sys.argv[1])
        from pathlib import Path
        from persistence.errors import JournalError
        from persistence.write.journal import Journal

        directory = Path(sys.argv[2])
        segment = directory / "segment-00000001.jsonl"
        journal = Journal(directory)
        journal.append([{"seq": i, "pad": "x" * 40} for i in range(10)])
        journal.sync()
        report = {"size_before": segment.stat().st_size}
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (report["size_before"] + 100, hard))
        try:
            journal.append([{"seq": 100 + i, "pad": "y" * 40} for i in range(10)])
        except JournalError as exc:
            report["error"] = type(exc.__cause__).__name__
            report["errno"] = getattr(exc.__cause__, "errno", None)
            report["path"] = str(exc.path)
        report["pending_after_error"] = journal.pending
        report["unsynced_after_error"] = journal.unsynced
        report["size_after_error"] = segment.stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        journal.append([{"seq": 10, "pad": "z"}])
        journal.sync()
        report["pending_after_recovery"] = journal.pending
        journal.close()
        print(json.dumps(report))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", child, str(REPO_ROOT), str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["error"] == "OSError"
    assert report["errno"] == errno.EFBIG
    assert report["path"] == str(directory / "segment-00000001.jsonl")
    assert report["pending_after_error"] == 10
    assert report["unsynced_after_error"] == 0
    assert report["size_after_error"] == report["size_before"]  # the partial write was cut off again
    assert report["pending_after_recovery"] == 11

    reopened = Journal(directory)
    assert [record["seq"] for record in read_all(reopened)] == list(range(11))
    assert reopened.corrupt_lines == 0


def test_vanished_directory_raises_journal_error_then_journal_works_again(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory)
    journal.append([rec(0), rec(1)])
    shutil.rmtree(directory)

    with pytest.raises(JournalError, match="vanished") as caught:
        journal.append([rec(2)])
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    assert journal.pending == 0  # the batch is not counted, and the deleted records are gone
    assert journal.unsynced == 0

    journal.append([rec(3), rec(4)])  # recreates the directory
    journal.sync()
    assert read_all(journal) == [rec(3), rec(4)]
    assert drain(journal, batch=1) == [rec(3), rec(4)]
    journal.append([rec(5)])
    journal.close()
    assert read_all(Journal(directory)) == [rec(5)]


def test_directory_vanishing_under_peek_and_sync_raises_journal_error(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory)
    journal.append([rec(0)])
    shutil.rmtree(directory)
    with pytest.raises(JournalError):
        journal.sync()
    assert journal.pending == 0

    journal.append([rec(1)])
    shutil.rmtree(directory)
    with pytest.raises(JournalError):
        journal.peek(5)
    assert journal.pending == 0
    directory.mkdir()  # the directory comes back (empty)
    journal.append([rec(2)])
    assert read_all(journal) == [rec(2)]


def test_opening_a_path_that_cannot_be_a_directory_raises_journal_error(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    for path in (blocker, blocker / "j"):
        with pytest.raises(JournalError) as caught:
            Journal(path)
        assert isinstance(caught.value.__cause__, NotADirectoryError)
        assert caught.value.path == path


def test_append_when_the_directory_cannot_be_created_raises_journal_error(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory)
    directory.write_text("a file took the journal's place")
    with pytest.raises(JournalError) as caught:
        journal.append([rec(0)])
    assert isinstance(caught.value.__cause__, OSError)
    assert journal.pending == 0
    directory.unlink()
    journal.append([rec(1)])
    assert read_all(journal) == [rec(1)]


# --------------------------------------------------------------------------- bounded reads


def _bytes_read_by_this_process() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_peek_reads_only_what_it_needs_from_a_large_journal(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory)
    journal.append([{"seq": i, "pad": "p" * 20} for i in range(100_000)])
    journal.close()
    size = (directory / "segment-00000001.jsonl").stat().st_size
    assert size > 4_000_000

    reopened = Journal(directory)
    assert reopened.pending == 100_000
    before = _bytes_read_by_this_process()
    entries = reopened.peek(10)
    read = _bytes_read_by_this_process() - before
    assert [entry.record["seq"] for entry in entries] == list(range(10))
    assert read < 64 * 1024, read

    # Far into the file, peek starts from the checkpoint instead of re-reading what is consumed.
    reopened.acknowledge(reopened.peek(90_000)[-1])
    before = _bytes_read_by_this_process()
    entries = reopened.peek(10)
    read = _bytes_read_by_this_process() - before
    assert [entry.record["seq"] for entry in entries] == list(range(90_000, 90_010))
    assert read < 64 * 1024, read


# --------------------------------------------------------------------------- property test

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.one_of(json_scalars, st.lists(json_scalars, max_size=3))
extras = st.dictionaries(st.text(max_size=4), json_values, max_size=3)


class JournalMachine(RuleBasedStateMachine):
    """Any interleaving of appends, peek+acknowledge, syncs, clean re-opens and crashes (with a torn write
    at the end) leaves exactly the records not yet acknowledged, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="journal-property-"))
        self.directory = self.root / "j"
        self.journal = Journal(self.directory, segment_max_bytes=160)
        self.abandoned: list[Journal] = []
        self.model: list[dict[str, Any]] = []
        self.next_seq = 0
        self.torn_tail = False  # this journal was opened over a torn write

    def _open(self, *, torn_tail: bool = False) -> None:
        self.journal = Journal(self.directory, segment_max_bytes=160)
        self.torn_tail = torn_tail

    @rule(batch=st.lists(extras, max_size=6))
    def append(self, batch: list[dict[str, Any]]) -> None:
        records = [{**extra, "seq": self.next_seq + index} for index, extra in enumerate(batch)]
        self.next_seq += len(records)
        self.journal.append(records)
        self.model.extend(records)

    @rule(count=st.integers(min_value=1, max_value=9), pick=st.integers(min_value=0, max_value=8))
    def peek_and_acknowledge(self, count: int, pick: int) -> None:
        entries = self.journal.peek(count)
        assert [entry.record for entry in entries] == self.model[:count]
        if entries:
            index = min(pick, len(entries) - 1)
            self.journal.acknowledge(entries[index])
            del self.model[: index + 1]

    @rule()
    def sync(self) -> None:
        self.journal.sync()
        assert self.journal.unsynced == 0

    @rule()
    def reopen_after_close(self) -> None:
        self.journal.close()
        self._open()

    @rule(torn=st.binary(min_size=1, max_size=40).filter(lambda data: b"\n" not in data))
    def crash_mid_write_and_reopen(self, torn: bytes) -> None:
        self.abandoned.append(self.journal)  # never closed, like a killed process
        segments = segment_files(self.directory) if self.directory.exists() else []
        if segments:
            with (self.directory / segments[-1]).open("ab") as file:
                file.write(torn)
        self._open(torn_tail=bool(segments))

    @invariant()
    def holds_exactly_the_unacknowledged_records_in_order(self) -> None:
        assert self.journal.pending == len(self.model)
        assert read_all(self.journal) == self.model
        # A torn tail is a record lost (counted once); nothing else is ever counted as corrupt here.
        assert self.journal.corrupt_lines <= (1 if self.torn_tail else 0)

    def teardown(self) -> None:
        for journal in [*self.abandoned, self.journal]:
            with contextlib.suppress(JournalError):
                journal.close()
        shutil.rmtree(self.root, ignore_errors=True)


JournalMachine.TestCase.settings = settings(
    max_examples=examples(75),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_journal_state_machine = JournalMachine.TestCase


def test_segment_shorter_than_the_checkpoint_is_not_appended_to(tmp_path: Path) -> None:
    """After a power loss the checkpoint (fsynced) can point past the end of a segment whose unsynced,
    already committed tail was lost. New records must not land below the checkpoint offset."""
    directory = tmp_path / "j"
    journal = Journal(directory)
    journal.append([rec(0), rec(1), rec(2)])
    journal.acknowledge(journal.peek(2)[-1])
    journal.close()
    segment = directory / "segment-00000001.jsonl"
    os.truncate(segment, 10)

    reopened = Journal(directory)
    assert reopened.pending == 0
    reopened.append([rec(10)])
    assert read_all(reopened) == [rec(10)]
    reopened.close()
    assert read_all(Journal(directory)) == [rec(10)]


# ---------------------------------------------------------------------------------------------- one owner, writable


def test_a_journal_directory_has_one_owner_whatever_its_spelling(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    first = JournalOwnership(directory, "bot-a")
    first.acquire()
    try:
        holder = json.loads((directory / LOCK_FILE).read_text())
        assert holder == {"pid": os.getpid(), "instance_id": "bot-a"}
        (tmp_path / "link").symlink_to(directory)
        for spelling in (directory, tmp_path / "link", tmp_path / "journal" / ".." / "journal"):
            with pytest.raises(JournalDirectoryInUseError) as refused:
                JournalOwnership(spelling, "bot-b").acquire()
            assert refused.value.directory == directory.resolve()
            assert (refused.value.holder_pid, refused.value.holder_instance) == (os.getpid(), "bot-a")
            assert str(directory) in str(refused.value) and f"pid {os.getpid()}" in str(refused.value)
            assert "bot-a" in str(refused.value)
    finally:
        first.release()
    second = JournalOwnership(tmp_path / "link", "bot-b")
    second.acquire()  # released: the next owner takes it (and writes itself in)
    assert json.loads((directory / LOCK_FILE).read_text())["instance_id"] == "bot-b"
    second.release()


def test_an_owner_killed_with_sigkill_leaves_no_stale_owner(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    code = (
        "import sys\nfrom pathlib import Path\nfrom persistence.write.journal import JournalOwnership\n"
        "JournalOwnership(Path(sys.argv[1]), 'killed').acquire()\nprint('READY', flush=True)\nsys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(directory)],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "READY"
        with pytest.raises(JournalDirectoryInUseError, match=f"pid {child.pid}, instance killed"):
            JournalOwnership(directory, "mine").acquire()
    finally:
        child.kill()
        child.wait(timeout=30)
    mine = JournalOwnership(directory, "mine")
    mine.acquire()
    mine.release()


def test_a_directory_whose_parent_is_a_file_is_not_writable_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(JournalNotWritableError, match=str(tmp_path / "file" / "journal")) as refused:
        JournalOwnership(tmp_path / "file" / "journal", "bot").acquire()
    assert refused.value.reason == "Not a directory"


def test_a_read_only_file_system_fails_the_lock_or_the_probe_naming_the_path(tmp_path: Path) -> None:
    with read_only_file_system(tmp_path / "ro") as directory:
        with pytest.raises(JournalNotWritableError, match="Read-only file system") as refused:
            JournalOwnership(directory, "bot").acquire()
        assert str(directory) in str(refused.value)
        assert os.listdir(directory) == []


def test_the_probe_creates_fsyncs_and_removes_its_file(tmp_path: Path) -> None:
    synced: list[int] = []
    owner = JournalOwnership(tmp_path / "journal", "bot", fsync=synced.append)
    owner.acquire()
    owner.probe()
    owner.release()
    assert len(synced) == 1
    assert sorted(os.listdir(tmp_path / "journal")) == [LOCK_FILE]
