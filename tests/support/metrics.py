"""Scraping the metrics endpoint over real HTTP and the SPEC's metric table."""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

# The SPEC's table, written out here on purpose: renaming a metric in the code must fail this test.
SPEC_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "persistence_writes_total": ("counter", frozenset({"entity", "outcome"})),
    "persistence_dead_letters_total": ("counter", frozenset({"entity"})),
    "persistence_dropped_records_total": ("counter", frozenset({"entity", "reason"})),
    "persistence_retries_total": ("counter", frozenset()),
    "persistence_write_latency_seconds": ("histogram", frozenset({"entity"})),
    "persistence_batch_size": ("histogram", frozenset()),
    "persistence_queue_depth": ("gauge", frozenset()),
    "persistence_journal_records": ("gauge", frozenset()),
    "persistence_oldest_unpersisted_age_seconds": ("gauge", frozenset()),
    "persistence_circuit_breaker_state": ("gauge", frozenset({"state"})),
    "persistence_circuit_breaker_transitions_total": ("counter", frozenset({"from_state", "to_state"})),
    "persistence_enabled": ("gauge", frozenset()),
}
PROMTOOL = shutil.which("promtool")
PROMTOOL_SKIP = "promtool is not installed (Debian: apt-get install prometheus); skipped"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Scrape:
    """One parsed exposition: families by name (as the text format's TYPE lines name them) and their samples."""

    text: str
    types: dict[str, str]
    samples: list[Sample]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        types: dict[str, str] = {}
        samples: list[Sample] = []
        for family in text_string_to_metric_families(text):
            # The parser drops a counter's ``_total`` from the family name; the series keep it.
            name = f"{family.name}_total" if family.type == "counter" else family.name
            types[name] = family.type
            samples.extend(family.samples)
        return cls(text, types, samples)

    @property
    def sample_names(self) -> set[str]:
        return {sample.name for sample in self.samples}

    def value(self, name: str, **labels: str) -> float:
        matches = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(matches) == 1, f"{name}{labels}: {len(matches)} series"
        return matches[0]

    def labelsets(self, name: str) -> set[frozenset[tuple[str, str]]]:
        return {frozenset(s.labels.items()) for s in self.samples if s.name == name}

    def total(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())


async def scrape(port: int) -> Scrape:
    """GET /metrics from the sidecar's exporter over real HTTP."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape.parse(response.text)
