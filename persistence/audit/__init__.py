"""The audit trail: where the hash is computed, where versions are appended, and how a trail is verified.

Lives here: :mod:`~persistence.audit.chain` (pure: canonical JSON of a version, headers, SHA-256 links; no I/O),
:mod:`~persistence.audit.trail` (``audit_log`` appends in the write transaction, the chain's head, versions of a
key) and :mod:`~persistence.audit.verify` (``audit verify``: every chain, every row against its newest version).

May import: :mod:`persistence.db`, :mod:`persistence.records`, :mod:`persistence.observe`, :mod:`persistence.errors`,
:mod:`persistence.config`.
"""
