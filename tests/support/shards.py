"""The whole suite in two pytest processes at once (``TEST_SHARDS``, default 2), so both of the machine's cores
work: ``.venv/bin/python -m tests.support.shards [PYTEST ARGUMENTS]``, which ``make test`` runs (``make
test-serial`` runs the suite in one process).

``pytest --shard K/N`` keeps every N-th test of the collection, from the K-th (counted from 0), so the N processes
started with K = 0 … N-1 run every test exactly once between them. The tests that read the chaos soak's figures all go
to shard 0, where the soak runs beside the suite. Each shard's output is printed whole when all have ended, shard by
shard; the exit status is the first failing shard's, 0 when all pass (a shard that selected no test does
not fail the run unless none selected any). ``.venv/bin/python -m pytest`` runs the same
tests in one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
NO_TESTS = 5
"""pytest's exit status when it selected no test."""


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` as (K, N); raises ``ValueError`` unless 0 ≤ K < N."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ValueError(f"--shard {text!r}: expected K/N with 0 <= K < N")
    return int(index), int(count)


def shard_of(position: int, shards: int, *, pinned: bool) -> int:
    """The shard that runs the test at ``position`` of the collection; ``pinned`` tests run in shard 0."""
    return 0 if pinned else position % shards


def split(items: Sequence[T], shard: int, shards: int, pinned: Sequence[bool]) -> tuple[list[T], list[T]]:
    """``items`` as (this shard's, the others')."""
    kept: list[T] = []
    dropped: list[T] = []
    for position, (item, is_pinned) in enumerate(zip(items, pinned, strict=True)):
        (kept if shard_of(position, shards, pinned=is_pinned) == shard else dropped).append(item)
    return kept, dropped


def main(arguments: list[str]) -> int:
    shards = int(os.environ.get("TEST_SHARDS", "2"))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="persistence-tests-") as scratch:
        runs: list[tuple[subprocess.Popen[bytes], Path]] = []
        try:
            for shard in range(shards):
                log = Path(scratch) / f"shard-{shard}.log"
                with log.open("wb") as output:
                    command = [
                        sys.executable,
                        "-m",
                        "pytest",
                        f"--shard={shard}/{shards}",
                        f"--basetemp={Path(scratch) / f'tmp-{shard}'}",  # pytest's own numbering is per process
                        "-p",
                        "no:cacheprovider",  # one cache file, two writers
                        *arguments,
                    ]
                    runs.append((subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT), log))
            statuses = [process.wait() for process, _ in runs]
        finally:
            for process, _ in runs:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        for shard, ((_, log), status) in enumerate(zip(runs, statuses, strict=True)):
            sys.stdout.write(f"\n===== shard {shard + 1} of {shards}: exit status {status} =====\n")
            sys.stdout.write(log.read_text(errors="replace"))
    # Status 5 is a shard that selected no test (a small selection fits in fewer shards): not a failure unless none
    # of the shards ran anything.
    failed = [status for status in statuses if status not in (0, NO_TESTS)]
    if not failed and all(status == NO_TESTS for status in statuses):
        failed = [NO_TESTS]
    print(f"\n{shards} shards in {time.monotonic() - started:.1f} s: " + ("all passed" if not failed else "FAILED"))
    return failed[0] if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
