"""The durable write path: where a record is made durable, and where the breaker is decided.

Lives here: :mod:`~persistence.write.breaker` (the circuit breaker, a pure state machine),
:mod:`~persistence.write.faults` (transient or data error), :mod:`~persistence.write.journal` (the on-disk spill
journal's file format and fsyncs), :mod:`~persistence.write.backlog` (RAM and journal as one durable FIFO),
:mod:`~persistence.write.committer` (one batch in one transaction: the COMMIT, retries, bisection, dead letters),
:mod:`~persistence.write.link` (preparing the database: migrations, the history, the SQLite file's identity),
:mod:`~persistence.write.writer` (the background task: admit, commit through the committer, settle receipts, publish
events; the one owner of whether the database is reachable) and :mod:`~persistence.write.runtime` (the composition
root: builds all of it once, tears it down once, and takes no part in a write).

May import every lower layer (:mod:`persistence.tables`, :mod:`persistence.migrations`, :mod:`persistence.audit`,
:mod:`persistence.db`, :mod:`persistence.records`, :mod:`persistence.observe`), :mod:`persistence.errors` and
:mod:`persistence.config`. Never :mod:`persistence.app`.
"""
