"""``python -m persistence``: the same command line as ``persistence-sidecar``."""

from persistence.app.cli.main import main

raise SystemExit(main())
