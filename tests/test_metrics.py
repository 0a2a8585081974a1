"""Prometheus metrics: the SPEC's names, types and labels, scraped over real HTTP from the PERSISTENCE_METRICS_PORT
exporter, and moved by a real outage (another connection holding the database lock, a fake clock for the breaker)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from persistence import DeadLetteredError, PersistenceSidecar
from persistence.config import Settings
from persistence.observe.metrics import LATENCY_BUCKETS, SidecarMetrics, observe_all, render
from persistence.testing import FakeClock
from persistence.write.journal import Journal
from tests.support import DatabaseLock, add_poison_trigger_sqlite, eventually, sqlite_file
from tests.support.factories import make_signal, make_trade
from tests.support.metrics import PROMTOOL, PROMTOOL_SKIP, SPEC_METRICS, Scrape, free_port, scrape
from tests.support.sidecars import build

SettingsFactory = Callable[..., Settings]
ENTITIES = ("trade", "signal", "snapshot", "parameter_change")
STATES = ("closed", "open", "half_open")

# ---------------------------------------------------------------------------------------------- helpers


def one_hot(scraped: Scrape) -> dict[str, float]:
    return {state: scraped.value("persistence_circuit_breaker_state", state=state) for state in STATES}


def transitions(scraped: Scrape) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["from_state"], dict(labels)["to_state"]): scraped.value(
            "persistence_circuit_breaker_transitions_total", **dict(labels)
        )
        for labels in scraped.labelsets("persistence_circuit_breaker_transitions_total")
    }


def key_series(scraped: Scrape) -> dict[str, Any]:
    """The values a dashboard shows, for the report of an outage."""
    return {
        "writes_success": scraped.total("persistence_writes_total", outcome="success"),
        "writes_failure": scraped.total("persistence_writes_total", outcome="failure"),
        "retries": scraped.value("persistence_retries_total"),
        "breaker": next(state for state, value in one_hot(scraped).items() if value == 1),
        "queue": scraped.value("persistence_queue_depth"),
        "journal": scraped.value("persistence_journal_records"),
        "loss_window_s": scraped.value("persistence_oldest_unpersisted_age_seconds"),
        "dead_letters": scraped.total("persistence_dead_letters_total"),
        "dropped": scraped.total("persistence_dropped_records_total"),
        "transitions": {f"{a}->{b}": v for (a, b), v in transitions(scraped).items() if v},
    }


def _listening_addresses(port: int) -> set[str]:
    """Local addresses listening on ``port``, from /proc/net/tcp and tcp6 (LISTEN is state 0A)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        lines = Path(table).read_text().splitlines()[1:] if Path(table).exists() else []
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                if len(address) == 8:
                    octets = bytes.fromhex(address)[::-1]
                    found.add(f"{'.'.join(str(octet) for octet in octets)}:{port}")
                else:
                    found.add(f"[{address}]:{port}")
    return found


def exporter_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("persistence-metrics")]


# ---------------------------------------------------------------------------------------------- names, types, labels


