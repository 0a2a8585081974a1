"""``persistence-sidecar demo``: a simulated trading orchestrator with the sidecar embedded, as a user would run it.

Prices random-walk on a few symbols; the orchestrator emits signals, acts on about half of them by opening a
trade (and marking the signal executed), and closes each trade a few seconds later, recording it again with its
exit price and P&L. The sidecar persists all of it while the history API and ``/metrics`` are served from the same
event loop. A status line shows the rate, what is persisted, the backlog in RAM and in the journal, the breaker and
the p95 record-to-commit latency (off a terminal: a ``demo_status`` log event). With ``--chaos`` the database is
taken away every so often (:class:`persistence.testing.DatabaseLock`: another connection holds the write lock), so
the breaker can be seen to open, half-open, close and backfill; at INFO each outage is one ``database_outage``
warning and one ``database_recovered`` line (``PERSISTENCE_LOG_LEVEL=DEBUG`` shows every sidecar event). The demo's
shorter timings are printed at its start. Ctrl-C or SIGTERM stops the simulation, waits for the backlog to reach
the database, closes the sidecar and prints a summary whose trade count is checked against the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import sys
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, TextIO

from sqlalchemy import text

from persistence.app.api import create_app
from persistence.app.cli.console import StatusConsole, configure_console_logging
from persistence.app.demo.outages import OutageSummary
from persistence.app.server import ApiServer
from persistence.config import Settings
from persistence.db.engine import create_database, sqlite_path
from persistence.observe.event_log import EventLogger
from persistence.observe.events import BatchCommitted, BreakerChanged, Event
from persistence.observe.logger import get_logger
from persistence.records.models import utc_now
from persistence.sidecar import PersistenceSidecar
from persistence.testing import DatabaseLock
from persistence.write.committer import RetryPolicy
from persistence.write.journal import Journal

SYMBOLS: dict[str, Decimal] = {
    "EURUSD": Decimal("1.08420"),
    "GBPUSD": Decimal("1.26550"),
    "USDJPY": Decimal("151.320"),
    "XAUUSD": Decimal("2338.50"),
}
PATTERNS = ("breakout", "reversal", "trend_continuation", "range_bounce")
TIMEFRAMES = ("M1", "M5", "M15")

# The demo shows in seconds what production shows in minutes. Each applies only when its variable is not set.
DEMO_OVERRIDES: dict[str, tuple[str, Any]] = {
    "breaker_reset_seconds": ("PERSISTENCE_BREAKER_RESET_SECONDS", 3.0),
    # SQLite's busy wait (and so a failed write attempt under a held lock) lasts this long: five failures, and the
    # breaker opens, in about a second and a half.
    "query_timeout_ms": ("DATABASE_QUERY_TIMEOUT", 150),
    # A small RAM backlog, so an outage visibly spills to the on-disk journal.
    "max_pending": ("PERSISTENCE_MAX_PENDING", 200),
}
DEMO_RETRY = RetryPolicy(attempts=2, max_seconds=2.0, initial_wait=0.05, max_wait=0.2)
CHAOS_FIRST_AFTER = 1.0
CHAOS_HOLD = 4.0
CHAOS_CALM = 8.0


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What the user asked for on the command line."""

    duration: float | None = None
    rate: float = 50.0
    chaos: bool = False
    seed: int | None = None


log = get_logger("persistence.demo")


def demo_overrides(environ: dict[str, str] | None = None) -> dict[str, tuple[str, Any]]:
    """The demo's own defaults that apply: ``{setting: (variable, value)}`` for each variable the environment lacks."""
    env = {key.upper() for key in (environ if environ is not None else os.environ)}
    return {name: (variable, value) for name, (variable, value) in DEMO_OVERRIDES.items() if variable not in env}


def demo_settings(settings: Settings, environ: dict[str, str] | None = None) -> Settings:
    """``settings`` with the demo's shorter timings, except where the environment sets them explicitly."""
    update = {name: value for name, (_, value) in demo_overrides(environ).items()}
    return settings.model_copy(update=update)


def describe_overrides(overrides: dict[str, tuple[str, Any]]) -> str:
    """One line naming the demo's changed defaults, for the start of the demo and the README."""
    changed = [f"{variable}={value:g}" for variable, value in sorted(overrides.values())]
    retry = f"write retries {DEMO_RETRY.attempts} attempts within {DEMO_RETRY.max_seconds:g} s"
    if not changed:
        return f"{retry} (every other setting from the environment)"
    return f"{', '.join(changed)}, {retry} (set a variable to override)"


