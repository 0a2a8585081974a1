"""Operator tools over a database: export for analysis, copy between databases, restore from a backup.

Lives here: :mod:`~persistence.tools.export` and :mod:`~persistence.tools.export_files` (tables and the trail as
pyarrow batches, written to Parquet, CSV or JSONL atomically), :mod:`~persistence.tools.copy` (every table from one
database to another, proven equal) and :mod:`~persistence.tools.restore` (a SQLite backup swapped in atomically).

May import: :mod:`persistence.migrations`, :mod:`persistence.audit`, :mod:`persistence.db`,
:mod:`persistence.records`, :mod:`persistence.observe`, :mod:`persistence.errors`, :mod:`persistence.config`.
Never :mod:`persistence.tables`, :mod:`persistence.write` or :mod:`persistence.app`.
"""
