"""Chaos soak: about 500 records/s of trades and signals into a SQLite sidecar while its database misbehaves.

Faults during the load, all real: another connection takes the write lock and lets it go (held 0.3–2 s, released
0.3–2 s), the disk fills and frees (``PRAGMA max_page_count`` through :class:`persistence.testing.FaultInjector`),
a poison trade now and then (a trigger refuses it), and one restart in the middle (``close()`` and a fresh sidecar
on the same files). The real clock is used; the breaker resets after 1 s so recovery happens within the run.

Everything recorded is also written to an *oracle* (a separate SQLite file, so the oracle does not grow the
process's memory). At the end the trading database is compared with it: nothing missing, nothing duplicated, the
latest version of every trade and signal won, and the dead letters are exactly the poison trades. RSS
(``/proc/self/statm``) is sampled throughout. By hand::

    PYTHONPATH=. python -m tests.reliability.soak --minutes 10

prints progress on stderr and one JSON line of figures on stdout. ``tests/reliability/test_soak.py`` runs a short
version in a subprocess (so RSS is this run's alone) and asserts the figures.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import random
import sqlite3
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from persistence import PersistenceSidecar, Settings
from persistence.db.columns import to_scaled_int, to_sqlite_datetime
from persistence.observe.events import (
    BatchCommitted,
    BreakerChanged,
    Event,
    JournalSpilled,
    RecordDeadLettered,
    WriteFailed,
)
from persistence.records.models import Signal, Trade
from persistence.testing import DatabaseLock, FaultInjector
from persistence.write.committer import RetryPolicy

TICK_SECONDS = 0.02
POISON_PREFIX = "POISON-"
RETRY = RetryPolicy(attempts=2, initial_wait=0.02, max_wait=0.1)


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def soak_settings(workdir: Path) -> Settings:
    """Short breaker reset and query timeout, so faults come and go many times within a run."""
    return Settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{workdir / 'trading.db'}",
        journal_dir=workdir / "journal",
        audit_anchor_dir=workdir / "anchors",  # not the working directory's ./data/anchors
        breaker_failure_threshold=3,
        breaker_reset_seconds=1.0,
        query_timeout_ms=250,
        max_pending=1000,
        history_max=2000,
        shutdown_timeout=5.0,
    )


@dataclass
class Figures:
    """What happened during a soak."""

    records: int = 0
    trades_opened: int = 0
    trades_closed: int = 0
    signals: int = 0
    signal_updates: int = 0
    poison: int = 0
    lock_episodes: int = 0
    lock_held_seconds: float = 0.0
    disk_full_episodes: int = 0
    restarts: int = 0
    breaker_openings: int = 0
    write_failures: int = 0
    journal_spills: int = 0
    dead_letter_events: int = 0
    latencies: array.array[float] = field(default_factory=lambda: array.array("d"))
    rss_samples: list[tuple[float, int]] = field(default_factory=list)

    def listen(self, event: Event) -> None:
        if isinstance(event, BatchCommitted):
            self.latencies.extend(latency for _, latency in event.latencies)
        elif isinstance(event, BreakerChanged) and event.to_state == "open":
            self.breaker_openings += 1
        elif isinstance(event, WriteFailed) and event.records:
            self.write_failures += 1
        elif isinstance(event, JournalSpilled):
            self.journal_spills += 1
        elif isinstance(event, RecordDeadLettered):
            self.dead_letter_events += 1


class Oracle:
    """Everything recorded, latest version per key, in its own SQLite file (off the heap being measured)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.executescript(
            """
            CREATE TABLE trades (trade_id TEXT PRIMARY KEY, pnl INTEGER, exit_price INTEGER, exit_time TEXT);
            CREATE TABLE signals (signal_id TEXT PRIMARY KEY, executed INTEGER, execution_status TEXT);
            CREATE TABLE poison (trade_id TEXT PRIMARY KEY);
            """
        )
        self._trades: list[tuple[Any, ...]] = []
        self._signals: list[tuple[Any, ...]] = []
        self._poison: list[tuple[str]] = []

    def trade(self, trade: Trade) -> None:
        if trade.trade_id.startswith(POISON_PREFIX):
            self._poison.append((trade.trade_id,))
            return
        self._trades.append(
            (
                trade.trade_id,
                None if trade.pnl is None else to_scaled_int(trade.pnl),
                None if trade.exit_price is None else to_scaled_int(trade.exit_price),
                None if trade.exit_time is None else to_sqlite_datetime(trade.exit_time),
            )
        )

    def signal(self, signal_id: str, executed: bool, status: str | None) -> None:
        self._signals.append((signal_id, int(executed), status))

    def commit(self) -> None:
        """Write what was recorded since the last call (once per tick)."""
        self._db.execute("BEGIN")
        self._db.executemany("INSERT OR REPLACE INTO trades VALUES (?, ?, ?, ?)", self._trades)
        self._db.executemany("INSERT OR REPLACE INTO signals VALUES (?, ?, ?)", self._signals)
        self._db.executemany("INSERT INTO poison VALUES (?)", self._poison)
        self._db.execute("COMMIT")
        self._trades.clear()
        self._signals.clear()
        self._poison.clear()

    def close(self) -> None:
        self._db.close()


