"""A progress bar for long commands (export, copy): rows done, rate and time left, redrawn in place on a terminal.

It draws only when its stream is a terminal, at most every ``interval`` seconds, and clears its line when done, so
what stays on screen (and everything written to a pipe or a file) is the command's one-line summary. Time comes from
an injected monotonic ``clock``; :func:`render` is pure, for tests.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

_CLEAR_LINE = "\r\x1b[K"
_BAR_WIDTH = 24


def _duration(seconds: float) -> str:
    whole = max(int(seconds + 0.5), 0)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def render(label: str, done: int, total: int | None, elapsed: float) -> str:
    """One progress line: ``trades [######----] 40% 400,000/1,000,000 rows 95,000 rows/s ETA 0:06``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [label]
    if total:
        fraction = min(done / total, 1.0)
        filled = int(fraction * _BAR_WIDTH)
        parts.append("[" + "#" * filled + "-" * (_BAR_WIDTH - filled) + "]")
        parts.append(f"{fraction:4.0%}")
        parts.append(f"{done:,}/{total:,} rows")
    else:
        parts.append(f"{done:,} rows")
    parts.append(f"{rate:,.0f} rows/s")
    if total and rate > 0:
        parts.append(f"ETA {_duration(max(total - done, 0) / rate)}")
    return " ".join(parts)


class ProgressBar:
    """Shows :func:`render`'s line on ``out`` (stderr by default) while work goes on; silent when not a terminal."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.1,
    ) -> None:
        self.label = label
        self.total = total
        self.out = out if out is not None else sys.stderr
        self.tty = self.out.isatty()
        self._clock = clock
        self._interval = interval
        self._started = clock()
        self._last_draw: float | None = None
        self.done = 0

    def update(self, done: int) -> None:
        """Record that ``done`` rows are finished; redraw when the last drawing is older than the interval."""
        self.done = done
        if not self.tty:
            return
        now = self._clock()
        if self._last_draw is not None and now - self._last_draw < self._interval:
            return
        self._last_draw = now
        self.out.write(_CLEAR_LINE + render(self.label, done, self.total, now - self._started))
        self.out.flush()

    def close(self) -> None:
        """Clear the bar's line (the caller then prints its summary)."""
        if self.tty and self._last_draw is not None:
            self.out.write(_CLEAR_LINE)
            self.out.flush()

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was created."""
        return self._clock() - self._started
