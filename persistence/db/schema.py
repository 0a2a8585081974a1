"""The six tables, their indexes and CHECK constraints, as SQLAlchemy Core metadata.

Column names and table names are the product's contract. Decimal columns use :class:`ExactNumeric` and
timestamps :class:`UTCDateTime`, so both are exact on SQLite and PostgreSQL. The four record tables carry the
``instance_id`` of the orchestrator that last wrote each row; ``audit_log`` is the hash-chained trail of every version
written (see :mod:`persistence.audit.trail`). The Alembic migrations create exactly this schema; a test compares the
two.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

from persistence.db.columns import ExactNumeric, UTCDateTime
from persistence.records.models import CHANGED_BY, DIRECTIONS, SESSIONS, Entity
from persistence.records.registry import RECORD_KINDS

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# SQLite only autoincrements an INTEGER PRIMARY KEY; BIGINT elsewhere.
Id = BigInteger().with_variant(Integer(), "sqlite")


def _one_of(column: str, values: tuple[str, ...], *, nullable: bool = False) -> str:
    allowed = ", ".join(f"'{value}'" for value in values)
    rule = f"{column} IN ({allowed})"
    return f"{column} IS NULL OR {rule}" if nullable else rule


trades = Table(
    "trades",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("trade_id", String(64), nullable=False, unique=True),
    Column("signal_id", String(64)),
    Column("account_id", String(64)),
    Column("symbol", String(32), nullable=False),
    Column("direction", String(4), nullable=False),
    Column("entry_time", UTCDateTime(), nullable=False),
    Column("entry_price", ExactNumeric(), nullable=False),
    Column("exit_time", UTCDateTime()),
    Column("exit_price", ExactNumeric()),
    Column("stop_loss", ExactNumeric()),
    Column("take_profit", ExactNumeric()),
    Column("position_size", ExactNumeric(), nullable=False),
    Column("pnl", ExactNumeric()),
    Column("pnl_percentage", ExactNumeric()),
    Column("session", String(8)),
    Column("pattern_type", String(64)),
    Column("confidence_score", ExactNumeric()),
    Column("risk_reward_ratio", ExactNumeric()),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("instance_id", String(64)),
    CheckConstraint(_one_of("direction", DIRECTIONS), name="direction"),
    CheckConstraint(_one_of("session", SESSIONS, nullable=True), name="session"),
    CheckConstraint("position_size > 0", name="position_size_positive"),
    Index("idx_trades_symbol_time", "symbol", "entry_time"),
    Index("idx_trades_session", "session", "entry_time"),
    Index("idx_trades_pattern", "pattern_type", "entry_time"),
    Index("idx_trades_updated_at", "updated_at"),
    Index("idx_trades_entry_time", "entry_time"),
)

signals = Table(
    "signals",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("signal_id", String(64), nullable=False, unique=True),
    Column("symbol", String(32), nullable=False),
    Column("timeframe", String(16), nullable=False),
    Column("signal_type", String(4), nullable=False),
    Column("confidence", ExactNumeric(), nullable=False),
    Column("entry_price", ExactNumeric(), nullable=False),
    Column("stop_loss", ExactNumeric()),
    Column("take_profit", ExactNumeric()),
    Column("session", String(8)),
    Column("pattern_type", String(64)),
    Column("generated_at", UTCDateTime(), nullable=False),
    Column("executed", Boolean(create_constraint=False), nullable=False),
    Column("execution_status", String(32)),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("instance_id", String(64)),
    CheckConstraint(_one_of("signal_type", DIRECTIONS), name="signal_type"),
    CheckConstraint(_one_of("session", SESSIONS, nullable=True), name="session"),
    Index("idx_signals_generated_at", "generated_at"),
)

performance_snapshots = Table(
    "performance_snapshots",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("snapshot_time", UTCDateTime(), nullable=False),
    Column("total_trades", BigInteger(), nullable=False),
    Column("winning_trades", BigInteger(), nullable=False),
    Column("losing_trades", BigInteger(), nullable=False),
    Column("win_rate", ExactNumeric()),
    Column("total_pnl", ExactNumeric()),
    Column("sharpe_ratio", ExactNumeric()),
    Column("max_drawdown", ExactNumeric()),
    Column("average_rr", ExactNumeric()),
    Column("session", String(8)),
    Column("parameter_mode", String(64)),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("instance_id", String(64)),
    CheckConstraint(_one_of("session", SESSIONS, nullable=True), name="session"),
    CheckConstraint(
        "total_trades >= 0 AND winning_trades >= 0 AND losing_trades >= 0"
        " AND winning_trades + losing_trades <= total_trades",
        name="trade_counts",
    ),
    Index("idx_snapshots_time", "snapshot_time"),
)

parameter_history = Table(
    "parameter_history",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("change_time", UTCDateTime(), nullable=False),
    Column("parameter_mode", String(64), nullable=False),
    Column("session", String(8)),
    Column("confidence_threshold", ExactNumeric()),
    Column("min_risk_reward", ExactNumeric()),
    Column("reason", Text()),
    Column("changed_by", String(16), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("instance_id", String(64)),
    CheckConstraint(_one_of("changed_by", CHANGED_BY), name="changed_by"),
    CheckConstraint(_one_of("session", SESSIONS, nullable=True), name="session"),
    Index("idx_parameter_history_time", "change_time"),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("entity", String(32), nullable=False),
    Column("natural_key", String(64), nullable=False),
    Column("payload", Text(), nullable=False),
    Column("error", Text(), nullable=False),
    Column("error_class", String(128), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Index("idx_dead_letters_entity_key", "entity", "natural_key"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("instance_id", String(64), nullable=False),
    Column("seq", BigInteger(), nullable=False),
    Column("entity", String(32), nullable=False),
    Column("natural_key", String(64), nullable=False),
    Column("payload", Text(), nullable=False),
    Column("recorded_at", UTCDateTime(), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    # The hash of the previous entry of the same record (entity, natural_key); NULL in entries from before 0005.
    Column("key_prev_hash", String(64), nullable=True),
    # One entry per (chain, position): a second writer that read a stale head fails instead of forking the chain.
    Index("idx_audit_log_chain", "instance_id", "seq", unique=True),
    Index("idx_audit_log_entity_key", "entity", "natural_key", "id"),
)

copy_sources = Table(
    "copy_sources",
    metadata,
    Column("source", String(512), primary_key=True),
    Column("first_copied_at", UTCDateTime(), nullable=False),
)
"""The databases this one was copied from (see :mod:`persistence.tools.copy`); not itself copied."""

TABLE_OF: Mapping[Entity, Table] = MappingProxyType(
    {"trade": trades, "signal": signals, "snapshot": performance_snapshots, "parameter_change": parameter_history}
)
"""The table of each record type of :data:`persistence.records.registry.RECORD_KINDS` (a test holds them equal)."""
RECORD_TABLES = tuple(TABLE_OF[kind.entity] for kind in RECORD_KINDS)
"""The tables whose rows are audited and carry ``instance_id``, in the registry's order."""
TABLES = (*RECORD_TABLES, dead_letters, audit_log)
