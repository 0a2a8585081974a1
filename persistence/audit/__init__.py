"""The audit trail: where the hash is computed, where versions are appended, and how a trail is verified.

Lives here: :mod:`~persistence.audit.chain` (pure: canonical JSON of a version, headers, SHA-256 links, the check of
one entry against the one before it; no I/O), :mod:`~persistence.audit.trail` (``audit_log`` appends in the write
transaction, the chain's head, versions of a key), :mod:`~persistence.audit.anchors` (checkpoints: written, signed,
read back), and ``audit verify``: :mod:`~persistence.audit.verify` (every chain, every row against its newest
version, deletions; an export offline), with :mod:`~persistence.audit.report` (what it found),
:mod:`~persistence.audit.links` (record links checked by the database), :mod:`~persistence.audit.server_checks` and
:mod:`~persistence.audit.stretches` (on PostgreSQL, the server checks hashes and rows itself, a chain in stretches
side by side) and :mod:`~persistence.audit.rows_worker` (the rows checked in child processes).

May import: :mod:`persistence.db`, :mod:`persistence.records`, :mod:`persistence.observe`, :mod:`persistence.errors`,
:mod:`persistence.config`.
"""
