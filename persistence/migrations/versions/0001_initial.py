"""Initial schema: trades, signals, performance_snapshots, parameter_history and dead_letters.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from persistence.db.columns import ExactNumeric, UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("entity", sa.String(length=32), nullable=False),
        sa.Column("natural_key", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("error_class", sa.String(length=128), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
    )
    op.create_index("idx_dead_letters_entity_key", "dead_letters", ["entity", "natural_key"], unique=False)

    op.create_table(
        "parameter_history",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("change_time", UTCDateTime(), nullable=False),
        sa.Column("parameter_mode", sa.String(length=64), nullable=False),
        sa.Column("session", sa.String(length=8), nullable=True),
        sa.Column("confidence_threshold", ExactNumeric(), nullable=True),
        sa.Column("min_risk_reward", ExactNumeric(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("changed_by", sa.String(length=16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint(
            "changed_by IN ('system_auto', 'learning_agent', 'manual', 'emergency')",
            name=op.f("ck_parameter_history_changed_by"),
        ),
        sa.CheckConstraint(
            "session IS NULL OR session IN ('TOKYO', 'LONDON', 'NY', 'SYDNEY', 'OVERLAP')",
            name=op.f("ck_parameter_history_session"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_parameter_history")),
    )
    op.create_index("idx_parameter_history_time", "parameter_history", ["change_time"], unique=False)

    op.create_table(
        "performance_snapshots",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("snapshot_time", UTCDateTime(), nullable=False),
        sa.Column("total_trades", sa.BigInteger(), nullable=False),
        sa.Column("winning_trades", sa.BigInteger(), nullable=False),
        sa.Column("losing_trades", sa.BigInteger(), nullable=False),
        sa.Column("win_rate", ExactNumeric(), nullable=True),
        sa.Column("total_pnl", ExactNumeric(), nullable=True),
        sa.Column("sharpe_ratio", ExactNumeric(), nullable=True),
        sa.Column("max_drawdown", ExactNumeric(), nullable=True),
        sa.Column("average_rr", ExactNumeric(), nullable=True),
        sa.Column("session", sa.String(length=8), nullable=True),
        sa.Column("parameter_mode", sa.String(length=64), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint(
            "session IS NULL OR session IN ('TOKYO', 'LONDON', 'NY', 'SYDNEY', 'OVERLAP')",
            name=op.f("ck_performance_snapshots_session"),
        ),
        sa.CheckConstraint(
            "total_trades >= 0 AND winning_trades >= 0 AND losing_trades >= 0 AND winning_trades + losing_trades <= total_trades",
            name=op.f("ck_performance_snapshots_trade_counts"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_performance_snapshots")),
    )
    op.create_index("idx_snapshots_time", "performance_snapshots", ["snapshot_time"], unique=False)

    op.create_table(
        "signals",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("signal_id", sa.String(length=64), nullable=False),
        sa.Column("symbol", sa.String(length=32), nullable=False),
        sa.Column("timeframe", sa.String(length=16), nullable=False),
        sa.Column("signal_type", sa.String(length=4), nullable=False),
        sa.Column("confidence", ExactNumeric(), nullable=False),
        sa.Column("entry_price", ExactNumeric(), nullable=False),
        sa.Column("stop_loss", ExactNumeric(), nullable=True),
        sa.Column("take_profit", ExactNumeric(), nullable=True),
        sa.Column("session", sa.String(length=8), nullable=True),
        sa.Column("pattern_type", sa.String(length=64), nullable=True),
        sa.Column("generated_at", UTCDateTime(), nullable=False),
        sa.Column("executed", sa.Boolean(), nullable=False),
        sa.Column("execution_status", sa.String(length=32), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint(
            "session IS NULL OR session IN ('TOKYO', 'LONDON', 'NY', 'SYDNEY', 'OVERLAP')",
            name=op.f("ck_signals_session"),
        ),
        sa.CheckConstraint("signal_type IN ('BUY', 'SELL')", name=op.f("ck_signals_signal_type")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_signals")),
        sa.UniqueConstraint("signal_id", name=op.f("uq_signals_signal_id")),
    )
    op.create_index("idx_signals_generated_at", "signals", ["generated_at"], unique=False)

    op.create_table(
        "trades",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("trade_id", sa.String(length=64), nullable=False),
        sa.Column("signal_id", sa.String(length=64), nullable=True),
        sa.Column("account_id", sa.String(length=64), nullable=True),
        sa.Column("symbol", sa.String(length=32), nullable=False),
        sa.Column("direction", sa.String(length=4), nullable=False),
        sa.Column("entry_time", UTCDateTime(), nullable=False),
        sa.Column("entry_price", ExactNumeric(), nullable=False),
        sa.Column("exit_time", UTCDateTime(), nullable=True),
        sa.Column("exit_price", ExactNumeric(), nullable=True),
        sa.Column("stop_loss", ExactNumeric(), nullable=True),
        sa.Column("take_profit", ExactNumeric(), nullable=True),
        sa.Column("position_size", ExactNumeric(), nullable=False),
        sa.Column("pnl", ExactNumeric(), nullable=True),
        sa.Column("pnl_percentage", ExactNumeric(), nullable=True),
        sa.Column("session", sa.String(length=8), nullable=True),
        sa.Column("pattern_type", sa.String(length=64), nullable=True),
        sa.Column("confidence_score", ExactNumeric(), nullable=True),
        sa.Column("risk_reward_ratio", ExactNumeric(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("direction IN ('BUY', 'SELL')", name=op.f("ck_trades_direction")),
        sa.CheckConstraint(
            "session IS NULL OR session IN ('TOKYO', 'LONDON', 'NY', 'SYDNEY', 'OVERLAP')",
            name=op.f("ck_trades_session"),
        ),
        sa.CheckConstraint("position_size > 0", name=op.f("ck_trades_position_size_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trades")),
        sa.UniqueConstraint("trade_id", name=op.f("uq_trades_trade_id")),
    )
    op.create_index("idx_trades_pattern", "trades", ["pattern_type"], unique=False)
    op.create_index("idx_trades_session", "trades", ["session"], unique=False)
    op.create_index("idx_trades_symbol_time", "trades", ["symbol", "entry_time"], unique=False)


def downgrade() -> None:
    op.drop_index("idx_trades_symbol_time", table_name="trades")
    op.drop_index("idx_trades_session", table_name="trades")
    op.drop_index("idx_trades_pattern", table_name="trades")

    op.drop_table("trades")
    op.drop_index("idx_signals_generated_at", table_name="signals")

    op.drop_table("signals")
    op.drop_index("idx_snapshots_time", table_name="performance_snapshots")

    op.drop_table("performance_snapshots")
    op.drop_index("idx_parameter_history_time", table_name="parameter_history")

    op.drop_table("parameter_history")
    op.drop_index("idx_dead_letters_entity_key", table_name="dead_letters")

    op.drop_table("dead_letters")