@dataclass(slots=True)
class _OpenTrade:
    data: dict[str, Any]
    closes_at: float


@dataclass(slots=True)
class Tally:
    """What the simulated orchestrator recorded."""

    signals: int = 0
    executions: int = 0
    trades_opened: int = 0
    trades_closed: int = 0

    @property
    def records(self) -> int:
        """Every ``record_*`` / ``update_*`` call."""
        return self.signals + self.executions + self.trades_opened + self.trades_closed


class Market:
    """Random-walk prices, a few basis points per step."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.prices = dict(SYMBOLS)

    def step(self, symbol: str) -> Decimal:
        """Move ``symbol`` one step and return its new price."""
        price = self.prices[symbol]
        move = Decimal(str(round(self._rng.gauss(0.0, 0.0004), 6)))
        places = price.as_tuple().exponent
        new = (price * (1 + move)).quantize(Decimal(1).scaleb(places if isinstance(places, int) else -5))
        self.prices[symbol] = new if new > 0 else price
        return self.prices[symbol]


def trading_session(moment: datetime) -> str:
    """The FX session of a UTC time (the overlap of London and New York counts as OVERLAP)."""
    hour = moment.hour
    if hour < 7:
        return "TOKYO"
    if hour < 12:
        return "LONDON"
    if hour < 16:
        return "OVERLAP"
    if hour < 21:
        return "NY"
    return "SYDNEY"


class Orchestrator:
    """The simulated trading loop: each step records exactly one thing."""

    def __init__(self, sidecar: PersistenceSidecar, rng: random.Random, run_id: str) -> None:
        self.sidecar = sidecar
        self.market = Market(rng)
        self.tally = Tally()
        self.run_id = run_id
        self.trade_ids: set[str] = set()
        self._rng = rng
        self._open: deque[_OpenTrade] = deque()
        self._follow_ups: deque[dict[str, Any]] = deque()
        self._ids = 0

    def _next_id(self, kind: str) -> str:
        self._ids += 1
        return f"DEMO-{self.run_id}-{kind}{self._ids:07d}"

    def step(self, now: float) -> None:
        """Record one signal, trade or execution update."""
        if self._follow_ups:
            self._open_trade(self._follow_ups.popleft(), now)
        elif self._open and self._open[0].closes_at <= now:
            self._close_trade(self._open.popleft())
        else:
            self._signal()

    def _signal(self) -> None:
        rng = self._rng
        symbol = rng.choice(list(SYMBOLS))
        price = self.market.step(symbol)
        side = rng.choice(("BUY", "SELL"))
        stop, target = _levels(price, side, rng)
        signal = {
            "signal_id": self._next_id("S"),
            "symbol": symbol,
            "timeframe": rng.choice(TIMEFRAMES),
            "signal_type": side,
            "confidence": Decimal(rng.randint(50, 97)) / 100,
            "entry_price": price,
            "stop_loss": stop,
            "take_profit": target,
            "session": trading_session(utc_now()),
            "pattern_type": rng.choice(PATTERNS),
            "generated_at": utc_now(),
        }
        self.sidecar.record_signal(signal)
        self.tally.signals += 1
        if rng.random() < 0.5:
            self._follow_ups.append(signal)

    def _open_trade(self, signal: dict[str, Any], now: float) -> None:
        rng = self._rng
        price = self.market.step(signal["symbol"])
        trade = {
            "trade_id": self._next_id("T"),
            "signal_id": signal["signal_id"],
            "account_id": "DEMO-ACCOUNT",
            "symbol": signal["symbol"],
            "direction": signal["signal_type"],
            "entry_time": utc_now(),
            "entry_price": price,
            "stop_loss": signal["stop_loss"],
            "take_profit": signal["take_profit"],
            "position_size": Decimal(rng.choice((1000, 5000, 10000, 50000, 100000))),
            "session": signal["session"],
            "pattern_type": signal["pattern_type"],
            "confidence_score": signal["confidence"],
            "risk_reward_ratio": Decimal("2.0"),
        }
        self.sidecar.record_trade(trade)
        self.sidecar.update_signal_execution(signal["signal_id"], executed=True, execution_status="FILLED")
        self.tally.trades_opened += 1
        self.tally.executions += 1
        self.trade_ids.add(trade["trade_id"])
        self._open.append(_OpenTrade(trade, now + rng.uniform(1.0, 6.0)))

    def _close_trade(self, position: _OpenTrade) -> None:
        trade = position.data
        exit_price = self.market.step(trade["symbol"])
        sign = 1 if trade["direction"] == "BUY" else -1
        move = (exit_price - trade["entry_price"]) * sign
        closed = {
            **trade,
            "exit_time": utc_now(),
            "exit_price": exit_price,
            "pnl": (move * trade["position_size"]).quantize(Decimal("0.01")),
            "pnl_percentage": (move / trade["entry_price"] * 100).quantize(Decimal("0.0001")),
        }
        self.sidecar.record_trade(closed)
        self.tally.trades_closed += 1


def _levels(price: Decimal, side: str, rng: random.Random) -> tuple[Decimal, Decimal]:
    risk = price * Decimal(str(round(rng.uniform(0.001, 0.003), 4)))
    places = price.as_tuple().exponent
    quantum = Decimal(1).scaleb(places if isinstance(places, int) else -5)
    if side == "BUY":
        return (price - risk).quantize(quantum), (price + 2 * risk).quantize(quantum)
    return (price + risk).quantize(quantum), (price - 2 * risk).quantize(quantum)


class Latencies:
    """Record-to-commit latencies from the sidecar's ``BatchCommitted`` events, and breaker transitions."""

    def __init__(self) -> None:
        self.all = array("d")
        self.recent: deque[float] = deque(maxlen=2000)
        self.openings = 0
        self.closings = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, BatchCommitted):
            for _, latency in event.latencies:
                self.all.append(latency)
                self.recent.append(latency)
        elif isinstance(event, BreakerChanged):
            if event.to_state == "open":
                self.openings += 1
            elif event.to_state == "closed":
                self.closings += 1

    @staticmethod
    def p95(values: Any) -> float | None:
        """The 95th percentile in seconds, or ``None`` without data."""
        ordered = sorted(values)
        if not ordered:
            return None
        return float(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))])


