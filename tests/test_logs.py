"""Logs: one event name per happening, the recording context's correlation id on the writer's lines, no secret ever,
no line per record at INFO, and ``configure_logging``: JSON or console, standard-library loggers through the same
pipeline, never configured on import."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import structlog
from structlog.testing import capture_logs

from persistence.config import Settings
from persistence.observe.correlation import correlation_scope
from persistence.observe.event_log import configure_logging, mask_secrets
from persistence.testing import FakeClock
from tests.support import DatabaseLock, add_poison_trigger_sqlite, eventually, sqlite_file
from tests.support.databases import make_settings
from tests.support.factories import make_signal, make_trade
from tests.support.sidecars import build

SettingsFactory = Callable[..., Settings]
REPO_ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "S3cr3t-db-pw"
TOKEN = "tok-9f8e7d6c5b4a"
INFO_AND_UP = {"info", "warning", "error", "critical"}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``configure_logging`` changes process-wide state; put structlog and the root logger back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in ("sqlalchemy", "aiosqlite", "asyncio")}
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in noisy.items():
        logging.getLogger(name).setLevel(old)
    structlog.configure(**config)


class _Point(NamedTuple):
    x: int
    y: int


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- event names


async def test_an_outage_logs_one_event_name_per_happening_at_fitting_levels(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    clock = FakeClock()
    settings = sidecar_settings(sqlite_url, max_pending=5, query_timeout_ms=100)
    sidecar = build(settings, sidecars, clock=clock)
    with capture_logs() as logs:
        await sidecar.start()
        await sidecar.record_trade(make_trade())
        async with DatabaseLock(sqlite_url):
            sidecar.record_trade(make_trade())
            await eventually(lambda: sidecar.breaker_state == "open")
            for _ in range(20):
                sidecar.record_trade(make_trade())
            await eventually(lambda: sidecar.journal_depth() > 0 and sidecar.queue_depth() <= 5)
        clock.advance(30)
        await sidecar.flush(timeout=15)
        add_poison_trigger_sqlite(sqlite_file(sqlite_url), "POISON")
        sidecar.record_trade(make_trade(trade_id="POISON"))
        await sidecar.flush(timeout=15)
        await sidecar.close()
    names = [line["event"] for line in logs]
    for name in (
        "sidecar_started",
        "batch_committed",
        "write_retried",
        "write_failed",
        "circuit_opened",
        "journal_spilled",
        "circuit_half_open",
        "circuit_closed",
        "journal_replayed",
        "record_dead_lettered",
        "shutdown_complete",
    ):
        assert name in names, name
    assert names.count("circuit_opened") == names.count("circuit_half_open") == names.count("circuit_closed") == 1
    assert names.count("write_failed") == 5 and names.count("shutdown_complete") == 1
    levels = {line["event"]: line["log_level"] for line in logs}
    assert levels["circuit_opened"] == "error" and levels["circuit_half_open"] == "warning"
    assert levels["circuit_closed"] == "info" and levels["record_dead_lettered"] == "error"
    assert levels["batch_committed"] == "debug" and levels["write_failed"] == "warning"
    [failed, *_] = [line for line in logs if line["event"] == "write_failed"]
    assert failed["error_class"] == "OperationalError" and failed["transient"] is True and failed["records"] == 1
    [summary] = [line for line in logs if line["event"] == "shutdown_complete"]
    assert summary["persisted"] == 22 and summary["dead_lettered"] == 1 and summary["dropped"] == 0
    assert summary["journaled"] >= 15
    committed = [line for line in logs if line["event"] == "batch_committed"]
    assert all(isinstance(line["duration_ms"], float) for line in committed)


# ---------------------------------------------------------------------------------------------- correlation ids


async def test_the_correlation_id_current_at_record_time_reaches_the_writers_lines(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url), sidecars)
    await sidecar.start()
    with capture_logs() as logs:
        with correlation_scope("req-trade-1"):
            sidecar.record_trade(make_trade())
        with correlation_scope("req-signal-2"):
            sidecar.record_signal(make_signal())
        sidecar.record_trade(make_trade())  # no scope: no id
        await sidecar.flush(timeout=10)
    ids = {cid for line in logs if line["event"] == "batch_committed" for cid in line["correlation_ids"]}
    assert ids == {"req-trade-1", "req-signal-2"}


async def test_correlation_ids_travel_through_an_outage_the_journal_and_a_dead_letter(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    clock = FakeClock()
    sidecar = build(sidecar_settings(sqlite_url, max_pending=2, query_timeout_ms=100), sidecars, clock=clock)
    await sidecar.start()
    with capture_logs() as logs:
        async with DatabaseLock(sqlite_url):
            with correlation_scope("req-during-outage"):
                first = sidecar.record_trade(make_trade())
            await eventually(lambda: sidecar.breaker_state == "open")
            for n in range(10):
                with correlation_scope(f"req-spilled-{n}"):
                    sidecar.record_trade(make_trade())
            await eventually(lambda: sidecar.journal_depth() > 0)
            clock.advance(1.0)
            await eventually(lambda: first.status == "journaled")
        clock.advance(30)
        await sidecar.flush(timeout=15)
        add_poison_trigger_sqlite(sqlite_file(sqlite_url), "POISON")
        with correlation_scope("req-poison"):
            sidecar.record_trade(make_trade(trade_id="POISON"))
        await sidecar.flush(timeout=15)
    failed = [line for line in logs if line["event"] == "write_failed"]
    assert failed and all(line["correlation_ids"] == ["req-during-outage"] for line in failed)
    replayed = {
        cid
        for line in logs
        if line["event"] == "batch_committed" and line["from_journal"]
        for cid in line["correlation_ids"]
    }
    assert "req-during-outage" in replayed and "req-spilled-0" in replayed
    committed = {cid for line in logs if line["event"] == "batch_committed" for cid in line["correlation_ids"]}
    assert committed == {"req-during-outage", *(f"req-spilled-{n}" for n in range(10))}
    [dead] = [line for line in logs if line["event"] == "record_dead_lettered"]
    assert dead["correlation_id"] == "req-poison" and dead["key"] == "POISON"


# ---------------------------------------------------------------------------------------------- the hot path


async def test_recording_1000_records_logs_no_line_per_record_at_info(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any]
) -> None:
    sidecar = build(sidecar_settings(sqlite_url), sidecars)
    await sidecar.start()
    with capture_logs() as logs:
        for n in range(1000):
            if n % 2:
                sidecar.record_trade(make_trade())
            else:
                sidecar.record_signal(make_signal())
        await sidecar.flush(timeout=20)
    loud = [line for line in logs if line["log_level"] in INFO_AND_UP]
    assert loud == [], loud
    committed = [line for line in logs if line["event"] == "batch_committed"]
    assert sum(line["records"] for line in committed) == 1000
    assert len(logs) == len(committed) < 1000 / 2, "one debug line per batch, never per record"


async def test_the_real_pipeline_at_info_writes_no_line_per_record(
    sqlite_url: str, sidecar_settings: SettingsFactory, sidecars: list[Any], restore_logging: None
) -> None:
    stream = io.StringIO()
    settings = sidecar_settings(sqlite_url, log_format="json", log_level="INFO")
    configure_logging(settings, stream=stream)
    sidecar = build(settings, sidecars)
    await sidecar.start()
    for _ in range(1000):
        sidecar.record_trade(make_trade())
    await sidecar.flush(timeout=20)
    await sidecar.close()
    lines = json_lines(stream)
    ours = [line["event"] for line in lines if line["logger"].startswith("persistence")]
    # One line per run, not per record: the start, the audit chain's checkpoint at close(), the summary.
    assert ours == ["sidecar_started", "audit_anchored", "shutdown_complete"], lines
    # Alembic's INFO lines (migration context) come through the same pipeline; SQLAlchemy's statements do not.
    assert len(lines) < 10, lines


# ---------------------------------------------------------------------------------------------- secrets


class _EchoingProxy:
    """A real TCP endpoint that speaks enough of the PostgreSQL protocol to refuse every connection with an error
    message quoting the connection URL and the API token (as a misconfigured proxy or pooler might)."""

    def __init__(self, message: Callable[[int], str]) -> None:
        self._message = message
        self._server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    async def __aenter__(self) -> _EchoingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            length, code = struct.unpack("!ii", await reader.readexactly(8))
            if code == 80877103:  # SSLRequest: no SSL here, then the startup message follows
                writer.write(b"N")
                await writer.drain()
                (length,) = struct.unpack("!i", await reader.readexactly(4))
                await reader.readexactly(length - 4)
            else:
                await reader.readexactly(length - 8)
            fields = b"".join(
                key + value.encode() + b"\0"
                for key, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", "08006"), (b"M", self._message(self.port)))
            )
            body = fields + b"\0"
            writer.write(b"E" + struct.pack("!i", len(body) + 4) + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_a_password_and_token_in_a_real_connection_error_never_reach_a_log_line(
    tmp_path: Path, sidecars: list[Any], restore_logging: None
) -> None:
    stream = io.StringIO()

    def refusal(port: int) -> str:
        return f"refused postgresql+asyncpg://trader:{PASSWORD}@127.0.0.1:{port}/trading for client token {TOKEN}"

    async with _EchoingProxy(refusal) as proxy:
        url = f"postgresql+asyncpg://trader:{PASSWORD}@127.0.0.1:{proxy.port}/trading"
        settings = make_settings(
            database_url=url,
            api_token=TOKEN,
            journal_dir=tmp_path / "journal",
            query_timeout_ms=500,
            log_format="json",
            log_level="DEBUG",
        )
        configure_logging(settings, stream=stream)
        clock = FakeClock()
        sidecar = build(settings, sidecars, clock=clock)
        with capture_logs() as captured:
            await sidecar.start()
            sidecar.record_trade(make_trade())
            clock.advance(30)
            await eventually(lambda: proxy.connections >= 2)
            await sidecar.close(timeout=1.0)
        # Once more through the real JSON pipeline, which capture_logs bypasses.
        second = build(settings, sidecars, clock=FakeClock())
        await second.start()
        await second.close(timeout=1.0)
    assert proxy.connections >= 2, "the refusals really came from the server"
    [unavailable] = [line for line in captured if line["event"] == "database_unavailable"]
    assert unavailable["log_level"] == "critical"
    assert f"postgresql+asyncpg://trader:***@127.0.0.1:{proxy.port}/trading" in unavailable["error"]
    assert "token ***" in unavailable["error"]
    assert PASSWORD not in repr(captured) and TOKEN not in repr(captured)
    rendered = stream.getvalue()
    assert "database_unavailable" in rendered and "trader:***@" in rendered
    assert PASSWORD not in rendered and TOKEN not in rendered


async def test_an_unreachable_server_with_a_password_in_the_url_logs_no_password(
    tmp_path: Path, sidecars: list[Any], restore_logging: None
) -> None:
    stream = io.StringIO()
    settings = make_settings(
        database_url=f"postgresql+asyncpg://trader:{PASSWORD}@127.0.0.1:1/trading",
        journal_dir=tmp_path / "journal",
        query_timeout_ms=300,
        log_format="json",
    )
    configure_logging(settings, stream=stream)
    sidecar = build(settings, sidecars)
    await sidecar.start()
    sidecar.record_trade(make_trade())
    await sidecar.close(timeout=1.0)
    lines = json_lines(stream)
    assert "database_unavailable" in [line["event"] for line in lines]
    assert PASSWORD not in stream.getvalue()


def test_mask_secrets_hides_url_passwords_of_any_scheme_and_the_given_secrets() -> None:
    text = (
        "postgresql+asyncpg://u:p%40ss@db:5432/x and redis://:hunter2@cache/0 and sqlite+aiosqlite:///./a.db "
        "and postgresql://nouser@db/x token abc123"
    )
    masked = mask_secrets(text, ("abc123", ""))
    assert masked == (
        "postgresql+asyncpg://u:***@db:5432/x and redis://:***@cache/0 and sqlite+aiosqlite:///./a.db "
        "and postgresql://nouser@db/x token ***"
    )


def test_stdlib_lines_quoting_a_url_are_masked_too(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(make_settings(log_format="json"), stream=stream)
    logging.getLogger("some.library").error("cannot reach %s", f"postgresql://app:{PASSWORD}@db/x")
    try:
        raise ConnectionError(f"postgresql://app:{PASSWORD}@db/x is down")
    except ConnectionError:
        logging.getLogger("some.library").exception("traceback follows")
    url = f"postgresql://app:{PASSWORD}@db/x"
    structlog.get_logger("persistence").error("nested", urls=[url], where={"url": url}, point=_Point(1, 2))
    assert PASSWORD not in stream.getvalue()
    [first, second, nested] = json_lines(stream)
    assert first["event"] == "cannot reach postgresql://app:***@db/x"
    assert "exception" in second
    assert nested["urls"] == ["postgresql://app:***@db/x"] and nested["where"] == {"url": "postgresql://app:***@db/x"}
    assert nested["point"] == [1, 2]


# ---------------------------------------------------------------------------------------------- configure_logging


def test_json_format_renders_structlog_and_stdlib_lines_through_one_pipeline(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(make_settings(log_format="json", log_level="INFO"), stream=stream)
    structlog.get_logger("persistence").info("batch_flushed_for_test", records=3)
    logging.getLogger("alembic.runtime.migration").warning("Running upgrade  -> 0001, initial")
    logging.getLogger("uvicorn.error").warning("Started server process [%d]", 42)
    [ours, alembic, uvicorn] = json_lines(stream)
    assert ours["event"] == "batch_flushed_for_test" and ours["records"] == 3 and ours["level"] == "info"
    assert ours["logger"] == "persistence" and ours["timestamp"].endswith("Z")
    assert alembic["event"] == "Running upgrade  -> 0001, initial" and alembic["logger"] == "alembic.runtime.migration"
    assert uvicorn["event"] == "Started server process [42]" and uvicorn["level"] == "warning"
    assert {"timestamp", "level", "logger", "event"} <= set(alembic)


def test_auto_format_is_console_on_a_tty_and_json_otherwise(restore_logging: None) -> None:
    tty = _TTY()
    configure_logging(make_settings(log_format="auto"), stream=tty)
    structlog.get_logger("persistence").warning("on_a_terminal", n=1)
    line = tty.getvalue()
    assert "\x1b[" in line, "colours on a terminal"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", line)
    assert "on_a_terminal" in plain and "n=1" in plain and "[persistence]" in plain
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)

    pipe = io.StringIO()
    configure_logging(make_settings(log_format="auto"), stream=pipe)
    structlog.get_logger("persistence").warning("in_production", n=2)
    assert json_lines(pipe) == [json_lines(pipe)[0]] and json_lines(pipe)[0]["event"] == "in_production"
    assert tty.getvalue() == line, "reconfiguring replaced the earlier handler"


def test_console_format_is_used_when_asked_even_off_a_tty(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(make_settings(log_format="console"), stream=stream)
    logging.getLogger("sqlalchemy.engine").warning("pool overflow")
    assert "pool overflow" in stream.getvalue() and not stream.getvalue().lstrip().startswith("{")


def test_the_level_setting_filters_structlog_and_stdlib_lines(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(make_settings(log_format="json", log_level="WARNING"), stream=stream)
    log = structlog.get_logger("persistence")
    log.debug("hidden_debug")
    log.info("hidden_info")
    log.warning("shown_warning")
    logging.getLogger("alembic").info("hidden stdlib info")
    assert [line["event"] for line in json_lines(stream)] == ["shown_warning"]


def test_sqlalchemy_statements_stay_quiet_at_info(restore_logging: None) -> None:
    configure_logging(make_settings(log_format="json", log_level="INFO"), stream=io.StringIO())
    assert not logging.getLogger("sqlalchemy.engine").isEnabledFor(logging.INFO)
    # Alembic narrates every start-up at INFO; its warnings and errors still come through.
    assert not logging.getLogger("alembic").isEnabledFor(logging.INFO)
    assert logging.getLogger("alembic").isEnabledFor(logging.WARNING)
    assert logging.getLogger("uvicorn.error").isEnabledFor(logging.INFO)


def test_stdlib_lines_carry_the_current_correlation_id(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(make_settings(log_format="json"), stream=stream)
    with correlation_scope("req-77"):
        logging.getLogger("uvicorn.access").info("GET /api/v1/trades/history 200")
        structlog.get_logger("persistence.api").info("request_done")
    logging.getLogger("uvicorn.access").info("outside any request")
    lines = json_lines(stream)
    assert [line.get("correlation_id") for line in lines] == ["req-77", "req-77", None]


def test_importing_the_package_configures_no_logging() -> None:
    probe = (
        "import logging, structlog, persistence, persistence.observe.event_log, persistence.sidecar;"
        "assert logging.getLogger().handlers == [], logging.getLogger().handlers;"
        "assert not structlog.is_configured();"
        "print('clean')"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and result.stdout.strip() == "clean", result.stderr


# ---------------------------------------------------------------------------------------------- a guest in the host


def run_host(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    """Run ``tests/children/logging_host.py`` on a fresh SQLite file; returns its output."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'host.db'}"
    return subprocess.run(
        [sys.executable, "-m", "tests.children.logging_host", url, str(tmp_path / "journal"), mode],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_host_that_configured_no_logging_gets_nothing_on_stdout_and_nothing_below_warning(tmp_path: Path) -> None:
    result = run_host(tmp_path, "none")
    assert result.returncode == 0, result.stderr
    expected = ["HOST starting", *(f"HOST recorded HOST-{i:03d}" for i in range(20)), "HOST done"]
    assert result.stdout.splitlines() == expected
    # Python's last-resort handler shows WARNING and above on stderr; a healthy run has none of them, and no
    # INFO or DEBUG line (sidecar_started, batch_committed, shutdown_complete) may appear at all.
    assert result.stderr == ""


def test_a_host_that_configured_logging_at_debug_gets_the_batch_events_through_its_own_handler(
    tmp_path: Path,
) -> None:
    result = run_host(tmp_path, "debug")
    assert result.returncode == 0, result.stderr
    seen = [line.split(" ", 4) for line in result.stdout.splitlines() if line.startswith("SEEN ")]
    events = {(level, name, event) for _, level, name, event, _ in seen}
    assert ("DEBUG", "persistence", "batch_committed") in events
    assert ("INFO", "persistence", "sidecar_started") in events
    assert ("INFO", "persistence", "shutdown_complete") in events
    committed = next(fields for _, _, _, event, fields in seen if event == "batch_committed")
    assert "'records'" in committed and "'duration_ms'" in committed and "'correlation_ids'" in committed
    # Even with the host's logging on, nothing goes to stdout but what the host prints itself.
    assert all(line.startswith(("HOST ", "SEEN ")) for line in result.stdout.splitlines())


def test_the_library_logger_honours_the_stdlib_level_and_formats_a_readable_message(
    restore_logging: None,
) -> None:
    from persistence.observe.logger import get_logger

    structlog.reset_defaults()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("persistence")
    old_level = logger.level
    logger.addHandler(handler)
    try:
        logger.setLevel(logging.INFO)
        log = get_logger("persistence.api")
        log.debug("batch_committed", records=3)
        log.info("history_read_from_memory", reason="breaker open")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("api_request_failed", path="/api/v1/trades/x")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert [r.getMessage() for r in records] == [
        'history_read_from_memory reason="breaker open"',
        "api_request_failed path=/api/v1/trades/x",
    ]
    assert [r.levelno for r in records] == [logging.INFO, logging.ERROR]
    assert records[1].exc_info is not None and records[1].exc_info[0] is RuntimeError
    assert records[0].__dict__["persistence_fields"] == {"reason": "breaker open"}
