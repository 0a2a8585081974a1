"""grafana/: the dashboard's structure, every metric the dashboard and the alert rules name exists in a real scrape,
promtool checks and unit-tests the rules, and a real Prometheus scraping a running sidecar answers every dashboard
query with data."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from persistence import PersistenceSidecar
from persistence.config import Settings
from tests.support.factories import make_signal, make_trade
from tests.support.metrics import PROMTOOL, PROMTOOL_SKIP, SPEC_METRICS, Scrape, free_port, scrape
from tests.support.sidecars import build

SettingsFactory = Callable[..., Settings]
GRAFANA = Path(__file__).resolve().parent.parent / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "persistence.json"
ALERTS = GRAFANA / "alerts.yml"
ALERT_TESTS = GRAFANA / "alerts_test.yml"
PROMETHEUS_CONFIG = GRAFANA / "prometheus.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
METRIC_NAME = re.compile(r"\bpersistence_[a-z0-9_]+\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMETHEUS = shutil.which("prometheus")


# ---------------------------------------------------------------------------------------------- reading the files


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return found


def dashboard_queries() -> dict[str, str]:
    """``"<panel title> <refId>"`` → PromQL, for every target of every panel."""
    return {f"{panel['title']} {target['refId']}": target["expr"] for panel in panels() for target in panel["targets"]}


def alert_rules() -> dict[str, dict[str, str]]:
    """The rules of alerts.yml by alert name (``expr``, ``for``), read without a YAML library.

    Handles the shapes the file uses: ``key: value`` and folded or literal blocks (``key: >-`` / ``key: |``).
    The test below cross-checks the count against ``promtool check rules`` where promtool is installed.
    """
    rules: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    lines = ALERTS.read_text().splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if match := re.match(r"^\s*- alert:\s*(\S+)\s*$", line):
            current = rules.setdefault(match.group(1), {})
            continue
        match = re.match(r"^(\s*)(expr|for):\s*(.*?)\s*$", line)
        if current is None or match is None:
            continue
        indent, key, value = len(match.group(1)), match.group(2), match.group(3)
        if value in (">", ">-", "|", "|-"):
            block: list[str] = []
            while index < len(lines) and (
                not lines[index].strip() or len(lines[index]) - len(lines[index].lstrip()) > indent
            ):
                block.append(lines[index].strip())
                index += 1
            value = " ".join(part for part in block if part)
        current[key] = value
    return rules


def metric_names(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in METRIC_NAME.findall(expr)}


def family_of(name: str, scraped: Scrape) -> str:
    """The metric family a series name in PromQL belongs to (``x_bucket`` of histogram ``x`` → ``x``)."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if name.endswith(suffix) and scraped.types.get(base) == "histogram":
            return base
    return name


@pytest.fixture
async def scraped(sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]) -> Scrape:
    """A real scrape of a sidecar that has committed a few records."""
    port = free_port()
    sidecar = build(sidecar_settings(sqlite_url, metrics_port=port), sidecars)
    await sidecar.start()
    sidecar.record_trade(make_trade())
    sidecar.record_signal(make_signal())
    await sidecar.flush(timeout=10)
    return await scrape(port)


# ---------------------------------------------------------------------------------------------- the dashboard


def test_the_dashboard_has_a_stable_uid_and_no_import_time_inputs() -> None:
    board = dashboard()
    assert board["uid"] == "persistence-sidecar"
    assert board["title"] == "Persistence sidecar"
    assert "__inputs" not in board and "__requires" not in board
    assert "${DS_" not in DASHBOARD.read_text()


def test_the_datasource_is_a_prometheus_template_variable_used_by_every_panel_and_query() -> None:
    variables = {variable["name"]: variable for variable in dashboard()["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]
    for panel in panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, (panel["title"], target["refId"])


def test_the_dashboard_has_the_panels_an_operator_needs() -> None:
    by_title = {panel["title"]: " ".join(t["expr"] for t in panel["targets"]) for panel in panels()}

    def panel_using(*fragments: str) -> str:
        matching = [title for title, exprs in by_title.items() if all(fragment in exprs for fragment in fragments)]
        assert matching, f"no panel queries {fragments}"
        return matching[0]

    assert "outcome" in panel_using("rate(persistence_writes_total", "by (outcome)").lower()
    assert "failure ratio" in panel_using('outcome="failure"', "/ clamp_min(").lower()
    latency = panel_using(
        "histogram_quantile(0.95, sum by (le) (rate(persistence_write_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(persistence_write_latency_seconds_bucket",
    )
    assert "p95" in latency and "p99" in latency
    breaker = panel_using("persistence_circuit_breaker_state")
    assert {panel["type"] for panel in panels() if panel["title"] == breaker} == {"state-timeline"}
    assert "journal" in panel_using("persistence_queue_depth", "persistence_journal_records").lower()
    assert "loss window" in panel_using("persistence_oldest_unpersisted_age_seconds").lower()
    assert "drops" in panel_using("persistence_dead_letters_total", "persistence_dropped_records_total").lower()
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids))


