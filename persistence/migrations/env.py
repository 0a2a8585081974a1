"""Alembic environment for the sidecar's schema.

Migrations only run in-process through :func:`persistence.migrations.upgrade`, which hands over a connection
already inside a locked write transaction. This file deliberately never calls ``logging.config.fileConfig``:
that would reconfigure (and by default disable) the host application's loggers.
"""

from __future__ import annotations

from alembic import context

from persistence.db.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `persistence-sidecar migrate` or persistence.migrations.upgrade()")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
