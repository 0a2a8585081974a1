"""Configuration: one frozen :class:`Settings`, read from the environment (and ``.env``) at the edge.

Every variable of the product's configuration table lives here with its default. Invalid values fail at
construction with a :class:`~persistence.errors.ConfigurationError` that names the environment variable, so a
typo is caught at start-up rather than at the first write. Settings flow down by constructor; nothing in the
library reads the environment anywhere else.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from persistence.errors import ConfigurationError

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./data/trading_system.db"

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_flag(value: object) -> bool:
    """Parse a feature flag strictly: true/false/1/0/yes/no (any case); anything else is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError("must be one of true/false/1/0/yes/no")


class Settings(BaseSettings):
    """Every setting of the sidecar. ``Settings()`` reads the environment; keyword arguments override it."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
        case_sensitive=False,
    )

    enabled: bool = Field(True, validation_alias="ENABLE_DATABASE_PERSISTENCE")
    database_url: str = Field(DEFAULT_DATABASE_URL, validation_alias="DATABASE_URL", repr=False)
    pool_size: int = Field(10, ge=1, validation_alias="DATABASE_POOL_SIZE")
    max_overflow: int = Field(20, ge=0, validation_alias="DATABASE_MAX_OVERFLOW")
    query_timeout_ms: int = Field(5000, ge=1, validation_alias="DATABASE_QUERY_TIMEOUT")
    breaker_failure_threshold: int = Field(5, ge=1, validation_alias="PERSISTENCE_BREAKER_FAILURE_THRESHOLD")
    breaker_reset_seconds: float = Field(30.0, gt=0, validation_alias="PERSISTENCE_BREAKER_RESET_SECONDS")
    batch_size: int = Field(500, ge=1, le=50_000, validation_alias="PERSISTENCE_BATCH_SIZE")
    max_pending: int = Field(100_000, ge=1, validation_alias="PERSISTENCE_MAX_PENDING")
    journal_dir: Path = Field(Path("./data/journal"), validation_alias="PERSISTENCE_JOURNAL_DIR")
    journal_sync_seconds: float = Field(1.0, gt=0, le=60, validation_alias="PERSISTENCE_JOURNAL_SYNC_SECONDS")
    journal_required: bool = Field(True, validation_alias="PERSISTENCE_JOURNAL_REQUIRED")
    history_max: int = Field(10_000, ge=1, validation_alias="PERSISTENCE_HISTORY_MAX")
    sqlite_cache_mib: int = Field(64, ge=1, le=4096, validation_alias="PERSISTENCE_SQLITE_CACHE_MIB")
    shutdown_timeout: float = Field(10.0, ge=0, validation_alias="PERSISTENCE_SHUTDOWN_TIMEOUT")
    api_host: str = Field("127.0.0.1", min_length=1, validation_alias="PERSISTENCE_API_HOST")
    api_port: int = Field(8089, ge=1, le=65535, validation_alias="PERSISTENCE_API_PORT")
    api_token: SecretStr | None = Field(None, validation_alias="PERSISTENCE_API_TOKEN")
    metrics_port: int | None = Field(None, ge=1, le=65535, validation_alias="PERSISTENCE_METRICS_PORT")
    log_format: Literal["auto", "json", "console"] = Field("auto", validation_alias="PERSISTENCE_LOG_FORMAT")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", validation_alias="PERSISTENCE_LOG_LEVEL"
    )
    backup_dir: Path = Field(Path("./data/backups"), validation_alias="PERSISTENCE_BACKUP_DIR")
    backup_before_migrate: bool = Field(True, validation_alias="PERSISTENCE_BACKUP_BEFORE_MIGRATE")
    audit_anchor_dir: Path = Field(Path("./data/anchors"), validation_alias="PERSISTENCE_AUDIT_ANCHOR_DIR")
    audit_anchor_seconds: float = Field(30.0, gt=0, validation_alias="PERSISTENCE_AUDIT_ANCHOR_SECONDS")
    audit_signing_key: Path | None = Field(None, validation_alias="PERSISTENCE_AUDIT_SIGNING_KEY")
    instance_id: str = Field(
        default_factory=lambda: socket.gethostname()[:64] or "localhost",
        min_length=1,
        max_length=64,
        validation_alias="PERSISTENCE_INSTANCE_ID",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(_problems(exc)) from None

    @field_validator("enabled", "backup_before_migrate", "journal_required", mode="before")
    @classmethod
    def _strict_flag(cls, value: object) -> bool:
        return parse_flag(value)

    @field_validator("api_token", "metrics_port", "audit_signing_key", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _case_insensitive(cls, value: object) -> object:
        if isinstance(value, str):
            return value.strip().upper() if value.strip().upper() in _LOG_LEVELS else value.strip().lower()
        return value

    @field_validator("instance_id", mode="before")
    @classmethod
    def _printable_name(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if not value.isprintable():
                raise ValueError("must be printable text (no control characters)")
        return value

    @field_validator("database_url")
    @classmethod
    def _valid_async_url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("is not a valid SQLAlchemy URL (expected e.g. sqlite+aiosqlite:///path.db)") from None
        try:
            dialect = url.get_dialect()
        except NoSuchModuleError:
            raise ValueError(f"unknown database driver {url.drivername!r}") from None
        if not getattr(dialect, "is_async", False):
            raise ValueError(
                f"driver {url.drivername!r} is not async; use sqlite+aiosqlite:// or postgresql+asyncpg://"
            )
        if url.get_backend_name() == "sqlite" and url.database in (None, ""):
            raise ValueError("a SQLite URL needs a file path or :memory:")
        return value

    @property
    def url(self) -> URL:
        """The parsed database URL."""
        return make_url(self.database_url)

    @property
    def safe_database_url(self) -> str:
        """The database URL with any password masked, for logs and status output."""
        return self.url.render_as_string(hide_password=True)

    @property
    def secrets(self) -> tuple[str, ...]:
        """What must never reach a log line or an error message: the database password and the API token.

        The one list every mask uses (the sidecar's event logger, the CLI's process logging, its error lines).
        """
        token = self.api_token.get_secret_value() if self.api_token is not None else ""
        password = self.url.password or ""
        return tuple(secret for secret in (str(password), token) if secret)

    @property
    def query_timeout(self) -> float:
        """``DATABASE_QUERY_TIMEOUT`` in seconds."""
        return self.query_timeout_ms / 1000.0

    @property
    def is_sqlite(self) -> bool:
        """Whether the database is SQLite."""
        return self.url.get_backend_name() == "sqlite"

    def __repr_args__(self) -> Any:
        yield "database_url", self.safe_database_url
        yield from super().__repr_args__()


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    aliases = {name: str(field.validation_alias or name).upper() for name, field in Settings.model_fields.items()}
    for error in exc.errors():
        loc = error.get("loc") or ("<settings>",)
        name = str(loc[0])
        variable = aliases.get(name, name.upper())
        message = str(error.get("msg", "invalid value"))
        message = message.removeprefix("Value error, ")
        given = error.get("input")
        if variable not in {"DATABASE_URL", "PERSISTENCE_API_TOKEN"} and isinstance(given, str | int | float):
            message = f"{message} (got {given!r})"
        problems.append((variable, message))
    return problems
