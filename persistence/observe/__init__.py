"""Observability: the events the core publishes, the metrics and log lines that subscribe to them, correlation ids.

Lives here: :mod:`~persistence.observe.events` (frozen event objects and the bus), :mod:`~persistence.observe.metrics`
(one Prometheus registry per sidecar) and :mod:`~persistence.observe.metrics_http` (the stand-alone ``/metrics``
endpoint), :mod:`~persistence.observe.event_log` (events as log lines, and the CLI's logging set-up),
:mod:`~persistence.observe.logger` (the library's ``persistence`` logger, configured by nobody) and
:mod:`~persistence.observe.correlation` (the correlation id of the current context).

May import: :mod:`persistence.records`, :mod:`persistence.errors`, :mod:`persistence.config`.
"""
