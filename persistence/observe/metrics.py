"""Prometheus metrics for one sidecar, driven by its events and by live gauges.

Every sidecar has its own :class:`~prometheus_client.CollectorRegistry` unless one is passed in, so two sidecars
(or two tests) never collide on a second registration. Counters and histograms move only in response to events
from the write path; gauges (queue, journal, loss window, breaker state, flag) are read from the sidecar at scrape
time. Label values come from fixed sets and every series exists from start-up, so dashboards and alert rules see
zeros rather than gaps.
"""

from __future__ import annotations

import contextlib
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from persistence.observe.events import (
    BatchCommitted,
    BreakerChanged,
    Event,
    RecordDeadLettered,
    RecordsDropped,
    WriteFailed,
    WriteRetried,
)
from persistence.records.models import ENTITIES, Entity

BREAKER_STATES = ("closed", "open", "half_open")
BREAKER_TRANSITIONS = (("closed", "open"), ("open", "half_open"), ("half_open", "closed"), ("half_open", "open"))
DROP_REASONS = ("journal_unavailable", "corrupt_journal", "other")
"""Why records were dropped; a reason the writer gives that is not listed here is counted as ``other``."""
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class MetricsSource(Protocol):
    """What the gauges read at scrape time."""

    @property
    def enabled(self) -> bool: ...
    @property
    def breaker_state(self) -> str: ...
    def queue_depth(self) -> int: ...
    def journal_depth(self) -> int: ...
    def oldest_unpersisted_age(self) -> float: ...


class SidecarMetrics:
    """The metric families of one sidecar; call it with every event.

    ``persistence_writes_total{outcome="failure"}`` counts the records of a write attempt that failed after its
    retries (one breaker failure); a record that fails again on the next attempt is counted again, so the failure
    ratio is per attempt. Records refused for their data are not failures: they are counted once in
    ``persistence_dead_letters_total``. ``registry`` must not already hold these metrics (one registry per sidecar).
    """

    def __init__(self, registry: CollectorRegistry, source: MetricsSource) -> None:
        self.registry = registry
        entity_labels = (*ENTITIES, "unknown")
        self.writes = Counter(
            "persistence_writes_total",
            "Records per write attempt, by entity and outcome.",
            ["entity", "outcome"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "persistence_dead_letters_total", "Records that can never be written.", ["entity"], registry=registry
        )
        self.dropped = Counter(
            "persistence_dropped_records_total",
            "Records lost: neither written nor journaled.",
            ["entity", "reason"],
            registry=registry,
        )
        self.retries = Counter("persistence_retries_total", "Retries of transient write errors.", registry=registry)
        self.latency = Histogram(
            "persistence_write_latency_seconds",
            "Seconds from record_* to commit.",
            ["entity"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "persistence_batch_size", "Records per committed transaction.", buckets=BATCH_BUCKETS, registry=registry
        )
        self.transitions = Counter(
            "persistence_circuit_breaker_transitions_total",
            "Circuit breaker state changes.",
            ["from_state", "to_state"],
            registry=registry,
        )
        for entity in ENTITIES:
            for outcome in ("success", "failure"):
                self.writes.labels(entity=entity, outcome=outcome)
            self.dead_letters.labels(entity=entity)
            self.latency.labels(entity=entity)
        for label in entity_labels:
            for reason in DROP_REASONS:
                self.dropped.labels(entity=label, reason=reason)
        for from_state, to_state in BREAKER_TRANSITIONS:
            self.transitions.labels(from_state=from_state, to_state=to_state)

        _gauge(registry, "persistence_queue_depth", "Records waiting in RAM.", source.queue_depth)
        _gauge(registry, "persistence_journal_records", "Records waiting in the journal.", source.journal_depth)
        _gauge(
            registry,
            "persistence_oldest_unpersisted_age_seconds",
            "Age of the oldest record not yet committed: the live loss window.",
            source.oldest_unpersisted_age,
        )
        _gauge(registry, "persistence_enabled", "1 when persistence is enabled, else 0.", lambda: float(source.enabled))
        state = Gauge(
            "persistence_circuit_breaker_state", "Circuit breaker state, one-hot.", ["state"], registry=registry
        )
        for name in BREAKER_STATES:
            state.labels(state=name).set_function(_LiveValue(_is_state(source, name)))

    def __call__(self, event: Event) -> None:
        """Move the counters and histograms for one event from the write path."""
        match event:
            case BatchCommitted():
                for entity, count in event.by_entity.items():
                    self.writes.labels(entity=entity, outcome="success").inc(count)
                latencies: dict[Entity, list[float]] = {}
                for name, latency in event.latencies:
                    amounts = latencies.get(name)
                    if amounts is None:
                        amounts = latencies[name] = []
                    amounts.append(latency)
                for name, amounts in latencies.items():
                    observe_all(self.latency.labels(entity=name), amounts)
                self.batch_size.observe(event.records)
            case WriteFailed() if event.records:
                for entity, count in event.by_entity.items():
                    self.writes.labels(entity=entity, outcome="failure").inc(count)
            case WriteRetried():
                self.retries.inc()
            case RecordDeadLettered():
                self.dead_letters.labels(entity=event.entity).inc()
            case RecordsDropped():
                label = event.entity if event.entity in ENTITIES else "unknown"
                reason = event.reason if event.reason in DROP_REASONS else "other"
                self.dropped.labels(entity=label, reason=reason).inc(event.count)
            case BreakerChanged():
                self.transitions.labels(from_state=event.from_state, to_state=event.to_state).inc()
            case _:
                pass


def observe_all(histogram: Any, amounts: Sequence[float]) -> None:
    """``histogram.observe(amount)`` for each of ``amounts``: the same buckets and sum, one update of each.

    A batch's records each have their latency, observed one by one; ``prometheus_client`` has no bulk observe, and
    observing a record took a lock per bucket and per sum, a microsecond or more. Here each amount's bucket is found
    by bisection (``amount <= bound``, as ``observe`` does), then the sum (equal up to float rounding) and each bucket
    that moved take one update.
    A histogram without those internals (another ``prometheus_client``) is observed one amount at a time.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets) or not amounts:
        for amount in amounts:
            histogram.observe(amount)
        return
    counts = [0] * len(bounds)
    last = len(bounds) - 1
    for amount in amounts:
        if amount == amount:  # NaN is in no bucket (observe compares it with each bound): it only moves the sum
            counts[min(bisect_left(bounds, amount), last)] += 1
    total.inc(sum(amounts))
    for index, count in enumerate(counts):
        if count:
            buckets[index].inc(count)


def _is_state(source: MetricsSource, name: str) -> Callable[[], float]:
    return lambda: float(source.breaker_state == name)


class _LiveValue:
    """A gauge reading taken at scrape time, which may run on the exporter's thread.

    The write path mutates the backlog on the event loop while a scrape reads it from another thread, so a read can
    race (the RAM backlog emptied between a length check and an index, the writer replaced by ``set_enabled``). A
    scrape must never fail because of that: the last good value is reported instead.
    """

    __slots__ = ("_last", "_read")

    def __init__(self, read: Callable[[], float]) -> None:
        self._read = read
        self._last = 0.0

    def __call__(self) -> float:
        with contextlib.suppress(Exception):  # a racing read keeps the previous value; see the class docstring
            self._last = float(self._read())
        return self._last


def _gauge(registry: CollectorRegistry, name: str, documentation: str, read: Callable[[], float]) -> Gauge:
    gauge = Gauge(name, documentation, registry=registry)
    gauge.set_function(_LiveValue(read))
    return gauge


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
