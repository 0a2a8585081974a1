"""The library's loggers: structlog's API over the standard library's ``persistence`` logger, configured by nobody.

A library is a guest in its host's process, so it never calls ``structlog.configure`` or touches a handler.
:func:`get_logger` wraps ``logging.getLogger(name)`` (``persistence`` or a child of it) in a structlog
``BoundLogger`` whose only processor, :class:`LibraryProcessors`, decides at each call:

- when structlog has been configured (by :func:`persistence.observe.event_log.configure_logging` in the CLI, by a host
that
  configures structlog, or by ``structlog.testing.capture_logs``), the configured processors run, so the CLI's
  JSON and console lines and the tests' captures are what they always were;
- otherwise a minimal chain drops what the standard-library logger's level filters out and hands that logger one
  record: the message ``event key=value …``, the exception as ``exc_info``, and the event's name and fields as the
  record attributes ``persistence_event`` / ``persistence_fields``. The host's logging configuration decides the
  rest. With none at all, Python shows WARNING and above on stderr (its last-resort handler) and nothing else:
  never a line on stdout.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

__all__ = ["LibraryProcessors", "get_logger"]

ROOT_LOGGER = "persistence"
_render_fields = structlog.processors.LogfmtRenderer(bool_as_flag=False)


def _stdlib_call(event_dict: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of one standard-library logging call carrying ``event_dict``."""
    fields = dict(event_dict)
    event = str(fields.pop("event", ""))
    exc_info = fields.pop("exc_info", None)
    stack_info = bool(fields.pop("stack_info", False))
    fields.pop("positional_args", None)
    rendered = _render_fields(None, "", dict(fields)) if fields else ""
    message = f"{event} {rendered}" if rendered else event
    kwargs: dict[str, Any] = {
        "extra": {"persistence_event": event, "persistence_fields": fields},
        "stack_info": stack_info,
    }
    if exc_info:
        kwargs["exc_info"] = exc_info
    return (message,), kwargs


class LibraryProcessors:
    """The processor chain of the library's loggers: structlog's configured chain if any, else a minimal one."""

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> Any:
        """Run the chain and return what the standard-library logger is called with."""
        if not structlog.is_configured():
            structlog.stdlib.filter_by_level(logger, method_name, event_dict)  # raises DropEvent below the level
            return _stdlib_call(event_dict)
        result: Any = event_dict
        for processor in structlog.get_config()["processors"]:
            result = processor(logger, method_name, result)
        if isinstance(result, Mapping):  # a configured chain without a renderer
            return _stdlib_call(result)
        return result


_PROCESSORS = [LibraryProcessors()]


def get_logger(name: str = ROOT_LOGGER, **initial_values: Any) -> Any:
    """A structlog logger over the standard-library logger ``name`` that never configures anything.

    ``name`` should be ``persistence`` or start with ``persistence.``, so one ``logging.getLogger("persistence")``
    setting in the host covers every line the library writes.
    """
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=_PROCESSORS,
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=False,
        **initial_values,
    )