def test_the_dashboard_shows_every_metric_of_the_spec(scraped: Scrape) -> None:
    families = {family_of(name, scraped) for name in metric_names(list(dashboard_queries().values()))}
    assert families == set(SPEC_METRICS)


def test_every_metric_the_dashboard_queries_exists_in_a_real_scrape(scraped: Scrape) -> None:
    names = metric_names(list(dashboard_queries().values()))
    assert names, "no metric found in the dashboard's queries"
    missing = names - scraped.sample_names
    assert not missing, f"the dashboard queries series no scrape has: {sorted(missing)}"
    for name in names:
        assert family_of(name, scraped) in SPEC_METRICS, name


# ---------------------------------------------------------------------------------------------- alert rules


def test_the_alert_rules_cover_breaker_failure_ratio_loss_window_and_drops() -> None:
    rules = alert_rules()
    breaker = rules["PersistenceCircuitBreakerOpen"]
    assert "persistence_circuit_breaker_state" in breaker["expr"] and breaker["for"] == "1m"
    ratio = rules["PersistenceWriteFailureRatioHigh"]["expr"]
    assert 'outcome="failure"' in ratio and re.search(r">\s*0\.\d+$", ratio)
    assert re.search(
        r"persistence_oldest_unpersisted_age_seconds\)\s*>\s*\d+$", rules["PersistenceLossWindowHigh"]["expr"]
    )
    drops = rules["PersistenceRecordsDropped"]
    assert re.search(r"increase\(persistence_dropped_records_total\[5m\]\)\)\s*>\s*0$", drops["expr"])
    assert "for" not in drops, "a drop alerts at once"


def test_every_metric_the_alert_rules_use_exists_in_a_real_scrape(scraped: Scrape) -> None:
    rules = alert_rules()
    assert all("expr" in rule for rule in rules.values())
    names = metric_names([rule["expr"] for rule in rules.values()])
    assert {"persistence_circuit_breaker_state", "persistence_dropped_records_total"} <= names
    missing = names - scraped.sample_names
    assert not missing, f"alert rules use series no scrape has: {sorted(missing)}"


def test_metric_names_are_extracted_from_promql_and_histogram_suffixes_mapped_to_their_family(scraped: Scrape) -> None:
    names = metric_names(['histogram_quantile(0.9, sum by (le) (rate(persistence_batch_size_bucket{a="b"}[5m])))'])
    assert names == {"persistence_batch_size_bucket"}
    assert family_of("persistence_batch_size_bucket", scraped) == "persistence_batch_size"
    assert family_of("persistence_write_latency_seconds_count", scraped) == "persistence_write_latency_seconds"
    assert family_of("persistence_writes_total", scraped) == "persistence_writes_total"
    # A renamed metric is caught: it is in no scrape.
    assert "persistence_write_total" not in scraped.sample_names


