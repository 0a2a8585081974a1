"""What the audit trail's checkpoints cost the write path: nothing a host should see.

The same sidecar, the same records, twice per round, in turn: once with a **signed checkpoint every 50 ms** (600 times
the default rate: every checkpoint is an Ed25519 signature, the database's log fsynced and a JSON line appended and
fsynced in a thread, an event and a log line), once with the default 30 s interval (no checkpoint inside the
measurement; the one at ``close()`` comes after it). Measured as the user measures (``benchmarks.harness``): a steady
1000 trades/s for 3 s (p95 call → receipt, the loop's largest stall with no full collection of the heap inside it: the
collector's passes land in either run by chance) and three bursts of 1000 (p95 each). The ratios are taken pair by pair
and the figure is their median. The run fails if the checkpoints did not happen (a line count per run), not on a timing.
A third steady run per round writes the checkpoints without their fsyncs (the database's log, the anchor file), to show
what is left without them.
"""

from __future__ import annotations

import asyncio
import os
import statistics
from pathlib import Path
from typing import Any
from unittest import mock

from benchmarks.harness import (
    LoopStallProbe,
    migrated,
    ms,
    percentile,
    run,
    sqlite_settings,
    user_burst,
    user_steady,
)
from persistence import Settings
from persistence.audit import anchors
from persistence.audit.anchors import Checkpoint, anchor_path, generate_key, read_anchor_lines

ROUNDS = max(int(os.environ.get("BENCH_ROUNDS", "5")) // 2, 3)
INTERVAL = 0.05
STEADY_COUNT, STEADY_RATE = 3000, 1000
BURST = 1000
BURST_PAIRS = 3


def append_unsynced(self: anchors.Anchorer, checkpoint: Checkpoint) -> None:
    """The checkpoint appended with no fsync (neither the database's log nor the anchor file): only to see what the
    fsyncs cost."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with self.path.open("a", encoding="ascii") as file:
        file.write(checkpoint.to_line() + "\n")


def test_checkpoints_beside_none_on_the_write_path(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, figures: list[dict[str, Any]]
) -> None:
    key = tmp_path / "anchor-key.pem"
    generate_key(key)
    steady: dict[bool, list[float]] = {True: [], False: []}
    stalls: dict[bool, list[float]] = {True: [], False: []}
    bursts: dict[bool, list[float]] = {True: [], False: []}
    unsynced: list[float] = []
    written: list[int] = []
    counter = iter(range(10_000))

    def settings_for(name: str, anchored: bool) -> Settings:
        anchors = tmp_path / f"{name}-anchors"
        options: dict[str, Any] = {"audit_anchor_dir": anchors}
        if anchored:
            options.update(audit_anchor_seconds=INTERVAL, audit_signing_key=key)
        settings = sqlite_settings(tmp_path / f"{name}.db", **options)
        run(loop, migrated(settings))
        return settings

    def checkpoints(settings: Settings, signed: bool) -> int:
        lines = read_anchor_lines(settings.audit_anchor_dir)
        path = anchor_path(settings.audit_anchor_dir, settings.instance_id)
        for line in lines:
            assert line.path == path and line.checkpoint is not None, line
            assert (line.checkpoint.signature is not None) is signed, line
        return len(lines)

    def one_round() -> None:
        n = next(counter)
        # The order within a round alternates, so neither side always runs on the warmer process.
        for anchored in (n % 2 == 0, n % 2 != 0):
            settings = settings_for(f"steady-{n}-{anchored}", anchored)
            probe = LoopStallProbe()
            latencies = run(loop, user_steady(settings, STEADY_COUNT, STEADY_RATE, f"A{n}{anchored:d}", probe))
            steady[anchored].append(percentile(latencies, 95))
            stalls[anchored].append(probe.largest_without_a_full_collection)
            lines = checkpoints(settings, anchored)
            if anchored:
                written.append(lines)
            else:
                assert lines == 1, lines  # the one at close()
        # What is left of the difference without the anchor file's fsync (the same disk as the database's).
        settings = settings_for(f"steady-{n}-unsynced", True)
        with mock.patch.object(anchors.Anchorer, "_append", append_unsynced):
            latencies = run(loop, user_steady(settings, STEADY_COUNT, STEADY_RATE, f"U{n}"))
        unsynced.append(percentile(latencies, 95))
        for b in range(BURST_PAIRS):  # a burst lasts about 50 ms: several pairs a round, each in turn
            for anchored in (b % 2 == 0, b % 2 != 0):
                settings = settings_for(f"burst-{n}-{b}-{anchored}", anchored)
                latencies, _ = run(loop, user_burst(settings, BURST, f"B{n}{b}{anchored:d}"))
                bursts[anchored].append(percentile(latencies, 95))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    # 3 s at one checkpoint every 50 ms: about 60 a run when the loop keeps time; far fewer means they stopped.
    assert min(written) >= 20, written

    def ratios(values: dict[bool, list[float]]) -> list[float]:
        return [on / off for on, off in zip(values[True], values[False], strict=True)]

    steady_ratio, stall_ratio, burst_ratio = (statistics.median(ratios(v)) for v in (steady, stalls, bursts))
    unsynced_ratio = statistics.median([value / off for value, off in zip(unsynced, steady[False], strict=True)])
    benchmark.extra_info.update(steady_ratio=steady_ratio, burst_ratio=burst_ratio)
    figures.append(
        {
            "figure": (
                f"audit checkpoints on the write path: a signed checkpoint every {INTERVAL * 1000:.0f} ms beside none"
                " (SQLite)"
            ),
            "target": "no checkpoint delays a commit: the user's figures unchanged",
            "measured": (
                f"steady 1000/s p95 {ms(statistics.median(steady[True]))}, largest stall (no full collection in it)"
                f" {ms(statistics.median(stalls[True]))}; burst of 1000 p95 {ms(statistics.median(bursts[True]))};"
                f" {statistics.median(written):.0f} checkpoints a 3 s run"
            ),
            "baseline": (
                f"no checkpoint: steady p95 {ms(statistics.median(steady[False]))}, largest stall"
                f" {ms(statistics.median(stalls[False]))}; burst p95 {ms(statistics.median(bursts[False]))}"
            ),
            "ratio": (
                f"with / without, pair by pair (median): steady p95 {steady_ratio:.2f}×, stall {stall_ratio:.2f}×,"
                f" burst p95 {burst_ratio:.2f}×; steady p95 with checkpoints not fsynced {unsynced_ratio:.2f}×"
            ),
            "values": {
                "steady_p95_ms": {str(k): [v * 1000 for v in values] for k, values in steady.items()},
                "largest_stall_ms": {str(k): [v * 1000 for v in values] for k, values in stalls.items()},
                "burst_p95_ms": {str(k): [v * 1000 for v in values] for k, values in bursts.items()},
                "unsynced_steady_p95_ms": [v * 1000 for v in unsynced],
                "unsynced_steady_ratio": unsynced_ratio,
                "checkpoints_per_run": written,
                "steady_ratio": steady_ratio,
                "stall_ratio": stall_ratio,
                "burst_ratio": burst_ratio,
            },
        }
    )
