"""``audit_log.key_prev_hash``: each entry links to the previous entry of the same record, across instances.

The order of one record's versions written by several instances came from ``audit_log.id``, which no hash covered;
with this column in each entry's hashed header it is sealed by the hashes too. Entries written before this revision
keep ``NULL`` and stay verifiable exactly as they were hashed; ``audit verify`` checks the links of every entry that
has one (the first linked entry of a record links to its latest unlinked one, if any).

A downgrade drops the column: the entries written since could no longer be verified, so a downgrade refuses
it (``migrate_to``) while any entry holds a link, unless forced.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("audit_log", sa.Column("key_prev_hash", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("audit_log", "key_prev_hash")