@pytest.mark.skipif(PROMTOOL is None, reason=PROMTOOL_SKIP)
def test_promtool_check_rules_passes_and_sees_every_rule() -> None:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@pytest.mark.skipif(PROMTOOL is None, reason=PROMTOOL_SKIP)
def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, timeout=60, cwd=GRAFANA
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _promtool_expression(tmp_path: Path, expr: str, series: dict[str, str], expected: list[tuple[str, float]]) -> str:
    """Run ``promtool test rules`` on one dashboard expression over synthetic 15 s scrapes; returns its output.

    ``expected`` pairs an evaluation time with the single sample value the expression must give then.
    """
    assert PROMTOOL is not None
    concrete = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$instance", ".*")
    lines = ["rule_files: []", "evaluation_interval: 15s", "tests:", "  - interval: 15s", "    input_series:"]
    for name, values in series.items():
        lines += [f"      - series: '{name}'", f"        values: '{values}'"]
    lines.append("    promql_expr_test:")
    for eval_time, value in expected:
        lines += [
            f"      - expr: '{concrete}'",
            f"        eval_time: {eval_time}",
            "        exp_samples:",
            "          - labels: '{instance=\"sidecar:8089\"}'"
            if "by (instance)" in concrete
            else "          - labels: '{}'",
            f"            value: {value}",
        ]
    test_file = tmp_path / "dashboard_test.yml"
    test_file.write_text("\n".join(lines) + "\n")
    result = subprocess.run([PROMTOOL, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr + test_file.read_text()
    return result.stdout


@pytest.mark.skipif(PROMTOOL is None, reason=PROMTOOL_SKIP)
def test_the_breaker_panel_shows_an_outage_shorter_than_the_scrape_interval_as_open(tmp_path: Path) -> None:
    # Every scrape saw the breaker closed: it opened, half-opened and closed again between two scrapes at 2m30s.
    state = 'persistence_circuit_breaker_state{{state="{}",instance="sidecar:8089",job="p"}}'
    moved = (
        'persistence_circuit_breaker_transitions_total{{from_state="{}",to_state="{}",instance="sidecar:8089",job="p"}}'
    )
    series = {
        state.format("open"): "0x30",
        state.format("half_open"): "0x30",
        moved.format("closed", "open"): "0x9 1x20",
        moved.format("open", "half_open"): "0x9 1x20",
        moved.format("half_open", "closed"): "0x9 1x20",
    }
    expr = dashboard_queries()["Circuit breaker state A"]
    # open (2) around the outage, closed (0) once it has left the window.
    _promtool_expression(tmp_path, expr, series, [("3m", 2), ("6m", 0)])


@pytest.mark.skipif(PROMTOOL is None, reason=PROMTOOL_SKIP)
def test_the_breaker_panel_shows_open_while_scrapes_see_it_open(tmp_path: Path) -> None:
    state = 'persistence_circuit_breaker_state{{state="{}",instance="sidecar:8089",job="p"}}'
    series = {state.format("open"): "0x9 1x3 0x17", state.format("half_open"): "0x12 1 0x16"}
    expr = dashboard_queries()["Circuit breaker state A"]
    _promtool_expression(tmp_path, expr, series, [("3m", 2), ("7m", 0)])


@pytest.mark.skipif(PROMTOOL is None, reason=PROMTOOL_SKIP)
def test_the_batch_size_p50_of_single_record_batches_reads_one(tmp_path: Path) -> None:
    bucket = 'persistence_batch_size_bucket{{le="{}",instance="sidecar:8089",job="p"}}'
    series = {bucket.format(le): "0+10x30" for le in ("1", "2", "5", "10", "+Inf")}
    for refid in ("A", "B"):
        expr = dashboard_queries()[f"Batch size p50 / p95 {refid}"]
        assert expr.startswith("ceil(histogram_quantile(")
        _promtool_expression(tmp_path, expr, series, [("5m", 1)])


# ---------------------------------------------------------------------------------------------- provisioning


def test_provisioning_points_grafana_at_the_dashboard_folder_and_a_prometheus_datasource() -> None:
    dashboards = (GRAFANA / "provisioning" / "dashboards" / "persistence.yml").read_text()
    assert re.search(r"^apiVersion: 1$", dashboards, re.M)
    assert re.search(r"^\s+type: file$", dashboards, re.M)
    assert re.search(r"^\s+path: /\S+$", dashboards, re.M)
    datasources = (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert re.search(r"^apiVersion: 1$", datasources, re.M)
    assert re.search(r"^\s+type: prometheus$", datasources, re.M)
    assert re.search(r"^\s+url: http://\S+$", datasources, re.M)
    assert "\t" not in dashboards + datasources


# ---------------------------------------------------------------------------------------------- a real Prometheus


@dataclass
class RunningPrometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], RunningPrometheus]]:
    """Start a real Prometheus (our example config, 1 s intervals) scraping a given port; killed at the end."""
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus); real-Prometheus test skipped")
    processes: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> RunningPrometheus:
        config = PROMETHEUS_CONFIG.read_text()
        replacements = {
            "scrape_interval: 15s": "scrape_interval: 1s",
            "evaluation_interval: 15s": "evaluation_interval: 1s",
            '"127.0.0.1:8089"': f'"127.0.0.1:{target_port}"',
            "- alerts.yml": f"- {ALERTS}",
        }
        for old, new in replacements.items():
            assert old in config, f"grafana/prometheus.yml no longer contains {old!r}"
            config = config.replace(old, new)
        (tmp_path / "prometheus.yml").write_text(config)
        web = free_port()
        log_path = tmp_path / "prometheus.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{web}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        processes.append(process)
        return RunningPrometheus(f"http://127.0.0.1:{web}", process, log_path)

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


