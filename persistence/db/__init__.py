"""Speaking SQL: the engine and its safety rails, the tables, exact column types, row codecs, PostgreSQL COPY.

Lives here: :mod:`~persistence.db.engine` (one engine from ``Settings``; SQLite's ``BEGIN IMMEDIATE``, timeouts and
interrupts), :mod:`~persistence.db.driver` (a SQLite transaction as one call on the driver's thread),
:mod:`~persistence.db.schema` (the six tables), :mod:`~persistence.db.columns` (decimals and UTC
timestamps exact on every backend), :mod:`~persistence.db.rowcodec` (batches to driver values and back),
:mod:`~persistence.db.pgcopy` (binary ``COPY`` upserts), :mod:`~persistence.db.wal_checkpoint` (SQLite WAL checkpoints
off the commit path), :mod:`~persistence.db.durable` (SQLite's commits made durable before an audit checkpoint names
them), :mod:`~persistence.db.inuse_lock` (the "database in use" lock) and
:mod:`~persistence.db.backups` (SQLite online backups). Schema migrations live in :mod:`persistence.migrations`, one
layer up, because the migration that starts the audit trail builds its first chain with :mod:`persistence.audit`.

May import: :mod:`persistence.records`, :mod:`persistence.observe`, :mod:`persistence.errors`,
:mod:`persistence.config`.
"""
