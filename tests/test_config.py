"""Settings: every variable with its default, strict parsing, and errors that name the variable."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from persistence.config import Settings
from persistence.errors import ConfigurationError

ALL_VARIABLES = {
    "ENABLE_DATABASE_PERSISTENCE": "enabled",
    "DATABASE_URL": "database_url",
    "DATABASE_POOL_SIZE": "pool_size",
    "DATABASE_MAX_OVERFLOW": "max_overflow",
    "DATABASE_QUERY_TIMEOUT": "query_timeout_ms",
    "PERSISTENCE_BREAKER_FAILURE_THRESHOLD": "breaker_failure_threshold",
    "PERSISTENCE_BREAKER_RESET_SECONDS": "breaker_reset_seconds",
    "PERSISTENCE_BATCH_SIZE": "batch_size",
    "PERSISTENCE_MAX_PENDING": "max_pending",
    "PERSISTENCE_JOURNAL_DIR": "journal_dir",
    "PERSISTENCE_JOURNAL_SYNC_SECONDS": "journal_sync_seconds",
    "PERSISTENCE_HISTORY_MAX": "history_max",
    "PERSISTENCE_SHUTDOWN_TIMEOUT": "shutdown_timeout",
    "PERSISTENCE_API_HOST": "api_host",
    "PERSISTENCE_API_PORT": "api_port",
    "PERSISTENCE_API_TOKEN": "api_token",
    "PERSISTENCE_METRICS_PORT": "metrics_port",
    "PERSISTENCE_LOG_FORMAT": "log_format",
    "PERSISTENCE_LOG_LEVEL": "log_level",
    "PERSISTENCE_INSTANCE_ID": "instance_id",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for variable in ALL_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env file


def test_defaults_match_the_configuration_table() -> None:
    settings = Settings()
    assert settings.enabled is True
    assert settings.database_url == "sqlite+aiosqlite:///./data/trading_system.db"
    assert (settings.pool_size, settings.max_overflow, settings.query_timeout_ms) == (10, 20, 5000)
    assert (settings.breaker_failure_threshold, settings.breaker_reset_seconds) == (5, 30.0)
    assert (settings.batch_size, settings.max_pending, settings.history_max) == (500, 100_000, 10_000)
    assert settings.journal_dir == Path("data/journal")
    assert settings.journal_sync_seconds == 1.0
    assert settings.shutdown_timeout == 10.0
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 8089)
    assert settings.api_token is None and settings.metrics_port is None
    assert (settings.log_format, settings.log_level) == ("auto", "INFO")


def test_env_example_lists_every_variable() -> None:
    example = (Path(__file__).parent.parent / ".env.example").read_text()
    for variable in ALL_VARIABLES:
        assert f"{variable}=" in example, variable


def test_every_variable_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "ENABLE_DATABASE_PERSISTENCE": "no",
        "DATABASE_URL": "postgresql+asyncpg://trader:pw@db.internal:5432/history",
        "DATABASE_POOL_SIZE": "3",
        "DATABASE_MAX_OVERFLOW": "0",
        "DATABASE_QUERY_TIMEOUT": "250",
        "PERSISTENCE_BREAKER_FAILURE_THRESHOLD": "2",
        "PERSISTENCE_BREAKER_RESET_SECONDS": "1.5",
        "PERSISTENCE_BATCH_SIZE": "64",
        "PERSISTENCE_MAX_PENDING": "1000",
        "PERSISTENCE_JOURNAL_DIR": "/var/spool/trading",
        "PERSISTENCE_JOURNAL_SYNC_SECONDS": "0.25",
        "PERSISTENCE_HISTORY_MAX": "50",
        "PERSISTENCE_SHUTDOWN_TIMEOUT": "3",
        "PERSISTENCE_API_HOST": "0.0.0.0",
        "PERSISTENCE_API_PORT": "9000",
        "PERSISTENCE_API_TOKEN": "s3cret-token",
        "PERSISTENCE_METRICS_PORT": "9100",
        "PERSISTENCE_LOG_FORMAT": "JSON",
        "PERSISTENCE_LOG_LEVEL": "debug",
    }
    for variable, value in values.items():
        monkeypatch.setenv(variable, value)
    settings = Settings()
    assert settings.enabled is False
    assert settings.url.host == "db.internal"
    assert (settings.pool_size, settings.max_overflow, settings.query_timeout_ms) == (3, 0, 250)
    assert settings.query_timeout == 0.25
    assert (settings.breaker_failure_threshold, settings.breaker_reset_seconds) == (2, 1.5)
    assert (settings.batch_size, settings.max_pending, settings.history_max) == (64, 1000, 50)
    assert settings.journal_dir == Path("/var/spool/trading")
    assert settings.journal_sync_seconds == 0.25
    assert settings.shutdown_timeout == 3.0
    assert (settings.api_host, settings.api_port, settings.metrics_port) == ("0.0.0.0", 9000, 9100)
    assert settings.api_token is not None and settings.api_token.get_secret_value() == "s3cret-token"
    assert (settings.log_format, settings.log_level) == ("json", "DEBUG")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("false", False), ("0", False), ("No", False)],
)
def test_feature_flag_accepts_the_documented_spellings(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    monkeypatch.setenv("ENABLE_DATABASE_PERSISTENCE", value)
    assert Settings().enabled is expected


@pytest.mark.parametrize("value", ["maybe", "on", "2", "", "enabled"])
def test_feature_flag_refuses_anything_else_naming_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("ENABLE_DATABASE_PERSISTENCE", value)
    with pytest.raises(ConfigurationError) as caught:
        Settings()
    assert caught.value.variable == "ENABLE_DATABASE_PERSISTENCE"
    assert "ENABLE_DATABASE_PERSISTENCE" in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PERSISTENCE_BATCH_SIZE", "-5"),
        ("PERSISTENCE_BATCH_SIZE", "0"),
        ("PERSISTENCE_BATCH_SIZE", "lots"),
        ("PERSISTENCE_MAX_PENDING", "0"),
        ("PERSISTENCE_BREAKER_FAILURE_THRESHOLD", "0"),
        ("PERSISTENCE_BREAKER_RESET_SECONDS", "-1"),
        ("DATABASE_QUERY_TIMEOUT", "0"),
        ("DATABASE_POOL_SIZE", "0"),
        ("PERSISTENCE_API_PORT", "70000"),
        ("PERSISTENCE_METRICS_PORT", "-1"),
        ("PERSISTENCE_LOG_FORMAT", "xml"),
        ("PERSISTENCE_LOG_LEVEL", "LOUD"),
        ("PERSISTENCE_SHUTDOWN_TIMEOUT", "-0.5"),
    ],
)
def test_invalid_values_fail_at_start_up_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as caught:
        Settings()
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"invalid configuration: {variable}: ")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("not a url", "not a valid SQLAlchemy URL"),
        ("nosuchdb+driver://x/y", "unknown database driver"),
        ("sqlite:///./data/trading.db", "not async"),
        ("postgresql://u@h/db", "not async"),
        ("sqlite+aiosqlite://", "file path"),
    ],
)
def test_malformed_database_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, url: str, reason: str) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    with pytest.raises(ConfigurationError) as caught:
        Settings()
    assert caught.value.variable == "DATABASE_URL"
    assert reason in caught.value.reason


def test_password_in_database_url_never_appears_in_repr_or_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://trader:hunter2@db/history")
    monkeypatch.setenv("PERSISTENCE_API_TOKEN", "tok-123456")
    settings = Settings()
    assert "hunter2" not in repr(settings) and "tok-123456" not in repr(settings)
    assert "hunter2" not in settings.safe_database_url
    monkeypatch.setenv("PERSISTENCE_BATCH_SIZE", "-1")
    with pytest.raises(ConfigurationError) as caught:
        Settings()
    assert "hunter2" not in str(caught.value) and "tok-123456" not in str(caught.value)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(Exception, match="frozen"):
        settings.batch_size = 1  # type: ignore[misc]


def test_keyword_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSISTENCE_BATCH_SIZE", "7")
    assert Settings(batch_size=9).batch_size == 9
    assert Settings().batch_size == 7


def test_dotenv_file_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PERSISTENCE_HISTORY_MAX=42\n")
    assert Settings().history_max == 42


def test_secrets_are_the_database_password_and_the_api_token_and_nothing_empty() -> None:
    from tests.support.databases import make_settings

    full = make_settings(
        database_url="postgresql+asyncpg://trader:pa55w0rd@db.example:5432/trading", api_token="tok-123"
    )
    assert set(full.secrets) == {"pa55w0rd", "tok-123"}
    assert make_settings(database_url="sqlite+aiosqlite:///x.db").secrets == ()


def test_the_instance_id_defaults_to_the_host_name_and_refuses_what_cannot_name_a_chain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PERSISTENCE_INSTANCE_ID", raising=False)
    assert Settings(_env_file=None).instance_id == (socket.gethostname()[:64] or "localhost")
    monkeypatch.setenv("PERSISTENCE_INSTANCE_ID", "  desk-1  ")
    assert Settings(_env_file=None).instance_id == "desk-1"
    for bad in ("", "   ", "desk\x00one", "desk\none", "x" * 65):
        with pytest.raises(ConfigurationError, match="PERSISTENCE_INSTANCE_ID"):
            Settings(_env_file=None, instance_id=bad)