async def _poll(check: Callable[[], Any], timeout: float, what: str) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        try:
            last = await check()
            if last:
                return last
        except httpx.HTTPError as error:
            last = error
        await asyncio.sleep(0.25)
    raise AssertionError(f"{what} within {timeout} s; last: {last!r}")


@pytest.fixture
async def trading(sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]) -> AsyncIterator[int]:
    """A running sidecar with its exporter, recording a trade and a signal every 50 ms; yields the metrics port."""
    port = free_port()
    sidecar: PersistenceSidecar = build(sidecar_settings(sqlite_url, metrics_port=port), sidecars)
    await sidecar.start()

    async def trade_forever() -> None:
        while True:
            sidecar.record_trade(make_trade())
            sidecar.record_signal(make_signal())
            await asyncio.sleep(0.05)

    task = asyncio.create_task(trade_forever())
    try:
        yield port
    finally:
        task.cancel()


@pytest.mark.slow
async def test_a_real_prometheus_answers_every_dashboard_query_with_data_and_loads_the_rules(
    prometheus: Callable[[int], RunningPrometheus], trading: int
) -> None:
    server = prometheus(trading)
    async with httpx.AsyncClient(base_url=server.url, timeout=5.0) as client:

        async def ready() -> bool:
            server.check_alive()
            return (await client.get("/-/ready")).status_code == 200

        await _poll(ready, 20, "Prometheus ready")

        async def target_up() -> bool:
            targets = (await client.get("/api/v1/targets")).json()["data"]["activeTargets"]
            return any(t["health"] == "up" and t["scrapeUrl"].endswith(f":{trading}/metrics") for t in targets)

        await _poll(target_up, 15, "the sidecar's exporter scraped")

        instances = (
            await client.get("/api/v1/label/instance/values", params={"match[]": "persistence_enabled"})
        ).json()
        assert f"127.0.0.1:{trading}" in instances["data"], "the dashboard's $instance variable would be empty"

        async def query(expr: str) -> list[Any]:
            concrete = expr.replace("$__rate_interval", "10s").replace("$instance", ".*")
            body = (await client.get("/api/v1/query", params={"query": concrete})).json()
            assert body["status"] == "success", (expr, body)
            result: list[Any] = body["data"]["result"]
            return result

        queries = dashboard_queries()
        pending = dict(queries)

        async def all_answered() -> bool:
            for title, expr in list(pending.items()):
                if await query(expr):
                    del pending[title]
            return not pending

        await _poll(all_answered, 20, f"every dashboard query answered (still empty: {sorted(pending)})")

        [p95] = await query(queries["Write latency p95 / p99 (record_* to commit) A"])
        assert 0 < float(p95["value"][1]) < 10, p95
        [success] = [
            series
            for series in await query(queries["Write rate by outcome A"])
            if series["metric"]["outcome"] == "success"
        ]
        assert float(success["value"][1]) > 0

        for rule in alert_rules().values():
            assert (await query(rule["expr"])) == [], f"an alert condition holds on a healthy sidecar: {rule}"
        groups = (await client.get("/api/v1/rules")).json()["data"]["groups"]

        async def rules_evaluated() -> bool:
            loaded = (await client.get("/api/v1/rules")).json()["data"]["groups"]
            rules = [rule for group in loaded for rule in group["rules"]]
            return bool(rules) and all(rule["health"] == "ok" for rule in rules)

        await _poll(rules_evaluated, 10, "every alert rule loaded and evaluated without error")
        names = {rule["name"] for group in groups for rule in group["rules"]}
        assert names == set(alert_rules())