async def test_a_scrape_has_every_spec_metric_with_its_type_and_label_names(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    port = free_port()
    sidecar = build(sidecar_settings(sqlite_url, metrics_port=port), sidecars)
    await sidecar.start()
    scraped = await scrape(port)
    ours = {name: kind for name, kind in scraped.types.items() if name.startswith("persistence_")}
    # _created series are prometheus_client's companions of counters and histograms, not metrics of their own.
    assert {name for name in ours if not name.endswith("_created")} == set(SPEC_METRICS)
    for name, (kind, labels) in SPEC_METRICS.items():
        assert ours[name] == kind, name
        names = {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        series = [sample for sample in scraped.samples if sample.name in names]
        assert series, f"{name} has no series at start-up"
        for sample in series:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)


async def test_every_labelled_series_exists_at_zero_before_the_first_write(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    port = free_port()
    sidecar = build(sidecar_settings(sqlite_url, metrics_port=port), sidecars)
    await sidecar.start()
    scraped = await scrape(port)
    for entity in ENTITIES:
        for outcome in ("success", "failure"):
            assert scraped.value("persistence_writes_total", entity=entity, outcome=outcome) == 0
        assert scraped.value("persistence_dead_letters_total", entity=entity) == 0
        assert scraped.value("persistence_write_latency_seconds_count", entity=entity) == 0
        assert scraped.value("persistence_dropped_records_total", entity=entity, reason="journal_unavailable") == 0
    assert set(transitions(scraped)) == {
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
        ("half_open", "open"),
    }
    assert set(transitions(scraped).values()) == {0}
    assert scraped.value("persistence_enabled") == 1
    assert scraped.value("persistence_retries_total") == 0


async def test_breaker_state_is_one_hot_with_all_three_series_present_from_start_up(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    port = free_port()
    sidecar = build(sidecar_settings(sqlite_url, metrics_port=port), sidecars)
    await sidecar.start()
    assert one_hot(await scrape(port)) == {"closed": 1, "open": 0, "half_open": 0}


async def test_latency_buckets_run_from_half_a_millisecond_to_ten_seconds(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    port = free_port()
    sidecar = build(sidecar_settings(sqlite_url, metrics_port=port), sidecars)
    await sidecar.start()
    scraped = await scrape(port)
    bounds = sorted(
        float(s.labels["le"])
        for s in scraped.samples
        if s.name == "persistence_write_latency_seconds_bucket" and s.labels["entity"] == "trade"
    )
    assert bounds[0] == 0.0005 and bounds[-2] == 10.0 and bounds[-1] == float("inf")


# ---------------------------------------------------------------------------------------------- events move them


async def test_committed_records_count_as_successes_with_latency_and_batch_size_per_entity(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    port = free_port()
    sidecar = build(sidecar_settings(sqlite_url, metrics_port=port), sidecars)
    await sidecar.start()
    signal = make_signal()
    for _ in range(3):
        sidecar.record_trade(make_trade())
    sidecar.record_signal(signal)
    sidecar.update_signal_execution(signal.signal_id, executed=True, execution_status="FILLED")
    await sidecar.flush(timeout=10)
    scraped = await scrape(port)
    assert scraped.value("persistence_writes_total", entity="trade", outcome="success") == 3
    assert scraped.value("persistence_writes_total", entity="signal", outcome="success") == 2
    assert scraped.value("persistence_write_latency_seconds_count", entity="trade") == 3
    assert scraped.value("persistence_batch_size_sum") == 5
    assert scraped.total("persistence_writes_total", outcome="failure") == 0


async def test_a_real_outage_moves_failures_retries_transitions_depths_and_the_loss_window(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    clock = FakeClock()
    port = free_port()
    settings = sidecar_settings(sqlite_url, metrics_port=port, max_pending=20, query_timeout_ms=100)
    sidecar = build(settings, sidecars, clock=clock)
    await sidecar.start()
    for _ in range(10):
        sidecar.record_trade(make_trade())
    await sidecar.flush(timeout=10)
    before = await scrape(port)
    assert key_series(before) == {
        "writes_success": 10,
        "writes_failure": 0,
        "retries": 0,
        "breaker": "closed",
        "queue": 0,
        "journal": 0,
        "loss_window_s": 0,
        "dead_letters": 0,
        "dropped": 0,
        "transitions": {},
    }

    lock = DatabaseLock(sqlite_url)
    await lock.acquire()
    try:
        first = sidecar.record_trade(make_trade())
        await eventually(lambda: sidecar.breaker_state == "open")
        opened = await scrape(port)
        assert one_hot(opened) == {"closed": 0, "open": 1, "half_open": 0}
        assert transitions(opened)[("closed", "open")] == 1
        # Five failed attempts of the one queued trade, each after one retry (the policy allows two attempts).
        assert opened.value("persistence_writes_total", entity="trade", outcome="failure") == 5
        assert opened.value("persistence_retries_total") == 5

        for _ in range(100):
            sidecar.record_trade(make_trade())
        await eventually(lambda: sidecar.journal_depth() > 0)
        clock.advance(12.0)  # time passes in the outage; the journal's sync interval too
        await eventually(lambda: first.status == "journaled" and sidecar.journal_depth() == 101)
        during = await scrape(port)
        # Everything has waited longer than the sync interval in an outage: all of it is journaled, and RAM keeps at
        # most PERSISTENCE_MAX_PENDING of it as the fast path (a record may be in both).
        assert during.value("persistence_journal_records") == 101
        assert 0 < during.value("persistence_queue_depth") <= 20
        assert during.value("persistence_oldest_unpersisted_age_seconds") >= 12.0
        assert during.value("persistence_writes_total", entity="trade", outcome="success") == 10
        clock.advance(5.0)
        assert (await scrape(port)).value("persistence_oldest_unpersisted_age_seconds") >= 17.0
    finally:
        await lock.release()

    clock.advance(30)  # the breaker's reset period: half-open, one probe, closed, backfill
    await sidecar.flush(timeout=20)
    after = await scrape(port)
    assert one_hot(after) == {"closed": 1, "open": 0, "half_open": 0}
    assert transitions(after) == {
        ("closed", "open"): 1,
        ("open", "half_open"): 1,
        ("half_open", "closed"): 1,
        ("half_open", "open"): 0,
    }
    assert after.value("persistence_queue_depth") == 0
    assert after.value("persistence_journal_records") == 0
    assert after.value("persistence_oldest_unpersisted_age_seconds") == 0
    assert after.value("persistence_writes_total", entity="trade", outcome="success") == 111
    assert after.value("persistence_writes_total", entity="trade", outcome="failure") == 5
    print("\nOUTAGE", {"before": key_series(before), "during": key_series(during), "after": key_series(after)})


async def test_a_poison_record_is_counted_once_as_a_dead_letter_and_not_as_a_failure(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    port = free_port()
    sidecar = build(sidecar_settings(sqlite_url, metrics_port=port), sidecars)
    await sidecar.start()
    add_poison_trigger_sqlite(sqlite_file(sqlite_url), "POISON-1")
    good = [sidecar.record_trade(make_trade()) for _ in range(4)]
    with pytest.raises(DeadLetteredError):
        await sidecar.record_trade(make_trade(trade_id="POISON-1"))
    await asyncio.gather(*good)
    scraped = await scrape(port)
    assert scraped.value("persistence_dead_letters_total", entity="trade") == 1
    assert scraped.total("persistence_dead_letters_total") == 1
    assert scraped.value("persistence_writes_total", entity="trade", outcome="success") == 4
    assert scraped.total("persistence_writes_total", outcome="failure") == 0
    assert transitions(scraped)[("closed", "open")] == 0


async def test_an_unreadable_journal_record_is_counted_as_dropped_by_entity_and_reason(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any], tmp_path: Path
) -> None:
    journal = Journal(tmp_path / "journal")
    journal.append([{"v": 1, "run": "earlier", "seq": 1, "kind": "trade", "cid": None, "data": {"trade_id": ""}}])
    journal.sync()
    journal.close()
    port = free_port()
    with capture_logs() as logs:
        sidecar = build(sidecar_settings(sqlite_url, metrics_port=port), sidecars)
        await sidecar.start()
        await sidecar.flush(timeout=10)
        await eventually(lambda: sidecar.journal_depth() == 0)
    scraped = await scrape(port)
    assert scraped.value("persistence_dropped_records_total", entity="trade", reason="corrupt_journal") == 1
    assert scraped.total("persistence_dropped_records_total") == 1
    assert [line["event"] for line in logs if line["event"] == "records_dropped"] == ["records_dropped"]


async def test_persistence_enabled_follows_the_run_time_flag(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url), sidecars)
    await sidecar.start()
    assert sidecar.registry.get_sample_value("persistence_enabled") == 1
    await sidecar.set_enabled(False)
    assert sidecar.registry.get_sample_value("persistence_enabled") == 0
    assert sidecar.registry.get_sample_value("persistence_circuit_breaker_state", {"state": "closed"}) == 1
    await sidecar.set_enabled(True)
    assert sidecar.registry.get_sample_value("persistence_enabled") == 1


# ---------------------------------------------------------------------------------------------- registries


async def test_each_sidecar_has_its_own_registry_unless_one_is_passed_in(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any], tmp_path: Path
) -> None:
    first = build(sidecar_settings(sqlite_url), sidecars)
    second = build(sidecar_settings(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}"), sidecars)
    assert first.registry is not second.registry
    await first.start()
    await first.record_trade(make_trade())
    assert first.registry.get_sample_value("persistence_writes_total", {"entity": "trade", "outcome": "success"}) == 1
    assert second.registry.get_sample_value("persistence_writes_total", {"entity": "trade", "outcome": "success"}) == 0

    host_registry = CollectorRegistry()
    third = build(sidecar_settings(sqlite_url), sidecars, registry=host_registry)
    assert third.registry is host_registry
    assert host_registry.get_sample_value("persistence_enabled") == 1
    body, content_type = render(host_registry)
    assert b"persistence_circuit_breaker_state" in body and content_type.startswith("text/plain")


class _FixedSource:
    """A metrics source frozen in one breaker state."""

    def __init__(self, state: str) -> None:
        self.breaker_state = state
        self.enabled = True

    def queue_depth(self) -> int:
        return 0

    def journal_depth(self) -> int:
        return 0

    def oldest_unpersisted_age(self) -> float:
        return 0.0


@pytest.mark.parametrize("state", STATES)
def test_the_breaker_state_gauge_is_one_hot_in_every_state(state: str) -> None:
    registry = CollectorRegistry()
    SidecarMetrics(registry, _FixedSource(state))
    scraped = Scrape.parse(render(registry)[0].decode())
    assert one_hot(scraped) == {name: float(name == state) for name in STATES}


class _RacingSource:
    """A metrics source whose reads fail the way a read racing the event loop can (IndexError on an emptied deque)."""

    def __init__(self) -> None:
        self.fail = False

    @property
    def enabled(self) -> bool:
        return True

    @property
    def breaker_state(self) -> str:
        if self.fail:
            raise RuntimeError("the writer was replaced mid-read")
        return "open"

    def queue_depth(self) -> int:
        if self.fail:
            raise IndexError("deque index out of range")
        return 7

    def journal_depth(self) -> int:
        return 3

    def oldest_unpersisted_age(self) -> float:
        if self.fail:
            raise AttributeError("'NoneType' object has no attribute 'oldest_unpersisted_age'")
        return 4.5


def test_a_gauge_read_that_races_the_writer_never_breaks_a_scrape_and_keeps_the_last_value() -> None:
    source = _RacingSource()
    registry = CollectorRegistry()
    SidecarMetrics(registry, source)
    assert registry.get_sample_value("persistence_queue_depth") == 7
    assert registry.get_sample_value("persistence_circuit_breaker_state", {"state": "open"}) == 1
    source.fail = True
    scraped = Scrape.parse(render(registry)[0].decode())
    assert scraped.value("persistence_queue_depth") == 7
    assert scraped.value("persistence_oldest_unpersisted_age_seconds") == 4.5
    assert scraped.value("persistence_circuit_breaker_state", state="open") == 1


# ---------------------------------------------------------------------------------------------- the exporter


async def test_the_exporter_serves_on_127_0_0_1_only_and_stops_with_close(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    port = free_port()
    sidecar = build(sidecar_settings(sqlite_url, metrics_port=port), sidecars)
    assert exporter_threads() == []
    await sidecar.start()
    assert exporter_threads() == [f"persistence-metrics-{port}"]
    assert (await scrape(port)).value("persistence_enabled") == 1
    listening = _listening_addresses(port)
    assert listening == {f"127.0.0.1:{port}"}, listening
    await sidecar.close()
    assert exporter_threads() == []
    with pytest.raises(httpx.ConnectError):
        await scrape(port)
    assert _listening_addresses(port) == set()
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))  # the listening socket was closed (our scrape may leave a TIME_WAIT)
        again.listen()


async def test_a_taken_metrics_port_is_logged_and_does_not_stop_start_up(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        sidecar = build(sidecar_settings(sqlite_url, metrics_port=port), sidecars)
        with capture_logs() as logs:
            await sidecar.start()
        assert await sidecar.record_trade(make_trade()) == "persisted"
    [failure] = [line for line in logs if line["event"] == "metrics_exporter_failed"]
    assert failure["log_level"] == "error" and failure["port"] == port and failure["error_class"] == "OSError"
    assert exporter_threads() == []


async def test_with_persistence_off_no_exporter_thread_is_started_and_the_skip_is_logged(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    port = free_port()
    threads_before = {thread.name for thread in threading.enumerate()}
    sidecar = build(sidecar_settings(sqlite_url, metrics_port=port, enabled=False), sidecars)
    with capture_logs() as logs:
        await sidecar.start()
    assert {thread.name for thread in threading.enumerate()} == threads_before
    with pytest.raises(httpx.ConnectError):
        await scrape(port)
    assert sidecar.registry.get_sample_value("persistence_enabled") == 0
    [skipped] = [line for line in logs if line["event"] == "metrics_exporter_skipped"]
    assert skipped["reason"] == "persistence_disabled"


async def test_without_a_metrics_port_no_exporter_is_started(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url), sidecars)
    await sidecar.start()
    assert exporter_threads() == []


# ---------------------------------------------------------------------------------------------- promtool


@pytest.mark.skipif(PROMTOOL is None, reason=PROMTOOL_SKIP)
async def test_promtool_check_metrics_passes_on_a_scrape_after_traffic(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    assert PROMTOOL is not None
    port = free_port()
    sidecar: PersistenceSidecar = build(sidecar_settings(sqlite_url, metrics_port=port), sidecars)
    await sidecar.start()
    for _ in range(5):
        sidecar.record_trade(make_trade())
    await sidecar.flush(timeout=10)
    scraped = await scrape(port)
    result = await asyncio.to_thread(
        subprocess.run,
        [PROMTOOL, "check", "metrics"],
        input=scraped.text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", "promtool lint findings:\n" + result.stderr


def test_a_batch_of_latencies_moves_the_histogram_as_observing_each_one_does() -> None:
    """observe_all (one update per bucket for a batch) against prometheus_client's own observe, bound by bound."""
    amounts = [0.0, 0.0001, *LATENCY_BUCKETS, *(bound * 1.0001 for bound in LATENCY_BUCKETS), 11.0, 1e9, 0.03] * 3

    def exposition(observe: Callable[[Any, list[float]], None]) -> dict[tuple[str, str], float]:
        registry = CollectorRegistry()
        histogram = Histogram("latency", "", ["entity"], buckets=LATENCY_BUCKETS, registry=registry)
        observe(histogram.labels(entity="trade"), amounts)
        return {
            (sample.name, sample.labels.get("le", "")): sample.value
            for family in text_string_to_metric_families(render(registry)[0].decode())
            for sample in family.samples
            if not sample.name.endswith("_created")
        }

    def one_by_one(child: Any, values: list[float]) -> None:
        for value in values:
            child.observe(value)

    expected, batched = exposition(one_by_one), exposition(observe_all)
    assert batched.pop(("latency_sum", "")) == pytest.approx(expected.pop(("latency_sum", "")), rel=1e-12)
    assert batched == expected
    assert expected[("latency_count", "")] == len(amounts)
