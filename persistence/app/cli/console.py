"""The terminal side of the command line: a status line refreshed in place, and log lines that do not tear it.

On a terminal the status line is redrawn with a carriage return; anything else printed (a log line, a notice) first
clears it and then redraws it below, so the screen stays readable. When the output is not a terminal (a pipe, a log
file, a container) the status goes out as a ``demo_status`` log event with its figures as fields, at most every
``interval`` seconds, so the output is log lines only and never a mix of log lines and plain text.
:func:`configure_console_logging` sends the process's log lines through the console (for ``demo`` and ``serve``
only: a library never configures its host's logging).
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any, TextIO, cast

from persistence.config import Settings
from persistence.observe.event_log import configure_logging
from persistence.observe.logger import get_logger

_CLEAR_LINE = "\r\x1b[K"


class StatusConsole:
    """Writes notices line by line and one status line kept at the bottom of a terminal."""

    def __init__(self, out: TextIO | None = None, *, interval: float = 3.0, logger: Any | None = None) -> None:
        self.out = out if out is not None else sys.stdout
        self.tty = self.out.isatty()
        self.interval = interval
        self._log = logger if logger is not None else get_logger("persistence.demo")
        self._status = ""
        self._last_plain = 0.0

    def status(self, text: str, **fields: Any) -> None:
        """Show ``text`` as the current status in place on a terminal; elsewhere log ``fields`` every ``interval`` s."""
        if self.tty:
            # A line longer than the terminal wraps, and a carriage return then only rewinds its last row.
            text = text[: max(shutil.get_terminal_size().columns - 1, 20)]
            self._status = text
            self.out.write(_CLEAR_LINE + text)
            self.out.flush()
            return
        now = time.monotonic()
        if now - self._last_plain >= self.interval:
            self._last_plain = now
            self._log.info("demo_status", **fields)

    def line(self, text: str, stream: TextIO | None = None) -> None:
        """Print ``text`` as a line of its own (to ``stream``, default the console's), keeping the status line."""
        target = stream if stream is not None else self.out
        if self.tty and self._status:
            self.out.write(_CLEAR_LINE)
            self.out.flush()
        target.write(text if text.endswith("\n") else text + "\n")
        target.flush()
        if self.tty and self._status:
            self.out.write(self._status)
            self.out.flush()

    def end_status(self) -> None:
        """Leave the last status on screen and move below it."""
        if self.tty and self._status:
            self.out.write("\n")
            self.out.flush()
        self._status = ""


class ConsoleStream:
    """A text stream for log handlers that prints through a :class:`StatusConsole`, keeping its status line."""

    def __init__(self, console: StatusConsole, stream: TextIO) -> None:
        self._console = console
        self._stream = stream

    def write(self, text: str) -> int:
        """Print ``text`` (one or more whole lines) above the status line."""
        if text.strip():
            self._console.line(text.rstrip("\n"), self._stream)
        return len(text)

    def flush(self) -> None:
        """Flush the underlying stream."""
        self._stream.flush()

    def isatty(self) -> bool:
        """Whether the underlying stream is a terminal (log format ``auto`` asks)."""
        return self._stream.isatty()


def configure_console_logging(settings: Settings, console: StatusConsole, stream: TextIO | None = None) -> None:
    """:func:`persistence.observe.event_log.configure_logging` writing to ``stream`` (default stderr) through
    ``console``."""
    target = stream if stream is not None else sys.stderr
    configure_logging(settings, stream=cast(TextIO, ConsoleStream(console, target)))
