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

import sqlalchemy as sa
from alembic import op

from persistence.audit import BASELINE_INSTANCE, AuditHead, canonical_version, chain_entries
from persistence.columns import UTCDateTime
from persistence.models import ParameterChange, PerformanceSnapshot, Record, Signal, Trade, utc_now
from persistence.schema import audit_log, parameter_history, performance_snapshots, signals, trades

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


def _baseline() -> None:
    """One entry per existing row, in the ``pre-audit`` chain, and that instance id on the rows."""
    connection = op.get_bind()
    head: AuditHead | None = None
    now = utc_now()
    tables: tuple[tuple[sa.Table, type[Record]], ...] = (
        (trades, Trade),
        (signals, Signal),
        (performance_snapshots, PerformanceSnapshot),
        (parameter_history, ParameterChange),
    )
    for table, record in tables:
        fields = tuple(record.model_fields)
        key = record.key_field
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
            versions = [(record.entity, str(row[key]), canonical_version(dict(row), fields)) for row in rows]
            entries = chain_entries(head, BASELINE_INSTANCE, versions, now)
            connection.execute(audit_log.insert(), entries)
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
