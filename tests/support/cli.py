"""The command line run by its ``main()`` inside the test process, as a fresh process would see it.

A subprocess costs most of a second of imports before the command does anything; tests that check what a command
prints and the status it exits with call :func:`run_in_process` instead. Each command keeps at least one test that
runs it in a real subprocess (signals, kill -9, what reaches a real stdout, the environment a process inherits).

For the call, the environment is exactly ``env`` and the working directory ``cwd`` (restored after), stdout and
stderr are captured, an uncaught exception is printed as a traceback with status 1 (what the interpreter does),
and the root logger has no handler, so a warning the library logs reaches stderr through Python's last-resort
handler exactly as in a process that configured no logging. With an event loop running in the caller's thread,
the command runs in a thread of its own (``asyncio.run`` needs a thread without one); the caller waits either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path

from persistence.app.cli.main import main

__all__ = ["run_in_process"]


@contextlib.contextmanager
def _as_a_fresh_process(cwd: Path, env: Mapping[str, str]) -> Iterator[tuple[io.StringIO, io.StringIO]]:
    saved_env = dict(os.environ)
    saved_cwd = Path.cwd()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    stdout, stderr = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    root.handlers[:] = []
    root.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            yield stdout, stderr
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _main(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as exc:  # argparse: --help, a bad argument
        return _exit_status(exc.code)
    except Exception:
        traceback.print_exc()
        return 1


def _a_loop_runs_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_in_process(*args: str, cwd: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``persistence-sidecar ARGS`` in ``cwd`` with exactly the environment ``env``; shaped like ``subprocess.run``'s
    answer (``returncode``, ``stdout``, ``stderr``)."""
    status: list[int] = []
    with _as_a_fresh_process(cwd, env) as (stdout, stderr):
        if not _a_loop_runs_here():
            status.append(_main(list(args)))
        else:
            thread = threading.Thread(target=lambda: status.append(_main(list(args))), name="persistence-cli")
            thread.start()
            thread.join()
    return subprocess.CompletedProcess(["persistence-sidecar", *args], status[0], stdout.getvalue(), stderr.getvalue())