class Load:
    """About ``rate`` records per second: trades opened and later closed, signals and their execution updates."""

    def __init__(self, oracle: Oracle, figures: Figures, rng: random.Random, poison_every: float) -> None:
        self.oracle = oracle
        self.figures = figures
        self.rng = rng
        self.poison_every = poison_every
        self._open: deque[Trade] = deque()
        self._unexecuted: deque[str] = deque(maxlen=500)  # bounded: only some signals are ever executed
        self._n = 0
        self._next_poison = time.monotonic() + poison_every

    def tick(self, sidecar: PersistenceSidecar, per_tick: int) -> None:
        """Record one tick's worth: 30 % opens, 30 % closes, 30 % signals, 10 % execution updates."""
        now = datetime.now(UTC)
        share = max(per_tick // 10, 1)
        for _ in range(3 * share):
            self._record_trade(sidecar, self._open_trade(now))
        for _ in range(3 * share):
            if len(self._open) > 50:  # closed about a second after being opened
                self._record_trade(sidecar, self._close(self._open.popleft(), now))
        for _ in range(3 * share):
            self._record_signal(sidecar, now)
        for _ in range(share):
            if len(self._unexecuted) > 20:
                signal_id = self._unexecuted.popleft()
                status = self.rng.choice(("FILLED", "REJECTED", "PARTIAL"))
                sidecar.update_signal_execution(signal_id, True, status)
                self.oracle.signal(signal_id, True, status)
                self.figures.signal_updates += 1
                self.figures.records += 1
        if time.monotonic() >= self._next_poison:
            self._next_poison += self.poison_every
            self.figures.poison += 1
            poison = self._open_trade(now, trade_id=f"{POISON_PREFIX}{self.figures.poison:05d}")
            sidecar.record_trade(poison)
            self.oracle.trade(poison)
            self.figures.records += 1
        self.oracle.commit()

    def _record_trade(self, sidecar: PersistenceSidecar, trade: Trade) -> None:
        sidecar.record_trade(trade)
        self.oracle.trade(trade)
        self.figures.records += 1

    def _open_trade(self, now: datetime, trade_id: str | None = None) -> Trade:
        self._n += 1
        trade = Trade(
            trade_id=trade_id or f"SOAK-{self._n:09d}",
            symbol=self.rng.choice(("EURUSD", "BTCUSD", "XAUUSD")),
            direction=self.rng.choice(("BUY", "SELL")),
            entry_time=now,
            entry_price=Decimal(self.rng.randrange(100_000_000, 9_999_999_999)) / 10**8,
            position_size=Decimal(self.rng.randrange(1, 10_000)) / 100,
            session="LONDON",
            pattern_type="soak",
            created_at=now,
            updated_at=now,
        )
        if trade_id is None:
            self._open.append(trade)
            self.figures.trades_opened += 1
        return trade

    def _close(self, trade: Trade, now: datetime) -> Trade:
        self.figures.trades_closed += 1
        later = max(now, trade.updated_at + timedelta(microseconds=1))  # a newer version, strictly
        return trade.model_copy(
            update={
                "exit_time": later,
                "exit_price": trade.entry_price + Decimal(self.rng.randrange(-(10**6), 10**6)) / 10**8,
                "pnl": Decimal(self.rng.randrange(-(10**10), 10**10)) / 10**8,
                "updated_at": later,
            }
        )

    def _record_signal(self, sidecar: PersistenceSidecar, now: datetime) -> None:
        self._n += 1
        signal = Signal(
            signal_id=f"SIG-{self._n:09d}",
            symbol="EURUSD",
            timeframe="M5",
            signal_type=self.rng.choice(("BUY", "SELL")),
            confidence=Decimal(self.rng.randrange(0, 100)) / 100,
            entry_price=Decimal("1.08400000"),
            generated_at=now,
        )
        sidecar.record_signal(signal)
        self.oracle.signal(signal.signal_id, False, None)
        self._unexecuted.append(signal.signal_id)
        self.figures.signals += 1
        self.figures.records += 1


def add_poison_trigger(database: Path) -> None:
    """Any trade whose id starts with ``POISON-`` is refused by the database (a data error)."""
    with contextlib.closing(sqlite3.connect(database, timeout=10)) as connection:
        connection.execute(
            f"CREATE TRIGGER IF NOT EXISTS poison BEFORE INSERT ON trades WHEN NEW.trade_id LIKE '{POISON_PREFIX}%' "
            "BEGIN SELECT RAISE(ABORT, 'poison record refused by trigger'); END"
        )
        connection.commit()


async def flap_lock(database_url: str, figures: Figures, rng: random.Random, stop: asyncio.Event) -> None:
    """Another connection takes the write lock for 0.3–2 s, lets it go for 0.3–2 s, again and again."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(0.3, 2.0))
        if stop.is_set():
            return
        lock = DatabaseLock(database_url)
        try:
            await lock.acquire()
        except sqlite3.OperationalError:
            continue  # someone else held it for 10 s; try again later
        held = rng.uniform(0.3, 2.0)
        figures.lock_episodes += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), held)
        finally:
            await lock.release()
        figures.lock_held_seconds += held


class Soak:
    """One run: the load, the faults, the restart, the final comparison."""

    def __init__(self, workdir: Path, seconds: float, rate: int, seed: int) -> None:
        self.workdir = workdir
        self.seconds = seconds
        self.rate = rate
        self.rng = random.Random(seed)
        self.settings = soak_settings(workdir)
        self.figures = Figures()
        self.oracle = Oracle(workdir / "oracle.db")
        self.sidecar: PersistenceSidecar | None = None
        self.guard = asyncio.Lock()  # held while the sidecar is being replaced, and during each disk-full episode

    async def _new_sidecar(self) -> PersistenceSidecar:
        sidecar = PersistenceSidecar(self.settings, retry=RETRY, log_events=False)
        sidecar.events.subscribe(self.figures.listen)
        await sidecar.start()
        self.sidecar = sidecar
        return sidecar

    async def _fill_disk_now_and_then(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.uniform(3.0, 8.0))
            if stop.is_set():
                return
            async with self.guard:
                sidecar = self.sidecar
                if sidecar is None or sidecar.database is None:
                    continue
                try:
                    async with FaultInjector(sidecar).full_disk():
                        self.figures.disk_full_episodes += 1
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), self.rng.uniform(1.0, 3.0))
                except sqlite3.OperationalError:
                    continue  # the checkpoint met the other connection's lock for 10 s

    async def _sample_rss(self, stop: asyncio.Event, started: float) -> None:
        while not stop.is_set():
            self.figures.rss_samples.append((time.monotonic() - started, rss_bytes()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)

    async def _progress(self, stop: asyncio.Event, started: float) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 10.0)
            sidecar = self.sidecar
            state = sidecar.health().to_dict() if sidecar is not None else {}
            print(
                f"[soak] {time.monotonic() - started:6.1f} s records={self.figures.records} "
                f"breaker={state.get('breaker')} queue={state.get('queue')} journal={state.get('journal')} "
                f"openings={self.figures.breaker_openings} rss={rss_bytes() / 2**20:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        sidecar = await self._new_sidecar()
        add_poison_trigger(self.workdir / "trading.db")
        load = Load(self.oracle, self.figures, self.rng, poison_every=max(self.seconds / 40, 1.0))
        stop = asyncio.Event()
        background = [
            asyncio.create_task(self._sample_rss(stop, started)),
            asyncio.create_task(self._progress(stop, started)),
            asyncio.create_task(flap_lock(self.settings.database_url, self.figures, self.rng, stop)),
            asyncio.create_task(self._fill_disk_now_and_then(stop)),
        ]
        per_tick = max(round(self.rate * TICK_SECONDS), 10)
        load_started = time.monotonic()
        restart_at = load_started + self.seconds / 2
        tick = 0
        try:
            while (now := time.monotonic()) < load_started + self.seconds:
                if self.figures.restarts == 0 and now >= restart_at:
                    async with self.guard:
                        await sidecar.close()
                        sidecar = await self._new_sidecar()
                    self.figures.restarts += 1
                load.tick(sidecar, per_tick)
                tick += 1
                delay = load_started + tick * TICK_SECONDS - time.monotonic()
                await asyncio.sleep(max(delay, 0.0))
            load_seconds = time.monotonic() - load_started
        finally:
            stop.set()
            await asyncio.gather(*background, return_exceptions=True)
        rss_end_of_load = rss_bytes()
        drain_started = time.monotonic()
        await sidecar.flush(timeout=120)
        drain_seconds = time.monotonic() - drain_started
        counts = sidecar.health().to_dict()["counts"]
        await sidecar.close()
        self.oracle.close()
        verdict = compare(self.workdir / "trading.db", self.oracle.path)
        return self._report(load_seconds, drain_seconds, rss_end_of_load, counts, verdict)

    def _report(
        self,
        load_seconds: float,
        drain_seconds: float,
        rss_end_of_load: int,
        counts: dict[str, int],
        verdict: dict[str, int],
    ) -> dict[str, Any]:
        figures = self.figures
        samples = figures.rss_samples
        warm_up = min(5.0, self.seconds / 6)
        after_warm_up = [rss for at, rss in samples if at >= warm_up] or [rss_end_of_load]
        latencies = sorted(figures.latencies)

        def quantile(q: float) -> float:
            return latencies[min(int(q * len(latencies)), len(latencies) - 1)] if latencies else 0.0

        return {
            "load_seconds": round(load_seconds, 1),
            "records": figures.records,
            "records_per_second": round(figures.records / load_seconds, 1),
            "trades_opened": figures.trades_opened,
            "trades_closed": figures.trades_closed,
            "signals": figures.signals,
            "signal_updates": figures.signal_updates,
            "poison": figures.poison,
            "lock_episodes": figures.lock_episodes,
            "lock_held_seconds": round(figures.lock_held_seconds, 1),
            "disk_full_episodes": figures.disk_full_episodes,
            "restarts": figures.restarts,
            "breaker_openings": figures.breaker_openings,
            "write_failures": figures.write_failures,
            "journal_spills": figures.journal_spills,
            "dead_letter_events": figures.dead_letter_events,
            "drain_seconds": round(drain_seconds, 2),
            "counts_after_restart": counts,
            "latency_samples": len(latencies),
            "latency_p50_ms": round(quantile(0.50) * 1000, 1),
            "latency_p95_ms": round(quantile(0.95) * 1000, 1),
            "latency_p99_ms": round(quantile(0.99) * 1000, 1),
            "latency_max_ms": round(latencies[-1] * 1000, 1) if latencies else 0.0,
            "rss_first_mib": round(samples[0][1] / 2**20, 1) if samples else 0.0,
            "rss_after_warm_up_mib": round(after_warm_up[0] / 2**20, 1),
            "rss_max_mib": round(max(rss for _, rss in samples) / 2**20, 1) if samples else 0.0,
            "rss_growth_after_warm_up_mib": round((max(after_warm_up) - after_warm_up[0]) / 2**20, 1),
            "rss_quartiles_mib": [
                round(after_warm_up[min(int(q * len(after_warm_up)), len(after_warm_up) - 1)] / 2**20, 1)
                for q in (0.0, 0.25, 0.5, 0.75, 1.0)
            ],
            **verdict,
        }


def compare(trading_db: Path, oracle_db: Path) -> dict[str, int]:
    """The database against the oracle: missing, duplicated, unexpected, stale, and the dead letters."""
    with contextlib.closing(sqlite3.connect(trading_db)) as connection:
        connection.execute("ATTACH DATABASE ? AS oracle", (str(oracle_db),))

        def scalar(sql: str) -> int:
            return int(connection.execute(sql).fetchone()[0])

        return {
            "oracle_trades": scalar("SELECT count(*) FROM oracle.trades"),
            "oracle_signals": scalar("SELECT count(*) FROM oracle.signals"),
            "stored_trades": scalar("SELECT count(*) FROM main.trades"),
            "stored_signals": scalar("SELECT count(*) FROM main.signals"),
            "missing_trades": scalar(
                "SELECT count(*) FROM oracle.trades o WHERE NOT EXISTS "
                "(SELECT 1 FROM main.trades t WHERE t.trade_id = o.trade_id)"
            ),
            "missing_signals": scalar(
                "SELECT count(*) FROM oracle.signals o WHERE NOT EXISTS "
                "(SELECT 1 FROM main.signals s WHERE s.signal_id = o.signal_id)"
            ),
            "duplicated_trades": scalar("SELECT count(*) - count(DISTINCT trade_id) FROM main.trades"),
            "duplicated_signals": scalar("SELECT count(*) - count(DISTINCT signal_id) FROM main.signals"),
            "unexpected_trades": scalar(
                "SELECT count(*) FROM main.trades t WHERE NOT EXISTS "
                "(SELECT 1 FROM oracle.trades o WHERE o.trade_id = t.trade_id)"
            ),
            "stale_trades": scalar(
                "SELECT count(*) FROM oracle.trades o JOIN main.trades t USING (trade_id) "
                "WHERE t.pnl IS NOT o.pnl OR t.exit_price IS NOT o.exit_price OR t.exit_time IS NOT o.exit_time"
            ),
            "closed_trades_stored": scalar("SELECT count(*) FROM main.trades WHERE exit_time IS NOT NULL"),
            "stale_signals": scalar(
                "SELECT count(*) FROM oracle.signals o JOIN main.signals s USING (signal_id) "
                "WHERE s.executed IS NOT o.executed OR s.execution_status IS NOT o.execution_status"
            ),
            "dead_letters": scalar("SELECT count(*) FROM main.dead_letters"),
            "dead_letters_not_poison": scalar(
                "SELECT count(*) FROM main.dead_letters d WHERE d.entity <> 'trade' OR NOT EXISTS "
                "(SELECT 1 FROM oracle.poison p WHERE p.trade_id = d.natural_key)"
            ),
            "poison_not_dead_lettered": scalar(
                "SELECT count(*) FROM oracle.poison p WHERE NOT EXISTS "
                "(SELECT 1 FROM main.dead_letters d WHERE d.entity = 'trade' AND d.natural_key = p.trade_id)"
            ),
            "poison_stored": scalar(f"SELECT count(*) FROM main.trades WHERE trade_id LIKE '{POISON_PREFIX}%'"),
        }


def main(argv: list[str] | None = None) -> None:
    """Run a soak and print its figures as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    duration = parser.add_mutually_exclusive_group()
    duration.add_argument("--minutes", type=float)
    duration.add_argument("--seconds", type=float)
    parser.add_argument("--rate", type=int, default=500, help="records per second (default 500)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, help="where the databases and journal go (default: a temp dir)")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (args.minutes or 1.0) * 60
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        figures = asyncio.run(Soak(workdir, seconds, args.rate, args.seed).run())
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
