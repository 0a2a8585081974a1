"""What a record is, with no SQL: the four record models, their registry, the fast parser generated from them, the
in-memory history, receipts.

Lives here: :mod:`~persistence.records.models` (pydantic models, the one statement of each field, and the values'
rules: exact decimals, UTC timestamps, text without NUL or unpaired surrogates), :mod:`~persistence.records.registry`
(the one list of record types and every name each goes by: entity, export name, journal kind, key, time column),
:mod:`~persistence.records.parser` (the straight-line validation generated per record type from the model's fields),
:mod:`~persistence.records.history` (the authoritative ``trade_history``), :mod:`~persistence.records.receipts` and
:mod:`~persistence.records.iso8601`.

May import: :mod:`persistence.errors` and :mod:`persistence.config`. Nothing else of the package.
"""
