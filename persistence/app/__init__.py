"""The edges a person or a program meets: the history API, the server that runs it, the command line, the demo.

Lives here: :mod:`~persistence.app.api` (the FastAPI router and app), :mod:`~persistence.app.server` (uvicorn inside
the caller's loop), :mod:`persistence.app.cli` (``persistence-sidecar …``, its console and progress bar) and
:mod:`persistence.app.demo` (the simulated orchestrator).

May import anything in the package. Nothing in the package imports it, except the top-level re-export of
:func:`~persistence.app.api.create_router`.
"""
