"""Reads and batched upserts over the five tables: the version rule, versioned writes, queries, repositories.

Lives here: :mod:`~persistence.tables.versioned` (what a batch really changes, decided under the write lock, and
written with its audit entries), :mod:`~persistence.tables.queries` (history queries as values: the one place query
parameters are validated) and :mod:`~persistence.tables.repositories` (the async repositories users and the API read
through).

May import: :mod:`persistence.tools` (the export a repository offers), :mod:`persistence.migrations`,
:mod:`persistence.audit`, :mod:`persistence.db`, :mod:`persistence.records`, :mod:`persistence.observe`,
:mod:`persistence.errors`, :mod:`persistence.config`. Never :mod:`persistence.write` or :mod:`persistence.app`.
"""
