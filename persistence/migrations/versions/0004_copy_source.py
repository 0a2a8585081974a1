"""``copy_sources``: the databases a target was copied from, so a later ``copy`` knows an earlier copy of its source.

One row per source identity (SQLite: the resolved file; PostgreSQL: the server's system identifier and the database),
written by ``persistence-sidecar copy`` before it writes any data. A target holding data and no row for the source
being copied is refused.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from persistence.db.columns import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "copy_sources",
        sa.Column("source", sa.String(length=512), nullable=False),
        sa.Column("first_copied_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_copy_sources")),
    )


def downgrade() -> None:
    op.drop_table("copy_sources")