class Chaos:
    """Takes the database away now and then: :class:`~persistence.testing.DatabaseLock` holds its write lock."""

    def __init__(self, database_url: str) -> None:
        self._lock = DatabaseLock(database_url)
        self.outages = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Alternate calm and outage until ``stop`` is set; the lock is always released on the way out."""
        try:
            delay = CHAOS_FIRST_AFTER
            while not await _wait(stop, delay):
                await self._lock.acquire()
                self.outages += 1
                log.debug("chaos_lock_taken", hold_seconds=CHAOS_HOLD)
                await _wait(stop, CHAOS_HOLD)
                await self.release()
                delay = CHAOS_CALM
        finally:
            await self.release()

    async def release(self) -> None:
        """Give the database back (idempotent)."""
        if self._lock.held:
            await self._lock.release()
            log.debug("chaos_lock_released")


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` or until ``event`` is set; whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()


@dataclass(slots=True)
class DemoResult:
    """What the summary reports."""

    run_id: str
    seconds: float
    tally: Tally
    counts: dict[str, int]
    trades_recorded: int
    trades_in_database: int
    trade_rows: int
    closed_in_database: int
    p95: float | None
    breaker_openings: int
    chaos_outages: int
    journal_left: int
    notes: list[str] = field(default_factory=list)

    @property
    def missing(self) -> int:
        """Trades recorded in this run that are not in the database."""
        return self.trades_recorded - self.trades_in_database


async def run_demo(
    settings: Settings,
    options: DemoOptions,
    out: TextIO | None = None,
    overrides: dict[str, tuple[str, Any]] | None = None,
) -> int:
    """Run the demo until ``options.duration`` passes or a signal arrives; returns the exit status.

    ``overrides`` are the demo defaults applied to ``settings`` (see :func:`demo_overrides`), printed at the start.
    """
    overrides = overrides if overrides is not None else {}
    console = StatusConsole(out)
    configure_console_logging(settings, console)
    run_id = secrets.token_hex(3)
    rng = random.Random(options.seed)  # noqa: S311 - a simulation, not cryptography
    path = sqlite_path(settings.url) if settings.is_sqlite else None
    latencies = Latencies()
    sidecar = PersistenceSidecar(settings, retry=DEMO_RETRY, log_events=False)
    event_logger = EventLogger(secrets=settings.secrets)
    # At INFO an outage is two lines (database_outage, database_recovered); DEBUG shows every sidecar event.
    sidecar.events.subscribe(event_logger if settings.log_level == "DEBUG" else OutageSummary(event_logger, log))
    sidecar.events.subscribe(latencies)
    server = ApiServer(create_app(sidecar=sidecar), settings.api_host, settings.api_port)

    console.line("persistence-sidecar demo: a simulated orchestrator with the sidecar embedded")
    console.line(f"  database  {path.resolve() if path is not None else settings.safe_database_url}")
    console.line(f"  journal   {settings.journal_dir.resolve()}")
    console.line(f"  API       {server.base_url}/api/v1/trades/history   (health: {server.base_url}/api/v1/health)")
    console.line(f"  metrics   {server.base_url}/metrics")
    chaos_note = f", chaos on (the database locked {CHAOS_HOLD:g} s in every {CHAOS_CALM:g} s)" if options.chaos else ""
    length = f"{options.duration:g} s" if options.duration is not None else "until Ctrl-C"
    console.line(f"  running   {options.rate:g} records/s, {length}{chaos_note}")
    console.line(f"  defaults  {describe_overrides(overrides)}")

    stop = asyncio.Event()
    hurry = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            hurry.set()
        stop.set()

    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)

    started = time.monotonic()
    orchestrator = Orchestrator(sidecar, rng, run_id)
    chaos = Chaos(settings.database_url) if options.chaos else None
    chaos_task: asyncio.Task[None] | None = None
    try:
        await sidecar.start()
        await server.start()
        if chaos is not None:
            chaos_task = asyncio.create_task(chaos.run(stop), name="demo-chaos")
        await _simulate(orchestrator, sidecar, latencies, console, options, stop, started)
        stopped_by_signal = stop.is_set()
        stop.set()
        console.end_status()
        if chaos_task is not None:
            await chaos_task
        reason = "signal received" if stopped_by_signal else "duration reached"
        console.line(f"stopping ({reason}): waiting for the backlog to reach the database (Ctrl-C again to skip)")
        await _drain(sidecar, hurry, settings)
        await server.stop()
    finally:
        stop.set()
        if chaos is not None:
            await chaos.release()
        if chaos_task is not None and not chaos_task.done():
            chaos_task.cancel()
        await sidecar.close()
        for sig in installed:
            loop.remove_signal_handler(sig)
    result = await _result(settings, sidecar, orchestrator, latencies, chaos, time.monotonic() - started)
    _print_summary(console, result)
    return 1 if result.counts["dropped"] else 0


async def _simulate(
    orchestrator: Orchestrator,
    sidecar: PersistenceSidecar,
    latencies: Latencies,
    console: StatusConsole,
    options: DemoOptions,
    stop: asyncio.Event,
    started: float,
) -> None:
    tick = 0.01
    window: deque[tuple[float, int]] = deque([(started, 0)])
    next_status = started
    while not stop.is_set():
        now = time.monotonic()
        elapsed = now - started
        if options.duration is not None and elapsed >= options.duration:
            break
        due = int(elapsed * options.rate) - orchestrator.tally.records
        for _ in range(max(due, 0)):
            orchestrator.step(now)
        if now >= next_status:
            window.append((now, orchestrator.tally.records))
            while len(window) > 2 and now - window[0][0] > 5.0:
                window.popleft()
            line, fields = _status(sidecar, latencies, window, elapsed)
            console.status(line, **fields)
            next_status = now + 0.5
        await _wait(stop, tick)


def _status(
    sidecar: PersistenceSidecar,
    latencies: Latencies,
    window: deque[tuple[float, int]],
    elapsed: float,
) -> tuple[str, dict[str, Any]]:
    """The status line for a terminal, and the same figures as log fields."""
    (t0, n0), (t1, n1) = window[0], window[-1]
    rate = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
    health = sidecar.health().to_dict()
    p95 = Latencies.p95(latencies.recent)
    fields: dict[str, Any] = {
        "elapsed_s": round(elapsed),
        "rate_per_s": round(rate),
        "persisted": health["counts"]["persisted"],
        "queue": health["queue"],
        "journal": health["journal"],
        "breaker": health["breaker"],
        "p95_ms": round(p95 * 1000, 1) if p95 is not None else None,
    }
    line = (
        f"{elapsed:5.0f}s  {rate:4.0f} rec/s  persisted {fields['persisted']:<6}"
        f"  queue {fields['queue']:<5}  journal {fields['journal']:<5}  breaker {fields['breaker']:<9}"
        f"  p95 {_duration(p95)}"
    )
    return line, fields


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds >= 1.0:
        return f"{seconds:.1f} s"
    return f"{seconds * 1000:.1f} ms"


async def _drain(sidecar: PersistenceSidecar, hurry: asyncio.Event, settings: Settings) -> None:
    """Wait for everything recorded to be committed: an open breaker needs its reset period to half-open first."""
    budget = settings.breaker_reset_seconds + settings.shutdown_timeout + 5.0
    flush = asyncio.create_task(sidecar.flush(timeout=budget))
    skip = asyncio.create_task(hurry.wait())
    try:
        await asyncio.wait({flush, skip}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        skip.cancel()
        if not flush.done():
            flush.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await flush


async def _result(
    settings: Settings,
    sidecar: PersistenceSidecar,
    orchestrator: Orchestrator,
    latencies: Latencies,
    chaos: Chaos | None,
    seconds: float,
) -> DemoResult:
    health = sidecar.health().to_dict()
    result = DemoResult(
        run_id=orchestrator.run_id,
        seconds=seconds,
        tally=orchestrator.tally,
        counts=dict(health["counts"]),
        trades_recorded=len(orchestrator.trade_ids),
        trades_in_database=0,
        trade_rows=0,
        closed_in_database=0,
        p95=Latencies.p95(latencies.all),
        breaker_openings=latencies.openings,
        chaos_outages=chaos.outages if chaos is not None else 0,
        journal_left=0,
    )
    if not settings.enabled:
        result.notes.append("persistence is disabled (ENABLE_DATABASE_PERSISTENCE=false): nothing was written")
        return result
    database = create_database(settings)
    prefix = f"DEMO-{orchestrator.run_id}-%"
    try:
        async with database.read() as connection:
            row = (
                await connection.execute(
                    text(
                        "SELECT COUNT(*), COUNT(DISTINCT trade_id),"
                        " SUM(CASE WHEN exit_price IS NOT NULL THEN 1 ELSE 0 END)"
                        " FROM trades WHERE trade_id LIKE :prefix"
                    ),
                    {"prefix": prefix},
                )
            ).one()
        result.trade_rows, result.trades_in_database, result.closed_in_database = (int(v or 0) for v in row)
    except Exception as exc:
        result.notes.append(f"could not count the trades in the database: {type(exc).__name__}")
    finally:
        await database.dispose()
    journal = Journal(settings.journal_dir, read_only=True)
    try:
        result.journal_left = journal.pending
    finally:
        journal.close()
    return result


def _print_summary(console: StatusConsole, result: DemoResult) -> None:
    tally, counts = result.tally, result.counts
    rows = [
        ("duration", f"{result.seconds:.1f} s (run {result.run_id})"),
        (
            "recorded",
            f"{tally.records} records: {tally.signals} signals, {tally.executions} executions,"
            f" {tally.trades_opened} trades opened, {tally.trades_closed} closed",
        ),
        ("persisted", str(counts["persisted"])),
        ("journaled", f"{counts['journaled']} (spilled to disk during outages; {result.journal_left} still waiting)"),
        ("dead-lettered", str(counts["dead_lettered"])),
        ("dropped", str(counts["dropped"])),
        (
            "trades in db",
            f"{result.trades_in_database} distinct of {result.trades_recorded} recorded this run"
            f" ({result.trade_rows} rows, {result.closed_in_database} closed); missing {result.missing}",
        ),
        ("p95 latency", f"{_duration(result.p95)} from record to commit"),
        ("breaker", f"opened {result.breaker_openings} time(s); chaos outages {result.chaos_outages}"),
    ]
    console.line("")
    console.line("summary")
    for name, value in rows:
        console.line(f"  {name:<14} {value}")
    for note in result.notes:
        console.line(f"  note: {note}")


def main(settings: Settings, options: DemoOptions) -> int:
    """Run the demo in a new event loop (the CLI's entry point)."""
    overrides = demo_overrides()
    return asyncio.run(run_demo(demo_settings(settings), options, sys.stdout, overrides))
