"""The audit trail and instances: ``audit_log``, and ``instance_id`` on the four record tables.

Rows written before this revision are given the instance id ``pre-audit`` and one entry each in that instance's
chain (their versions as they stand: what they were before is not known), so ``audit verify`` covers them from
here on. ``audit_log`` refuses UPDATE and DELETE (and TRUNCATE on PostgreSQL) by trigger.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from persistence.audit.chain import BASELINE_INSTANCE, AuditHead, canonical_version, chain_entries
from persistence.db.columns import ExactNumeric, UTCDateTime
from persistence.records.models import utc_now

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RECORD_TABLES = ("trades", "signals", "performance_snapshots", "parameter_history")
_REFUSAL = "audit_log is append-only"
_CHUNK = 5000


def upgrade() -> None:
    for table in RECORD_TABLES:
        op.add_column(table, sa.Column("instance_id", sa.String(length=64), nullable=True))
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("instance_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("entity", sa.String(length=32), nullable=False),
        sa.Column("natural_key", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index("idx_audit_log_chain", "audit_log", ["instance_id", "seq"], unique=True)
    op.create_index("idx_audit_log_entity_key", "audit_log", ["entity", "natural_key", "id"], unique=False)
    _baseline()
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"RAISE EXCEPTION '{_REFUSAL}: % refused', TG_OP USING ERRCODE = 'insufficient_privilege'; END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
            "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()"
        )
    else:
        for operation in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_log_no_{operation.lower()} BEFORE {operation} ON audit_log "
                f"BEGIN SELECT RAISE(ABORT, '{_REFUSAL}: {operation} refused'); END"
            )


# The tables as this revision knows them (not as a later release's schema or records will): entity, key, columns.
_D, _T, _S, _B, _I = ExactNumeric, UTCDateTime, sa.String, sa.Boolean, sa.BigInteger
_RECORDS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "trades": (
        "trade",
        "trade_id",
        {
            **dict.fromkeys(("trade_id", "signal_id", "account_id", "symbol", "direction"), _S),
            **dict.fromkeys(("entry_time", "exit_time", "created_at", "updated_at"), _T),
            **dict.fromkeys(("session", "pattern_type"), _S),
            **dict.fromkeys(
                ("entry_price", "exit_price", "stop_loss", "take_profit", "position_size", "pnl", "pnl_percentage"),
                _D,
            ),
            **dict.fromkeys(("confidence_score", "risk_reward_ratio"), _D),
        },
    ),
    "signals": (
        "signal",
        "signal_id",
        {
            **dict.fromkeys(("signal_id", "symbol", "timeframe", "signal_type", "session", "pattern_type"), _S),
            **dict.fromkeys(("confidence", "entry_price", "stop_loss", "take_profit"), _D),
            **dict.fromkeys(("generated_at", "created_at"), _T),
            "executed": _B,
            "execution_status": _S,
        },
    ),
    "performance_snapshots": (
        "snapshot",
        "id",
        {
            "id": _S,
            **dict.fromkeys(("snapshot_time", "created_at"), _T),
            **dict.fromkeys(("total_trades", "winning_trades", "losing_trades"), _I),
            **dict.fromkeys(("win_rate", "total_pnl", "sharpe_ratio", "max_drawdown", "average_rr"), _D),
            **dict.fromkeys(("session", "parameter_mode"), _S),
        },
    ),
    "parameter_history": (
        "parameter_change",
        "id",
        {
            **dict.fromkeys(("id", "parameter_mode", "session", "reason", "changed_by"), _S),
            **dict.fromkeys(("change_time", "created_at"), _T),
            **dict.fromkeys(("confidence_threshold", "min_risk_reward"), _D),
        },
    ),
}
_AUDIT_LOG = sa.table(
    "audit_log",
    *(sa.column(name, _S) for name in ("instance_id", "entity", "natural_key", "payload", "prev_hash", "hash")),
    sa.column("seq", _I),
    sa.column("recorded_at", _T),
)


def _baseline() -> None:
    """One entry per existing row, in the ``pre-audit`` chain, and that instance id on the rows."""
    connection = op.get_bind()
    head: AuditHead | None = None
    now = utc_now()
    for name, (entity, key, columns) in _RECORDS.items():
        fields = tuple(columns)
        id_type = sa.String() if key == "id" else sa.BigInteger()
        table = sa.table(
            name,
            *(sa.column(column, kind()) for column, kind in columns.items() if column != "id"),
            sa.column("id", id_type),
            sa.column("instance_id", sa.String()),
        )
        order = table.c.id
        last: object = None
        while True:
            statement = sa.select(table.c.id, *[table.c[name] for name in fields]).order_by(order).limit(_CHUNK)
            if last is not None:
                statement = statement.where(order > last)
            rows = connection.execute(statement).mappings().all()
            if not rows:
                break
            last = rows[-1]["id"]
            versions = [(entity, str(row[key]), canonical_version(dict(row), fields)) for row in rows]
            entries = chain_entries(head, BASELINE_INSTANCE, versions, now)
            connection.execute(_AUDIT_LOG.insert(), entries)
            head = AuditHead(BASELINE_INSTANCE, entries[-1]["seq"], entries[-1]["hash"])
        connection.execute(table.update().values(instance_id=BASELINE_INSTANCE))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log")
        op.execute("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
    op.drop_index("idx_audit_log_entity_key", table_name="audit_log")
    op.drop_index("idx_audit_log_chain", table_name="audit_log")
    op.drop_table("audit_log")
    for table in reversed(RECORD_TABLES):
        op.drop_column(table, "instance_id")
