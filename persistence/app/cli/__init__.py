"""The ``persistence-sidecar`` command line: the commands, the terminal's status line and the progress bar.

:mod:`~persistence.app.cli.main` parses and dispatches; :mod:`~persistence.app.cli.portability` holds ``export``,
``copy``, ``restore`` and ``migrate``; :mod:`~persistence.app.cli.audit` the ``audit`` commands.
"""
