"""Indexes for how trades are read: by updated_at (history at start-up) and by entry_time, alone or within a
session or pattern (the history API's filters, newest first).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("idx_trades_updated_at", "trades", ["updated_at"], unique=False)
    op.create_index("idx_trades_entry_time", "trades", ["entry_time"], unique=False)
    # Same names, one more column: a filter on session or pattern is then also ordered by time.
    op.drop_index("idx_trades_session", table_name="trades")
    op.create_index("idx_trades_session", "trades", ["session", "entry_time"], unique=False)
    op.drop_index("idx_trades_pattern", table_name="trades")
    op.create_index("idx_trades_pattern", "trades", ["pattern_type", "entry_time"], unique=False)


def downgrade() -> None:
    op.drop_index("idx_trades_pattern", table_name="trades")
    op.create_index("idx_trades_pattern", "trades", ["pattern_type"], unique=False)
    op.drop_index("idx_trades_session", table_name="trades")
    op.create_index("idx_trades_session", "trades", ["session"], unique=False)
    op.drop_index("idx_trades_entry_time", table_name="trades")
    op.drop_index("idx_trades_updated_at", table_name="trades")
